"""Evaluation of a predictions dataset: metrics, plots, Grad-CAM and one self-contained HTML report.

The metric functions are pure (a DataFrame in, plain dicts or DataFrames out) so the
model card reuses them. A frame of labeled faces has the prediction columns `age`,
`age_group`, `gender` and the label columns `label_age`, `label_age_group`,
`label_gender`, `label_race` (any label column may be absent or null).
Plots are drawn on matplotlib `Figure`s directly: no pyplot state, no GUI backend.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from sklearn.metrics import classification_report, confusion_matrix

from agepipe import labels as labels_lib
from agepipe import storage
from agepipe.config import EvaluateSettings, LabelSettings

logger = logging.getLogger(__name__)

LABEL_FIELDS = ("age", "gender", "race", "age_group")
# what MAE is broken down by: name -> label column
GROUPINGS = {"age_group": "label_age_group", "gender": "label_gender", "race": "label_race"}


# --- reading predictions and labels ---


def prediction_files(uri: str) -> tuple[pafs.FileSystem, list[str]]:
    """The Parquet files of a predictions dataset (a folder, recursive) or a single Parquet file.

    Files and folders whose names start with `.` or `_` are bookkeeping, not data.
    """
    fs, root = storage.resolve(uri)
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.File:
        return fs, [root]
    if info.type != pafs.FileType.Directory:
        raise FileNotFoundError(f"predictions {uri!r} do not exist")
    entries = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    files = sorted(
        e.path
        for e in entries
        if e.type == pafs.FileType.File
        and e.path.endswith(".parquet")
        and not any(part.startswith((".", "_")) for part in e.path[len(root) :].split("/"))
    )
    if not files:
        raise FileNotFoundError(f"no .parquet files under {uri!r}")
    return fs, files


def read_predictions(uri: str) -> pd.DataFrame:
    """All rows of a predictions dataset; files may differ in which columns are all-null."""
    fs, files = prediction_files(uri)
    tables = [pq.read_table(path, filesystem=fs) for path in files]
    return pa.concat_tables(tables, promote_options="permissive").to_pandas()


def attach_labels(
    predictions: pd.DataFrame, label_fn: Callable[[str], labels_lib.Labels], settings: LabelSettings
) -> pd.DataFrame:
    """Predictions with `label_*` columns derived from each row's `path` (replacing any there)."""
    labels_by_path = {path: labels_lib.finalize(label_fn(path), settings) for path in predictions["path"].unique()}
    frame = predictions.copy()
    for name in LABEL_FIELDS:
        frame[f"label_{name}"] = frame["path"].map(lambda path, name=name: labels_by_path[path][name])
    frame["label_age"] = frame["label_age"].astype(float)
    return frame


def complete_label_groups(frame: pd.DataFrame, settings: LabelSettings) -> pd.DataFrame:
    """Fill `label_age_group` from `label_age` where the group is missing and the age is known."""
    if "label_age" not in frame:
        return frame
    derived = frame["label_age"].map(lambda age: labels_lib.age_group(age, settings.groups))
    existing = frame.get("label_age_group", derived)
    frame = frame.copy()
    frame["label_age_group"] = existing.where(existing.notna(), derived)
    return frame


def common_root(paths: Sequence[str]) -> str:
    """The deepest folder holding every path (how a label table's relative paths are anchored)."""
    folders = [path.rsplit("/", 1)[0] for path in paths]
    prefix = folders[0] if folders else ""
    for folder in folders[1:]:
        while prefix and not (folder == prefix or folder.startswith(prefix + "/")):
            prefix = prefix.rsplit("/", 1)[0] if "/" in prefix else ""
    return prefix


def with_labels(predictions: pd.DataFrame, settings: LabelSettings) -> pd.DataFrame:
    """Predictions with label columns: derived from paths when `settings.kind` names a source,
    else the scoring job's label columns as they are (with age groups completed)."""
    if settings.kind != "none":
        label_fn = labels_lib.label_source(settings, common_root(list(predictions["path"].unique())))
        predictions = attach_labels(predictions, label_fn, settings)
    return complete_label_groups(predictions, settings)


# --- pure metrics ---


def scored_faces(predictions: pd.DataFrame) -> pd.DataFrame:
    """Rows that are a scored face: a face index and no error."""
    ok = predictions["face_index"].notna()
    if "error" in predictions:
        ok &= predictions["error"].isna()
    return predictions[ok]


def coverage(predictions: pd.DataFrame) -> dict[str, Any]:
    """Images, scored faces, images without a face and images with another error (by reason)."""
    errors = predictions["error"] if "error" in predictions else pd.Series(None, index=predictions.index)
    faces = scored_faces(predictions)
    no_face = predictions.loc[errors == "no_face", "path"].nunique()
    failed = predictions[errors.notna() & (errors != "no_face")].drop_duplicates("path")
    reasons = failed["error"].value_counts().sort_index()
    return {
        "images": int(predictions["path"].nunique()),
        "images_with_faces": int(faces["path"].nunique()),
        "faces": len(faces),
        "no_face": int(no_face),
        "errors": len(failed),
        "error_reasons": {str(reason): int(count) for reason, count in reasons.items()},
    }


def _with_ages(frame: pd.DataFrame) -> pd.DataFrame:
    if "label_age" not in frame or "age" not in frame:
        return frame.iloc[0:0]
    return frame[frame["label_age"].notna() & frame["age"].notna()]


def age_errors(frame: pd.DataFrame) -> dict[str, Any]:
    """MAE, RMSE, bias (mean predicted minus actual), median absolute error and share within 5 years."""
    rows = _with_ages(frame)
    if rows.empty:
        return {"faces": 0, "mae": None, "rmse": None, "bias": None, "median_ae": None, "within_5": None}
    error = rows["age"].to_numpy(float) - rows["label_age"].to_numpy(float)
    return {
        "faces": len(rows),
        "mae": float(np.abs(error).mean()),
        "rmse": float(np.sqrt((error**2).mean())),
        "bias": float(error.mean()),
        "median_ae": float(np.median(np.abs(error))),
        "within_5": float((np.abs(error) <= 5).mean()),
    }


def ordered_groups(frame: pd.DataFrame, column: str) -> list[str]:
    """Values of `column`, youngest first when ages are known (age groups), else alphabetical."""
    present = frame[frame[column].notna()]
    if present.empty:
        return []
    if column == "label_age_group" and "label_age" in present and present["label_age"].notna().any():
        youngest = present.groupby(column)["label_age"].min().fillna(np.inf)
        return [str(name) for name in youngest.sort_values(kind="stable").index]
    return sorted(str(value) for value in present[column].unique())


def mae_by(frame: pd.DataFrame, column: str) -> pd.DataFrame:
    """One row per value of `column` (as `group`): faces, MAE and bias; empty when the column is absent."""
    header = ["group", "faces", "mae", "bias"]
    if column not in frame:
        return pd.DataFrame(columns=header)
    rows = _with_ages(frame)
    rows = rows[rows[column].notna()]
    error = rows["age"].astype(float) - rows["label_age"].astype(float)
    table = pd.DataFrame({"group": rows[column].astype(str), "error": error, "abs_error": error.abs()})
    grouped = table.groupby("group").agg(faces=("error", "size"), mae=("abs_error", "mean"), bias=("error", "mean"))
    order = [name for name in ordered_groups(rows, column) if name in grouped.index]
    return grouped.reindex(order).reset_index()[header]


def age_group_confusion(frame: pd.DataFrame) -> pd.DataFrame:
    """Counts of faces by actual (rows) and predicted (columns) age group, youngest first."""
    if "label_age_group" not in frame or "age_group" not in frame:
        return pd.DataFrame()
    rows = frame[frame["label_age_group"].notna() & frame["age_group"].notna()]
    if rows.empty:
        return pd.DataFrame()
    names = ordered_groups(rows, "label_age_group")
    names += sorted(set(rows["age_group"].astype(str)) - set(names))
    counts = confusion_matrix(rows["label_age_group"].astype(str), rows["age_group"].astype(str), labels=names)
    return pd.DataFrame(
        counts,
        index=pd.Index(names, name="actual"),
        columns=pd.Index(names, name="predicted"),
    )


def gender_report(frame: pd.DataFrame) -> dict[str, Any]:
    """scikit-learn's classification report (precision, recall, f1, support) for gender."""
    if "label_gender" not in frame or "gender" not in frame:
        return {}
    rows = frame[frame["label_gender"].notna() & frame["gender"].notna()]
    if rows.empty:
        return {}
    names = [name for name in labels_lib.GENDERS if name in set(rows["label_gender"]) | set(rows["gender"])]
    return classification_report(rows["label_gender"], rows["gender"], labels=names, output_dict=True, zero_division=0)


def _records(table: pd.DataFrame) -> list[dict[str, Any]]:
    return json.loads(table.to_json(orient="records", double_precision=15))


def metrics_summary(frame: pd.DataFrame) -> dict[str, Any]:
    """Every metric of a frame of labeled faces, as JSON-ready plain values.

    Keys: faces, age (overall errors), by_age_group / by_gender / by_race (rows of
    faces, mae, bias), age_group (accuracy, labels, confusion counts), gender
    (classification report; `accuracy` among its keys).
    """
    confusion = age_group_confusion(frame)
    total = int(confusion.to_numpy().sum()) if not confusion.empty else 0
    correct = int(sum(confusion.at[name, name] for name in confusion.index if name in confusion.columns))
    return {
        "faces": len(frame),
        "age": age_errors(frame),
        **{f"by_{name}": _records(mae_by(frame, column)) for name, column in GROUPINGS.items()},
        "age_group": {
            "faces": total,
            "accuracy": correct / total if total else None,
            "labels": [str(name) for name in confusion.index],
            "confusion": confusion.to_numpy().tolist(),
        },
        "gender": gender_report(frame),
    }


def prediction_distribution(faces: pd.DataFrame) -> dict[str, Any]:
    """What was predicted, labels or not: mean age and faces per age group and gender."""
    return {
        "mean_age": float(faces["age"].mean()) if len(faces) else None,
        "age_group": {str(k): int(v) for k, v in _youngest_first(faces["age_group"], faces["age"]).items()},
        "gender": {str(k): int(v) for k, v in faces["gender"].value_counts().items()},
    }


def _youngest_first(groups: pd.Series, ages: pd.Series) -> pd.Series:
    """Faces per group, ordered by the group's mean age."""
    mean_age = ages.groupby(groups).mean().sort_values()
    return groups.value_counts().reindex(mean_age.index)


def training_summary(run_metrics: pd.DataFrame) -> dict[str, Any]:
    """Epochs, and the epoch with the best validation MAE, of a training run's metrics table."""
    summary: dict[str, Any] = {"epochs": len(run_metrics)}
    if "val_mae" in run_metrics and run_metrics["val_mae"].notna().any():
        best = run_metrics.loc[run_metrics["val_mae"].idxmin()]
        summary["best_epoch"] = int(best.get("epoch", best.name))
        summary["best_val_mae"] = float(best["val_mae"])
        for name in ("val_group_accuracy", "val_gender_accuracy"):
            if name in best and pd.notna(best[name]):
                summary[f"best_{name}"] = float(best[name])
    return summary


def sample_faces(faces: pd.DataFrame, count: int, seed: int) -> pd.DataFrame:
    """`count` faces spread over the age range: one drawn at random from each of `count` age slices."""
    if count <= 0 or faces.empty:
        return faces.iloc[0:0]
    key = faces["label_age"] if "label_age" in faces and faces["label_age"].notna().all() else faces["age"]
    ordered = faces.assign(_key=key.to_numpy()).sort_values("_key", kind="stable")
    rng = np.random.default_rng(seed)
    slices = np.array_split(np.arange(len(ordered)), min(count, len(ordered)))
    picks = [int(rng.choice(positions)) for positions in slices]
    return ordered.iloc[picks].drop(columns="_key")


# --- plots (PNG bytes) ---


def _png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return buffer.getvalue()


def plot_predicted_vs_actual(frame: pd.DataFrame, max_points: int = 20_000, seed: int = 0) -> bytes:
    """Scatter of predicted against actual age with the ideal y = x line (a sample when large)."""
    rows = _with_ages(frame)
    shown = rows.sample(n=max_points, random_state=seed) if len(rows) > max_points else rows
    figure = Figure(figsize=(5.5, 5))
    axes = figure.subplots()
    axes.scatter(shown["label_age"], shown["age"], s=8, alpha=0.4, edgecolors="none")
    top = float(max(rows["label_age"].max(), rows["age"].max(), 1)) * 1.05
    axes.plot([0, top], [0, top], color="crimson", linewidth=1.2, label="ideal (predicted = actual)")
    axes.set(xlim=(0, top), ylim=(0, top), xlabel="actual age (years)", ylabel="predicted age (years)")
    sampled = f" ({len(shown)} of {len(rows)} faces shown)" if len(shown) < len(rows) else ""
    axes.set_title(f"Predicted vs actual age{sampled}")
    axes.legend(loc="upper left")
    axes.grid(alpha=0.3)
    return _png(figure)


def plot_error_histogram(frame: pd.DataFrame) -> bytes:
    """Histogram of predicted minus actual age, with the bias and MAE in the title."""
    rows = _with_ages(frame)
    error = rows["age"].astype(float) - rows["label_age"].astype(float)
    figure = Figure(figsize=(6, 4))
    axes = figure.subplots()
    axes.hist(error, bins=min(60, max(10, len(error) // 5)), color="steelblue")
    axes.axvline(0, color="crimson", linewidth=1.2)
    axes.set(xlabel="predicted - actual age (years)", ylabel="faces")
    axes.set_title(f"Age error: MAE {error.abs().mean():.2f}, bias {error.mean():+.2f} years")
    axes.grid(alpha=0.3)
    return _png(figure)


def plot_age_distribution(frame: pd.DataFrame) -> bytes:
    """Histogram of predicted ages, with actual ages beside them when labels are known."""
    figure = Figure(figsize=(6, 4))
    axes = figure.subplots()
    bins = np.arange(0, 105, 5)
    axes.hist(frame["age"].dropna(), bins=bins, alpha=0.6, label="predicted")
    if "label_age" in frame and frame["label_age"].notna().any():
        axes.hist(frame["label_age"].dropna(), bins=bins, alpha=0.6, label="actual")
    axes.set(xlabel="age (years)", ylabel="faces", title="Age distribution")
    axes.legend()
    axes.grid(alpha=0.3)
    return _png(figure)


def plot_confusion_matrix(confusion: pd.DataFrame) -> bytes:
    """Age-group confusion matrix: colour is the share of each actual group, text the count."""
    counts = confusion.to_numpy()
    shares = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    figure = Figure(figsize=(1.2 * len(confusion.columns) + 2.5, 1.0 * len(confusion.index) + 2))
    axes = figure.subplots()
    image = axes.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    axes.set_xticks(range(len(confusion.columns)), confusion.columns, rotation=30, ha="right")
    axes.set_yticks(range(len(confusion.index)), confusion.index)
    for (row, column), count in np.ndenumerate(counts):
        color = "white" if shares[row, column] > 0.5 else "black"
        axes.text(column, row, str(count), ha="center", va="center", color=color)
    axes.set(xlabel="predicted age group", ylabel="actual age group", title="Age-group confusion matrix")
    figure.colorbar(image, ax=axes, label="share of actual group")
    return _png(figure)


def plot_mae_by_group(tables: dict[str, pd.DataFrame]) -> bytes:
    """Bars of MAE per age group, gender and race (one panel per non-empty table), faces on each bar."""
    shown = {title: table for title, table in tables.items() if not table.empty}
    figure = Figure(figsize=(4.5 * max(len(shown), 1), 4))
    panels = np.atleast_1d(figure.subplots(1, max(len(shown), 1)))
    for axes, (title, table) in zip(panels, shown.items(), strict=False):
        bars = axes.bar(table["group"], table["mae"], color="teal")
        axes.bar_label(bars, labels=[f"n={n}" for n in table["faces"]], fontsize=8)
        axes.set(title=f"MAE by {title}", ylabel="MAE (years)")
        axes.tick_params(axis="x", rotation=30)
        axes.grid(axis="y", alpha=0.3)
    return _png(figure)


def plot_training_curves(run_metrics: pd.DataFrame) -> bytes:
    """Loss, MAE and validation accuracies per epoch of a training run; dashed lines mark a new phase."""
    panels = [
        ("loss", ["train_loss", "val_loss"]),
        ("MAE (years)", ["train_mae", "val_mae"]),
        ("accuracy", ["val_group_accuracy", "val_gender_accuracy"]),
    ]
    panels = [(title, [c for c in columns if c in run_metrics]) for title, columns in panels]
    panels = [(title, columns) for title, columns in panels if columns]
    epochs = run_metrics["epoch"] if "epoch" in run_metrics else pd.Series(range(len(run_metrics)))
    figure = Figure(figsize=(4.5 * max(len(panels), 1), 3.8))
    phase_starts = []
    if "phase" in run_metrics:
        changed = run_metrics["phase"].ne(run_metrics["phase"].shift()) & (run_metrics.index > 0)
        phase_starts = list(epochs[changed])
    for axes, (title, columns) in zip(np.atleast_1d(figure.subplots(1, max(len(panels), 1))), panels, strict=False):
        for column in columns:
            axes.plot(epochs, run_metrics[column], marker="o", label=column)
        for start in phase_starts:
            axes.axvline(start - 0.5, color="gray", linestyle="--", linewidth=1)
        axes.set(title=title, xlabel="epoch")
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.legend(fontsize=8)
        axes.grid(alpha=0.3)
    return _png(figure)


@dataclass
class GradcamTile:
    """One face for the Grad-CAM grid: the crop, its overlay and a caption."""

    crop: np.ndarray
    overlay: np.ndarray
    caption: str


def plot_gradcam_grid(tiles: Sequence[GradcamTile], columns: int = 4) -> bytes:
    """Each face as its crop beside its Grad-CAM overlay, `columns` faces to a row."""
    rows = max(1, -(-len(tiles) // columns))
    figure = Figure(figsize=(3.2 * columns, 1.9 * rows))
    grid = np.atleast_2d(figure.subplots(rows, columns))
    for axes in grid.flat:
        axes.axis("off")
    for axes, tile in zip(grid.flat, tiles, strict=False):
        height = max(tile.crop.shape[0], tile.overlay.shape[0])
        pair = np.concatenate([_pad_to(tile.crop, height), _pad_to(tile.overlay, height)], axis=1)
        axes.imshow(pair)
        axes.set_title(tile.caption, fontsize=9)
    figure.suptitle("Grad-CAM: regions driving the predicted age (face | overlay)")
    return _png(figure)


def _pad_to(image: np.ndarray, height: int) -> np.ndarray:
    return np.pad(image, ((0, height - image.shape[0]), (0, 0), (0, 0)))


# --- Grad-CAM over source images ---


def gradcam_tiles(predictor: Any, faces: pd.DataFrame) -> list[GradcamTile]:
    """Grad-CAM tiles for faces of a predictions frame: each source image is re-read by `path`
    and cropped by the Predictor; a face that cannot be re-read or re-found is skipped."""
    from agepipe.explain import explain_crop

    tiles = []
    for face in faces.itertuples(index=False):
        try:
            image_rows = predictor.crop_images([storage.read_bytes(face.path)])[0]
        except (OSError, storage.StorageError) as exc:
            logger.warning("Grad-CAM: cannot read %s: %s", face.path, exc)
            continue
        crops = [r["crop"] for r in image_rows if r["face_index"] == face.face_index and r["crop"] is not None]
        if not crops:
            logger.warning("Grad-CAM: face %s of %s not found again", face.face_index, face.path)
            continue
        caption = f"predicted {face.age:.0f}"
        label_age = getattr(face, "label_age", None)
        if label_age is not None and pd.notna(label_age):
            caption += f", actual {label_age:.0f}"
        tiles.append(GradcamTile(crops[0], explain_crop(predictor, crops[0]), caption))
    return tiles


# --- the HTML report ---

PLOT_CAPTIONS = {
    "predicted_vs_actual": "Predicted versus actual age; the red line is a perfect prediction.",
    "error_histogram": "Predicted minus actual age; right of zero is an over-estimate.",
    "age_distribution": "Distribution of predicted (and actual) ages.",
    "mae_by_group": "Mean absolute error per age group, gender and race.",
    "age_group_confusion": "Age-group confusion matrix (rows: actual group).",
    "gradcam": "Grad-CAM overlays for a sample of faces across the age range.",
    "training_curves": "Training curves of the run that produced the model.",
}

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 1100px; color: #222; }
h1 { margin-bottom: 0.2rem; } .meta { color: #666; margin-top: 0; }
table.metrics { border-collapse: collapse; margin: 0.5rem 0 1.2rem; }
table.metrics th, table.metrics td { border: 1px solid #ccc; padding: 0.25rem 0.6rem; text-align: right; }
table.metrics th { background: #f3f3f3; }
figure { margin: 1rem 0; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { color: #555; font-size: 0.9rem; }
"""


def _table_html(table: pd.DataFrame, table_id: str) -> str:
    return table.to_html(
        index=False,
        border=0,
        classes="metrics",
        table_id=table_id,
        float_format=lambda v: f"{v:.2f}",
        na_rep="",
    )


def _figure_html(name: str, png: bytes) -> str:
    data = base64.b64encode(png).decode("ascii")
    caption = html.escape(PLOT_CAPTIONS.get(name, name))
    return (
        f'<figure id="plot-{name}"><img class="plot" alt="{html.escape(name)}" '
        f'src="data:image/png;base64,{data}"><figcaption>{caption}</figcaption></figure>'
    )


def _section(title: str, *parts: str) -> str:
    return f"<section><h2>{html.escape(title)}</h2>{''.join(parts)}</section>"


COVERAGE_ROWS = {
    "images": "images",
    "images_with_faces": "images with a scored face",
    "faces": "faces scored",
    "no_face": "images without a face",
    "errors": "images with an error",
}


def coverage_table(counts: dict[str, Any]) -> pd.DataFrame:
    """The coverage counts as rows of (what, count), one extra row per error reason."""
    rows = [(title, counts[key]) for key, title in COVERAGE_ROWS.items()]
    rows += [(f"error: {reason}", count) for reason, count in counts["error_reasons"].items()]
    return pd.DataFrame(rows, columns=["", "count"])


def render_report(report: dict[str, Any], plots: dict[str, bytes]) -> str:
    """The self-contained HTML report: the metrics of `report` (metrics.json) as tables, plots inline."""
    meta = html.escape(
        f"predictions {report['predictions']} · labels {report['labels']} · model {report['model']}"
        f" · generated {report['generated_at']}"
    )
    sections = [_section("Coverage", _table_html(coverage_table(report["coverage"]), "coverage"))]
    metrics = report.get("metrics")
    if metrics and metrics["age"]["faces"]:
        overall = pd.DataFrame([metrics["age"]])
        tables = [
            f"<h3>By {name.replace('_', ' ')}</h3>"
            + _table_html(pd.DataFrame(metrics[f"by_{name}"]), f"mae-by-{name.replace('_', '-')}")
            for name in GROUPINGS
            if metrics[f"by_{name}"]
        ]
        names = ("predicted_vs_actual", "error_histogram", "mae_by_group")
        figures = [_figure_html(name, plots[name]) for name in names if name in plots]
        sections.append(_section("Age error", _table_html(overall, "mae-overall"), *tables, *figures))
    if metrics and metrics["age_group"]["faces"]:
        group = metrics["age_group"]
        confusion = pd.DataFrame(group["confusion"], columns=group["labels"])
        confusion.insert(0, "actual \\ predicted", group["labels"])
        accuracy = f"<p>Age-group accuracy: {group['accuracy']:.3f} over {group['faces']} faces.</p>"
        figure = _figure_html("age_group_confusion", plots["age_group_confusion"])
        sections.append(_section("Age groups", accuracy, _table_html(confusion, "age-group-confusion"), figure))
    if metrics and metrics["gender"]:
        report_table = pd.DataFrame({k: v for k, v in metrics["gender"].items() if isinstance(v, dict)}).T
        report_table = report_table.astype({"support": int}).rename_axis("class").reset_index()
        accuracy = metrics["gender"].get("accuracy")
        text = f"<p>Gender accuracy: {accuracy:.3f}.</p>" if accuracy is not None else ""
        sections.append(_section("Gender", text, _table_html(report_table, "gender-report")))
    distribution = report["prediction_distribution"]
    predicted = pd.DataFrame(
        [("age group", name, count) for name, count in distribution["age_group"].items()]
        + [("gender", name, count) for name, count in distribution["gender"].items()],
        columns=["predicted", "value", "faces"],
    )
    mean_age = distribution["mean_age"]
    text = f"<p>Mean predicted age: {mean_age:.1f} years.</p>" if mean_age is not None else ""
    figures = [_figure_html("age_distribution", plots["age_distribution"])] if "age_distribution" in plots else []
    sections.append(_section("Predictions", text, _table_html(predicted, "predicted-counts"), *figures))
    if "gradcam" in plots:
        sections.append(_section("Grad-CAM", _figure_html("gradcam", plots["gradcam"])))
    if report.get("training"):
        training = _table_html(pd.DataFrame([report["training"]]), "training-summary")
        sections.append(_section("Training", training, _figure_html("training_curves", plots["training_curves"])))
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f"<title>agepipe evaluation</title><style>{STYLE}</style></head><body>"
        f'<h1>agepipe evaluation</h1><p class="meta">{meta}</p>{"".join(sections)}</body></html>'
    )


# --- the job ---


def build_plots(faces: pd.DataFrame, metrics: dict[str, Any] | None, settings: EvaluateSettings) -> dict[str, bytes]:
    """The PNG plots that the data supports, by name."""
    plots: dict[str, bytes] = {}
    if metrics and metrics["age"]["faces"]:
        plots["predicted_vs_actual"] = plot_predicted_vs_actual(faces, settings.max_scatter_points, settings.seed)
        plots["error_histogram"] = plot_error_histogram(faces)
        tables = {name.replace("_", " "): mae_by(faces, column) for name, column in GROUPINGS.items()}
        plots["mae_by_group"] = plot_mae_by_group(tables)
    if metrics and metrics["age_group"]["faces"]:
        plots["age_group_confusion"] = plot_confusion_matrix(age_group_confusion(faces))
    if len(faces):
        plots["age_distribution"] = plot_age_distribution(faces)
    return plots


def read_run_metrics(run: str) -> pd.DataFrame:
    """A training run folder's `metrics.csv` (one row per epoch)."""
    return pd.read_csv(io.BytesIO(storage.read_bytes(storage.join(run, "metrics.csv"))))


def run_evaluate(settings: EvaluateSettings) -> dict[str, Any]:
    """Evaluate `settings.predictions`; write the PNGs, `metrics.json` and `report.html` to
    `settings.output`. Returns the metrics.json content plus the report's URI."""
    if not settings.predictions or not settings.output:
        raise ValueError("evaluate needs --predictions and --output")
    predictions = with_labels(read_predictions(settings.predictions), settings.labels)
    faces = scored_faces(predictions)
    has_labels = any(column in faces and faces[column].notna().any() for column in ("label_age", "label_age_group"))
    metrics = metrics_summary(faces) if has_labels else None
    plots = build_plots(faces, metrics, settings)
    run_metrics = read_run_metrics(settings.run) if settings.run else None
    if run_metrics is not None:
        plots["training_curves"] = plot_training_curves(run_metrics)
    tiles: list[GradcamTile] = []
    if settings.gradcam_faces > 0 and len(faces):
        from agepipe.predict import Predictor

        # Every face, as `score` finds them, so a face_index names the same face again.
        overrides = {"all_faces": True, **{k: v for k, v in settings.crop_overrides.items() if v is not None}}
        predictor = Predictor(settings.model, overrides, flip_tta=False)
        tiles = gradcam_tiles(predictor, sample_faces(faces, settings.gradcam_faces, settings.seed))
        if tiles:
            plots["gradcam"] = plot_gradcam_grid(tiles)
    report = {
        "predictions": settings.predictions,
        "labels": settings.labels.kind if settings.labels.kind != "none" else "from the predictions",
        "model": settings.model or "default",
        "generated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "coverage": coverage(predictions),
        "metrics": metrics,
        "prediction_distribution": prediction_distribution(faces),
        "training": training_summary(run_metrics) if run_metrics is not None else None,
        "gradcam_faces": len(tiles),
        "plots": [f"{name}.png" for name in plots],
    }
    for name, png in plots.items():
        storage.write_bytes(storage.join(settings.output, f"{name}.png"), png)
    storage.write_bytes(storage.join(settings.output, "metrics.json"), json.dumps(report, indent=2).encode())
    report_uri = storage.join(settings.output, "report.html")
    storage.write_bytes(report_uri, render_report(report, plots).encode())
    return {**report, "report": report_uri}

"""Evaluation of a predictions dataset: labels attached, metrics, plots, Grad-CAM and one
self-contained HTML report (rendered from `static/report.html.j2`).

The metrics are in `agepipe.metrics`, the plots in `agepipe.plots`; this module reads the
predictions, their labels and the scoring run's recorded settings, and runs the job.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import jinja2
import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from agepipe import labels as labels_lib
from agepipe import storage
from agepipe.config import EvaluateSettings, LabelSettings
from agepipe.metrics import (
    GROUPINGS,
    age_group_confusion,
    coverage,
    mae_by,
    metrics_summary,
    prediction_distribution,
    sample_faces,
    scored_faces,
    training_summary,
)
from agepipe.plots import (
    GalleryPhoto,
    GradcamTile,
    gradcam_tiles,
    interval_gallery,
    plot_age_distribution,
    plot_confusion_matrix,
    plot_error_histogram,
    plot_gradcam_grid,
    plot_mae_by_group,
    plot_predicted_vs_actual,
    plot_training_curves,
)
from agepipe.predict import Predictor
from agepipe.score import SCORE_SETTINGS_FILE

LABEL_FIELDS = ("age", "gender", "race", "age_group")
REPORT_TEMPLATE = Path(__file__).resolve().parent / "static" / "report.html.j2"


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


def with_labels(predictions: pd.DataFrame, settings: LabelSettings, root: str | None = None) -> pd.DataFrame:
    """Predictions with label columns: derived from paths when `settings.kind` names a source,
    else the scoring job's label columns as they are (with age groups completed).

    `root` anchors a label table's relative paths (the scoring run's input); without it, the
    deepest folder holding every image."""
    if settings.kind != "none":
        root = root or common_root(list(predictions["path"].unique()))
        predictions = attach_labels(predictions, labels_lib.label_source(settings, root), settings)
    return complete_label_groups(predictions, settings)


@dataclass(frozen=True)
class ScoreRun:
    """What evaluate takes from the settings that `agepipe score` records beside its predictions."""

    model: str | None = None  # None: not recorded (evaluate's --model, else the default model)
    crop: dict[str, Any] = field(default_factory=dict)  # the crop it used; empty: the model's own
    input: str | None = None  # its input root, where label tables' relative paths are anchored
    interval_level: float | None = None  # the level of its age intervals; None: none, or not recorded


def read_score_run(predictions: str) -> ScoreRun:
    """The recorded settings of the scoring run that wrote `predictions`; nothing known (ScoreRun())
    where none are recorded: a single Parquet file, or predictions that another tool wrote."""
    uri = storage.join(predictions, SCORE_SETTINGS_FILE)
    if not storage.exists(uri):
        return ScoreRun()
    recorded = json.loads(storage.read_bytes(uri))
    return ScoreRun(
        model=recorded["model"],
        crop=recorded["crop"],
        input=recorded["input"],
        interval_level=recorded.get("interval_level"),  # runs recorded before intervals existed have none
    )


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


def _table_html(table: pd.DataFrame, table_id: str) -> str:
    return table.to_html(
        index=False,
        border=0,
        classes="metrics",
        table_id=table_id,
        float_format=lambda v: f"{v:.2f}",
        na_rep="",
    )


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


def report_tables(report: dict[str, Any]) -> dict[str, Any]:
    """The report's tables as HTML (`age_by`: one per grouping, by title), by section: only the
    sections that the report's data supports, which is what the template shows."""
    tables: dict[str, Any] = {"coverage": _table_html(coverage_table(report["coverage"]), "coverage")}
    metrics = report.get("metrics")
    if metrics and metrics["age"]["faces"]:
        tables["age"] = _table_html(pd.DataFrame([metrics["age"]]), "mae-overall")
        tables["age_by"] = {
            name.replace("_", " "): _table_html(pd.DataFrame(metrics[f"by_{name}"]), f"mae-by-{name.replace('_', '-')}")
            for name in GROUPINGS
            if metrics[f"by_{name}"]
        }
    if metrics and metrics["interval"]:
        intervals = metrics["interval"]
        tables["interval"] = _table_html(pd.DataFrame([intervals["overall"]]), "interval-overall")
        tables["interval_by"] = {
            name.replace("_", " "): _table_html(
                pd.DataFrame(intervals[f"by_{name}"]), f"interval-by-{name.replace('_', '-')}"
            )
            for name in GROUPINGS
            if intervals[f"by_{name}"]
        }
    if metrics and metrics["age_group"]["faces"]:
        group = metrics["age_group"]
        confusion = pd.DataFrame(group["confusion"], columns=group["labels"])
        confusion.insert(0, "actual \\ predicted", group["labels"])
        tables["age_group"] = _table_html(confusion, "age-group-confusion")
    if metrics and metrics["gender"]:
        report_table = pd.DataFrame({k: v for k, v in metrics["gender"].items() if isinstance(v, dict)}).T
        report_table = report_table.astype({"support": int}).rename_axis("class").reset_index()
        tables["gender"] = _table_html(report_table, "gender-report")
    distribution = report["prediction_distribution"]
    predicted = pd.DataFrame(
        [("age group", name, count) for name, count in distribution["age_group"].items()]
        + [("gender", name, count) for name, count in distribution["gender"].items()],
        columns=["predicted", "value", "faces"],
    )
    tables["predictions"] = _table_html(predicted, "predicted-counts")
    if report.get("training"):
        tables["training"] = _table_html(pd.DataFrame([report["training"]]), "training-summary")
    return tables


def render_report(report: dict[str, Any], plots: dict[str, bytes], gallery: Sequence[GalleryPhoto] = ()) -> str:
    """The self-contained HTML report: the metrics of `report` (metrics.json) as tables, plots and the
    gallery's photos inline."""
    environment = jinja2.Environment(autoescape=True, trim_blocks=True, lstrip_blocks=True)
    return environment.from_string(REPORT_TEMPLATE.read_text()).render(
        report=report,
        tables=report_tables(report),
        plots={name: base64.b64encode(png).decode("ascii") for name, png in plots.items()},
        captions=PLOT_CAPTIONS,
        gallery=[(photo, base64.b64encode(photo.jpeg).decode("ascii")) for photo in gallery],
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
    score_run = read_score_run(settings.predictions)
    predictions = with_labels(read_predictions(settings.predictions), settings.labels, score_run.input)
    model = settings.model or score_run.model
    faces = scored_faces(predictions)
    has_labels = any(column in faces and faces[column].notna().any() for column in ("label_age", "label_age_group"))
    metrics = metrics_summary(faces) if has_labels else None
    plots = build_plots(faces, metrics, settings)
    run_metrics = read_run_metrics(settings.run) if settings.run else None
    if run_metrics is not None:
        plots["training_curves"] = plot_training_curves(run_metrics)
    tiles: list[GradcamTile] = []
    if settings.gradcam_faces > 0 and len(faces):
        # Cropped as `score` cropped them (every face, by ScoringCrop), so a face_index names the same face again.
        predictor = Predictor.from_settings(dataclasses.replace(settings, model=model), score_run.crop)
        tiles = gradcam_tiles(predictor, sample_faces(faces, settings.gradcam_faces, settings.seed))
        if tiles:
            plots["gradcam"] = plot_gradcam_grid(tiles)
    gallery = interval_gallery(faces, settings.gallery_photos) if settings.gallery_photos > 0 and len(faces) else []
    report = {
        "predictions": settings.predictions,
        "labels": settings.labels.kind if settings.labels.kind != "none" else "from the predictions",
        "model": model or "default",
        "generated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "coverage": coverage(predictions),
        "metrics": metrics,
        "prediction_distribution": prediction_distribution(faces),
        "training": training_summary(run_metrics) if run_metrics is not None else None,
        "gradcam_faces": len(tiles),
        "interval_level": score_run.interval_level,
        "gallery": [{"path": photo.path, "faces": photo.labels} for photo in gallery],
        "plots": [f"{name}.png" for name in plots],
    }
    for name, png in plots.items():
        storage.write_bytes(storage.join(settings.output, f"{name}.png"), png)
    storage.write_bytes(storage.join(settings.output, "metrics.json"), json.dumps(report, indent=2).encode())
    report_uri = storage.join(settings.output, "report.html")
    storage.write_bytes(report_uri, render_report(report, plots, gallery).encode())
    return {**report, "report": report_uri}

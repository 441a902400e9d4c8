"""Evaluation metrics: pure functions from a DataFrame to plain dicts or DataFrames.

The evaluation report is built from them. A frame of labeled faces has the
prediction columns `age`, `age_group`, `gender` and the label columns `label_age`,
`label_age_group`, `label_gender`, `label_race` (any label column may be absent or null).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from sklearn.metrics import classification_report, confusion_matrix

from agepipe import labels as labels_lib

# what MAE is broken down by: name -> label column
GROUPINGS = {"age_group": "label_age_group", "gender": "label_gender", "race": "label_race"}


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


def with_ages(frame: pd.DataFrame) -> pd.DataFrame:
    """Rows with both a predicted and an actual age (none when either column is absent)."""
    if "label_age" not in frame or "age" not in frame:
        return frame.iloc[0:0]
    return frame[frame["label_age"].notna() & frame["age"].notna()]


def age_errors(frame: pd.DataFrame) -> dict[str, Any]:
    """MAE, RMSE, bias (mean predicted minus actual), median absolute error and share within 5 years."""
    rows = with_ages(frame)
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
    rows = with_ages(frame)
    rows = rows[rows[column].notna()]
    error = rows["age"].astype(float) - rows["label_age"].astype(float)
    table = pd.DataFrame({"group": rows[column].astype(str), "error": error, "abs_error": error.abs()})
    grouped = table.groupby("group").agg(faces=("error", "size"), mae=("abs_error", "mean"), bias=("error", "mean"))
    order = [name for name in ordered_groups(rows, column) if name in grouped.index]
    return grouped.reindex(order).reset_index()[header]


def interval_stats(actual: Sequence[float], low: Sequence[float], high: Sequence[float]) -> dict[str, Any]:
    """Faces, coverage (the share of actual ages inside their interval) and mean width in years."""
    actual, low, high = (np.asarray(v, float) for v in (actual, low, high))
    if not len(actual):
        return {"faces": 0, "coverage": None, "mean_width": None}
    inside = (low <= actual) & (actual <= high)
    return {"faces": len(actual), "coverage": float(inside.mean()), "mean_width": float((high - low).mean())}


def with_intervals(frame: pd.DataFrame) -> pd.DataFrame:
    """Rows with an actual age and a predicted interval (none when the model had no calibration)."""
    rows = with_ages(frame)
    if "age_low" not in rows or "age_high" not in rows:
        return rows.iloc[0:0]
    return rows[rows["age_low"].notna() & rows["age_high"].notna()]


def interval_by(frame: pd.DataFrame, column: str) -> list[dict[str, Any]]:
    """`interval_stats` per value of `column` (as `group`, youngest first for age groups)."""
    rows = with_intervals(frame)
    if column not in rows:
        return []
    rows = rows[rows[column].notna()]
    names = rows[column].astype(str)
    return [
        {"group": name, **interval_stats(part["label_age"], part["age_low"], part["age_high"])}
        for name in ordered_groups(rows, column)
        if len(part := rows[names == name])
    ]


def interval_summary(frame: pd.DataFrame) -> dict[str, Any] | None:
    """Coverage and mean width of the age intervals overall and by age group, gender and race; None where
    no labelled face has an interval."""
    rows = with_intervals(frame)
    if rows.empty:
        return None
    overall = interval_stats(rows["label_age"], rows["age_low"], rows["age_high"])
    return {"overall": overall, **{f"by_{name}": interval_by(rows, column) for name, column in GROUPINGS.items()}}


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
    (classification report; `accuracy` among its keys), interval (`interval_summary`).
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
        "interval": interval_summary(frame),
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

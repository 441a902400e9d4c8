"""The main job on local defaults: score real photos with the default model and write the report.

Runs on a laptop with no cluster, no GPU and no downloads: the photos ship with
scikit-image, the model with agepipe. When the model's recorded detector weights
cannot be had here, the zero-download detector stands in (and says so).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import pandas as pd

from agepipe.cluster import init_ray
from agepipe.config import DemoSettings, EvaluateSettings, ScoreSettings, ScoringCrop
from agepipe.evaluate import run_evaluate
from agepipe.predict import Predictor
from agepipe.samples import write_sample_photos
from agepipe.score import run_score
from agepipe.storage import StorageError

logger = logging.getLogger(__name__)
FALLBACK_DETECTOR = "dlib"


def usable_crop(settings: ScoreSettings) -> ScoringCrop:
    """The scoring crop of `settings` when the model's own detector loads here, else with the zero-download
    detector."""
    try:
        _ = Predictor.from_settings(settings).detector
    except (StorageError, ValueError) as exc:
        logger.warning("the model's detector is not available here (%s); using %s", exc, FALLBACK_DETECTOR)
        return dataclasses.replace(settings.crop_overrides, detector=FALLBACK_DETECTOR)
    return settings.crop_overrides


def quiet_local_ray() -> None:
    """A local Ray that keeps its start-up and progress logs to itself: the demo's few photos take seconds,
    and its closing table is what a newcomer should see."""
    import ray.data

    init_ray(logging_level=logging.WARNING, log_to_driver=False, include_dashboard=False)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    logging.getLogger("ray").setLevel(logging.WARNING)


def run_demo(settings: DemoSettings) -> dict[str, Any]:
    """Photos -> scores (Parquet) -> report (HTML), all under `settings.output`."""
    output = settings.output
    quiet_local_ray()
    photos = write_sample_photos(Path(output) / "photos")
    scoring = ScoreSettings(input=str(photos), output=f"{output}/scores")
    scoring.crop_overrides = crop = usable_crop(scoring)
    summary = run_score(scoring)
    report = run_evaluate(
        EvaluateSettings(predictions=scoring.output, output=f"{output}/report", crop_overrides=crop, gradcam_faces=4)
    )
    return {"summary": summary, "report": report["report"], "faces": faces_table(pd.read_parquet(scoring.output))}


def faces_table(scores: pd.DataFrame) -> str:
    """Each photo and what was found in it, one line per face (its age, the age's interval, group, gender and
    box), as a plain-text table."""
    lines = [f"{'photo':<16} {'face':>4}  {'age':>5}  {'interval':<9} {'age group':<11} {'gender':<7} box"]
    for row in scores.sort_values(["path", "face_index"]).itertuples():
        name = Path(row.path).name
        if pd.isna(row.face_index):
            lines.append(f"{name:<16} {'-':>4}  {'':>5}  {row.error or '':<11}")
            continue
        box = ",".join(f"{v:.0f}" for v in (row.x1, row.y1, row.x2, row.y2))
        interval = "-" if pd.isna(row.age_low) else f"{row.age_low:.0f}-{row.age_high:.0f}"
        face = f"{int(row.face_index):>4}  {row.age:5.1f}  {interval:<9} {row.age_group:<11} {row.gender:<7}"
        lines.append(f"{name:<16} {face} {box}")
    return "\n".join(lines)

"""The main job on local defaults: score real photos with the default model and write the report.

Runs on a laptop with no cluster, no GPU and no downloads: the photos ship with
scikit-image, the model with agepipe. When the model's recorded detector weights
cannot be had here, the zero-download detector stands in (and says so).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from agepipe.config import EvaluateSettings, ScoreSettings
from agepipe.evaluate import run_evaluate
from agepipe.predict import Predictor
from agepipe.samples import write_sample_photos
from agepipe.score import run_score
from agepipe.storage import StorageError

logger = logging.getLogger(__name__)
FALLBACK_DETECTOR = "dlib"


def usable_crop_overrides(model: str | None = None) -> dict[str, Any]:
    """No overrides when the model's own detector loads here, else the zero-download detector."""
    try:
        _ = Predictor(model).detector
    except (StorageError, ValueError) as exc:
        logger.warning("the model's detector is not available here (%s); using %s", exc, FALLBACK_DETECTOR)
        return {"detector": FALLBACK_DETECTOR, "detector_weights": None}
    return {}


def run_demo(output: str) -> dict[str, Any]:
    """Photos -> scores (Parquet) -> report (HTML), all under `output`."""
    photos = write_sample_photos(Path(output) / "photos")
    overrides = usable_crop_overrides()
    scores = f"{output}/scores"
    summary = run_score(ScoreSettings(input=str(photos), output=scores, crop_overrides=overrides))
    report = run_evaluate(
        EvaluateSettings(predictions=scores, output=f"{output}/report", crop_overrides=overrides, gradcam_faces=4)
    )
    return {"summary": summary, "report": report["report"]}

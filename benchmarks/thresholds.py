"""Detector thresholds: recall and false faces at each `min_score`, on the in-the-wild composite photos
(`benchmarks/wild.py`) and on face-free photos, for every detector whose weights are here.

    .venv/bin/python benchmarks/thresholds.py [--photos 300] [--seed 1] [--results thresholds]

Each detector runs once at a low threshold; every row keeps the detections scoring at least its
`min_score` (the rule every detector applies), so the rows differ only in the threshold.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from agepipe.config import DETECTOR_MIN_SCORES
from agepipe.detectors import create_detector
from agepipe.model import DEFAULT_MODEL
from agepipe.result_tables import write_results
from agepipe.shared_data import UTKFACE, YUNET
from agepipe.wild import build_photos, face_free_set, held_out_faces, match_faces

GRIDS = {
    "yunet": (0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9),
    "dlib": (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8),
}
WEIGHTS = {"yunet": YUNET, "dlib": None}


def detections(detector_name: str, paths: list[Path], lowest: float) -> pd.DataFrame:
    """Every detection at `lowest` and above: path, box, score."""
    detector = create_detector(detector_name, WEIGHTS[detector_name], lowest)
    rows = []
    for path in paths:
        image = np.asarray(Image.open(path).convert("RGB"))
        for face in detector.detect([image])[0]:
            rows.append({"path": str(path), **dict(zip(("x1", "y1", "x2", "y2"), face.box, strict=True)),
                         "score": face.score})  # fmt: skip
    return pd.DataFrame(rows, columns=["path", "x1", "y1", "x2", "y2", "score"])


def threshold_rows(detector_name: str, truth: pd.DataFrame, photos: list[Path], free: list[Path]) -> list[dict]:
    grid = GRIDS[detector_name]
    on_photos = detections(detector_name, photos, min(grid))
    on_free = detections(detector_name, free, min(grid))
    rows = []
    for threshold in grid:
        kept = on_photos[on_photos["score"] >= threshold].assign(pred_age=0.0)
        matched, false_faces = match_faces(truth, kept.rename(columns={"pred_age": "age"}))
        free_kept = on_free[on_free["score"] >= threshold]
        rows.append(
            {
                "detector": detector_name,
                "min_score": threshold,
                "default": "yes" if threshold == DETECTOR_MIN_SCORES[detector_name] else "",
                "recall": float(matched["pred_age"].notna().mean()),
                "false faces / composite photo": false_faces / len(photos),
                "face-free photos with a face": f"{free_kept['path'].nunique()} / {len(free)}",
                "faces on face-free photos": len(free_kept),
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", type=int, default=300)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--split", type=Path, default=DEFAULT_MODEL.parent / "default_split.parquet")
    parser.add_argument("--results", default="thresholds")
    args = parser.parse_args()
    faces = held_out_faces(args.split, UTKFACE)
    with tempfile.TemporaryDirectory() as scratch:
        truth = build_photos(faces, Path(scratch) / "photos", args.photos, args.seed)
        photos = sorted((Path(scratch) / "photos").glob("*.jpg"))
        free = face_free_set(Path(scratch) / "face-free", args.seed)
        rows = [row for name in GRIDS for row in threshold_rows(name, truth, photos, free)]
    write_results(
        args.results,
        rows,
        [
            f"`benchmarks/thresholds.py --photos {args.photos} --seed {args.seed}`: {len(truth)} faces in "
            f"{args.photos} composite photos (as `benchmarks/wild.py` builds them, from the test split); "
            f"{len(free)} face-free photos (scikit-image's face-free photos whole and 4 random crops of each).",
            "A detection is a true face when it matches a placed face (box centre within a third of the face "
            "size); YOLO is not in the table: no YOLO face weights are on this machine.",
        ],
    )


if __name__ == "__main__":
    main()

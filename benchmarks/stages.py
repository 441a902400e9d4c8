"""Per-stage rates of scoring a photo on one CPU core: decode, detect (YuNet), crop, the model per face.

    .venv/bin/python benchmarks/stages.py [--photos 200] [--results stages]

The photos are the in-the-wild composites (`benchmarks/wild.py`: 640x480 to 800x600 JPEGs, 0-4 faces).
Each stage runs over all photos (or their faces) in one thread, three times; the median is reported.
`benchmarks/scale.md` plans a 100-million-image run from these rates.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import cv2
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import median, write_results  # noqa: E402
from wild import YUNET, build_photos, held_out_faces  # noqa: E402

from agepipe.config import CropSettings, shared_data_dir  # noqa: E402
from agepipe.faces import create_detector, crop_face  # noqa: E402
from agepipe.images import decode  # noqa: E402
from agepipe.predict import DEFAULT_MODEL, Predictor  # noqa: E402


def timed(work, repeats: int = 3) -> float:
    """Median seconds of `repeats` calls."""
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        work()
        seconds.append(time.perf_counter() - started)
    return median(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", type=int, default=200)
    parser.add_argument("--results", default="stages")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    faces = held_out_faces(DEFAULT_MODEL.parent / "default_split.parquet", shared_data_dir() / "data" / "utkface")
    with tempfile.TemporaryDirectory() as scratch:
        build_photos(faces, Path(scratch), args.photos, seed=5)
        payloads = [p.read_bytes() for p in sorted(Path(scratch).glob("*.jpg"))]
    images = [decode(p) for p in payloads]
    detector = create_detector("yunet", YUNET)
    found = [detector.detect([image])[0] for image in images]
    settings = CropSettings(detector="yunet", size=224)
    crops = [
        crop_face(image, face, settings)[0] for image, faces_of in zip(images, found, strict=True) for face in faces_of
    ]
    predictor = Predictor(runtime="onnx")
    predictor.predict_crops(crops[:64])  # the session opens on first use
    stages = {
        "decode (JPEG)": (timed(lambda: [decode(p) for p in payloads]), len(payloads), "photos"),
        "detect (YuNet)": (timed(lambda: [detector.detect([i]) for i in images]), len(images), "photos"),
        "crop (box, 224 px)": (
            timed(lambda: [crop_face(i, f, settings) for i, fs in zip(images, found, strict=True) for f in fs]),
            len(crops),
            "faces",
        ),
        "model (onnxruntime, batch 64)": (timed(lambda: predictor.predict_crops(crops)), len(crops), "faces"),
    }
    rows = [
        {
            "stage": name,
            "items": f"{count} {unit}",
            "per item ms": 1000 * seconds / count,
            "per core / s": count / seconds,
        }
        for name, (seconds, count, unit) in stages.items()
    ]
    faces_per_photo = len(crops) / len(images)
    per_photo = sum(1000 * s / c * (faces_per_photo if u == "faces" else 1) for s, c, u in stages.values())
    write_results(
        args.results,
        rows,
        [
            f"`benchmarks/stages.py --photos {args.photos}`: one thread (torch, OpenCV, onnxruntime), medians of 3 "
            f"passes; {faces_per_photo:.2f} faces per photo found by YuNet.",
            f"All stages for one photo: {per_photo:.1f} ms on one core ({1000 / per_photo:.1f} photos/s per core).",
        ],
    )


if __name__ == "__main__":
    main()

"""Per-stage rates of scoring a photo on one CPU core: decode, detect (YuNet), crop, the model per face.

    .venv/bin/python benchmarks/stages.py [--photos 200] [--results stages]

The photos are the in-the-wild composites (`benchmarks/wild.py`: 640x480 to 800x600 JPEGs, 0-4 faces).
Each stage runs over all photos (or their faces) in one thread, three times; the median is reported.
Beside them, the scoring job itself (`run_score`, every face, local Ray on all CPUs, started once) over
the same photos, three times: its photos/s per core against the sum of the stages gives the job's
overhead. `benchmarks/scale.md` plans a 100-million-image run from these rates.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path
from statistics import median

import cv2
import torch

from agepipe.config import CropSettings, ScoreSettings
from agepipe.detectors import create_detector
from agepipe.faces import crop_face
from agepipe.images import decode, encode
from agepipe.model import DEFAULT_MODEL
from agepipe.predict import Predictor
from agepipe.result_tables import write_results
from agepipe.score import run_score
from agepipe.shared_data import UTKFACE, YUNET
from agepipe.wild import build_photos, held_out_faces


def timed(work, repeats: int = 3) -> float:
    """Median seconds of `repeats` calls."""
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        work()
        seconds.append(time.perf_counter() - started)
    return median(seconds)


def score_job_seconds(scratch: Path, repeats: int) -> float:
    """Median seconds of the scoring job over `scratch/photos`, every face, into a fresh output each run."""
    import ray

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    seconds = []
    for run in range(repeats):
        output, crop = str(scratch / f"scores-{run}"), {"detector_weights": YUNET}
        settings = ScoreSettings(input=str(scratch / "photos"), output=output, crop_overrides=crop)
        started = time.perf_counter()
        run_score(settings)
        seconds.append(time.perf_counter() - started)
    ray.shutdown()
    return median(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", type=int, default=200)
    parser.add_argument("--large", type=int, default=20, help="photos also timed at 4000x3000")
    parser.add_argument("--results", default="stages")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    faces = held_out_faces(DEFAULT_MODEL.parent / "default_split.parquet", UTKFACE)
    scratch = Path(tempfile.mkdtemp())
    build_photos(faces, scratch / "photos", args.photos, seed=5)
    payloads = [p.read_bytes() for p in sorted((scratch / "photos").glob("*.jpg"))]
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
        "crop (landmarks, 224 px)": (
            timed(lambda: [crop_face(i, f, settings) for i, fs in zip(images, found, strict=True) for f in fs]),
            len(crops),
            "faces",
        ),
        "model (onnxruntime, batch 64)": (timed(lambda: predictor.predict_crops(crops)), len(crops), "faces"),
    }
    # Phone-camera sizes: the first photos upscaled to 4000x3000, the same JPEG quality.
    large = [encode(cv2.resize(image, (4000, 3000)), "jpeg", 90) for image in images[: args.large]]
    large_images = [decode(p) for p in large]
    large_stages = {
        "decode (JPEG, 4000x3000)": (timed(lambda: [decode(p) for p in large]), len(large), "photos"),
        "detect (YuNet, 4000x3000)": (
            timed(lambda: [detector.detect([i]) for i in large_images]),
            len(large),
            "photos",
        ),
    }
    job_seconds = score_job_seconds(scratch, repeats=3)
    shutil.rmtree(scratch)
    rows = [
        {
            "stage": name,
            "items": f"{count} {unit}",
            "per item ms": 1000 * seconds / count,
            "per core / s": count / seconds,
        }
        for name, (seconds, count, unit) in {**stages, **large_stages}.items()
    ]
    faces_per_photo = len(crops) / len(images)
    per_photo = sum(1000 * s / c * (faces_per_photo if u == "faces" else 1) for s, c, u in stages.values())
    cores = os.cpu_count() or 1
    rows.append(
        {
            "stage": f"scoring job, {cores} cores (run_score, local Ray)",
            "items": f"{len(images)} photos",
            "per item ms": 1000 * job_seconds * cores / len(images),
            "per core / s": len(images) / job_seconds / cores,
        }
    )
    write_results(
        args.results,
        rows,
        [
            f"`benchmarks/stages.py --photos {args.photos}`: one thread (torch, OpenCV, onnxruntime), medians of 3 "
            f"passes; {faces_per_photo:.2f} faces per photo found by YuNet.",
            f"All stages for one photo: {per_photo:.1f} ms on one core ({1000 / per_photo:.1f} photos/s per core).",
            f"The scoring job: {len(images) / job_seconds:.1f} photos/s on {cores} cores, median of 3 runs "
            f"({len(images) / job_seconds / cores / (1000 / per_photo):.2f} of the stages' sum per core).",
        ],
    )


if __name__ == "__main__":
    main()

"""Crop job: images/s and peak memory, Ray Data path vs a plain single-process loop, side by side.

    .venv/bin/python benchmarks/crop.py [--sizes 1000 5000 0] [--repeats 3 3 1]

Size 0 means every UTKFace image. Writes results/crop.md and results/crop.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

import pyarrow.parquet as pq

from agepipe import labels as labels_lib
from agepipe import storage
from agepipe.batch import rows_to_table
from agepipe.config import CropJobSettings, CropSettings, LabelSettings
from agepipe.crop import CROP_SCHEMA, crop_rows, run_crop
from agepipe.detectors import create_detector
from agepipe.peak_memory import PeakMemory
from agepipe.result_tables import write_results
from agepipe.shared_data import YUNET, linked_folder, utkface_files


def job_settings(input_dir: Path, output: Path, detector: str) -> CropJobSettings:
    return CropJobSettings(
        input=str(input_dir),
        output=str(output),
        crop=CropSettings(detector=detector, detector_weights=YUNET if detector == "yunet" else None),
        labels=LabelSettings(kind="utkface"),
    )


def plain_loop(settings: CropJobSettings) -> dict:
    """Decode, detect, crop, encode and write Parquet in one process, one image at a time."""
    started = time.perf_counter()
    paths, _ = storage.list_images(settings.input)
    detector = create_detector(settings.crop.detector, settings.crop.detector_weights, settings.crop.min_score)
    label_fn = labels_lib.label_source(settings.labels, settings.input)
    os.makedirs(settings.output, exist_ok=True)
    rows: list[dict] = []
    files = 0
    for path in paths:
        rows.extend(crop_rows([path], detector, settings.crop, label_fn, settings.labels))
        if len(rows) >= settings.batch_size:
            pq.write_table(rows_to_table(rows, CROP_SCHEMA), f"{settings.output}/part-{files}.parquet")
            rows, files = [], files + 1
    if rows:
        pq.write_table(rows_to_table(rows, CROP_SCHEMA), f"{settings.output}/part-{files}.parquet")
    return {"images": len(paths), "seconds": time.perf_counter() - started}


def run_plain(input_dir: Path, output: Path, detector: str) -> tuple[float, float]:
    """The plain loop in a fresh process (so its memory is its own): images/s and peak MiB."""
    command = [sys.executable, __file__, "--plain", str(input_dir), str(output), detector]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    with PeakMemory(process.pid) as memory:
        out, _ = process.communicate()
    result = json.loads(out.strip().splitlines()[-1])
    return result["images"] / result["seconds"], memory.peak_mib


def run_ray(input_dir: Path, output: Path, detector: str) -> tuple[float, float]:
    """The crop job on the already-started local Ray: images/s and peak MiB of driver + cluster."""
    with PeakMemory() as memory:
        summary = run_crop(job_settings(input_dir, output, detector))
    return summary.images_per_second, memory.peak_mib


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 5000, 0])
    parser.add_argument("--repeats", type=int, nargs="+", default=[3, 3, 1])
    parser.add_argument("--detectors", nargs="+", default=["none", "yunet"])
    parser.add_argument("--results", default="crop", help="name of the results files in benchmarks/results")
    parser.add_argument("--plain", nargs=3, metavar=("INPUT", "OUTPUT", "DETECTOR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.plain:
        input_dir, output, detector = args.plain
        print(json.dumps(plain_loop(job_settings(Path(input_dir), Path(output), detector))))
        return

    import ray

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for size, repeats in zip(args.sizes, args.repeats, strict=True):
            files = utkface_files(size or None)
            input_dir = linked_folder(files, Path(scratch) / f"in-{len(files)}")
            for detector in args.detectors:
                ray_runs, plain_runs = [], []
                for repeat in range(repeats):
                    ray_runs.append(
                        run_ray(input_dir, Path(scratch) / f"ray-{len(files)}-{detector}-{repeat}", detector)
                    )
                    plain_runs.append(
                        run_plain(input_dir, Path(scratch) / f"plain-{len(files)}-{detector}-{repeat}", detector)
                    )
                ray_ips, plain_ips = median([r[0] for r in ray_runs]), median([p[0] for p in plain_runs])
                rows.append(
                    {
                        "images": len(files),
                        "detector": detector,
                        "runs": repeats,
                        "ray images/s": ray_ips,
                        "ray runs, in order": " / ".join(f"{r[0]:.0f}" for r in ray_runs),
                        "plain images/s": plain_ips,
                        "ray / plain": ray_ips / plain_ips,
                        "ray peak MiB": median([r[1] for r in ray_runs]),
                        "plain peak MiB": median([p[1] for p in plain_runs]),
                    }
                )
                print(rows[-1], flush=True)
    ray.shutdown()
    notes = [
        f"{os.cpu_count()} CPUs; medians of `runs` runs; Ray started once before timing (a running cluster).",
        "Ray path: `run_crop` with one detector actor per CPU; plain: the same crop_rows() per image in one "
        "process, one Parquet file per 500 images, as the job writes. Runs alternate Ray and plain.",
        "Peak MiB: summed RSS of the process tree (Ray: driver, raylet, workers); shared pages count once per process.",
    ]
    write_results(args.results, rows, notes)


if __name__ == "__main__":
    main()

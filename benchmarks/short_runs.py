"""The test suite's short training run, with and without balancing copies, side by side in one sitting.

    .venv/bin/python benchmarks/short_runs.py [--images 240] [--repeats 2]

Each run is `agepipe train` in a fresh process on a crop dataset of `--images` UTKFace faces (as the
suite's `small_faces`), with the suite's settings (`tests/helpers.TINY_RUN`, one phase-1 and two
phase-2 epochs), once with the default `--min-per-age` and once with 1, alternated. Reports wall-clock
seconds, training rows an epoch and the last epoch's seconds. Writes
results/short-runs.md and .json.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from common import linked_folder, median, utkface_files, write_results  # noqa: E402
from helpers import TINY_RUN, run_cli  # noqa: E402

from agepipe.config import TrainSettings  # noqa: E402


def agepipe(*args: str) -> float:
    """Seconds `agepipe ARGS` takes in a fresh process, as the suite runs it (`helpers.run_cli`)."""
    started = time.perf_counter()
    result = run_cli(*args)
    if result.returncode != 0:
        raise SystemExit(result.stderr[-3000:])
    return time.perf_counter() - started


def last_epoch_seconds(run: Path) -> float:
    """Seconds between the last two checkpoints (Ray Train keeps two): the last epoch with its report."""
    first, last = sorted(p.stat().st_mtime for p in (run / "ray_train").glob("checkpoint_*"))[-2:]
    return last - first


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=240)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    # TINY_RUN's own --min-per-age is overridden by the one each run adds: argparse keeps the last.
    base = [*TINY_RUN, "--phase1-epochs", "1", "--phase2-epochs", "2", "--patience", "10"]
    default = str(TrainSettings().min_per_age)
    variants = {f"min-per-age {default} (the default)": default, "min-per-age 1 (the suite's)": "1"}
    runs: dict[str, list[dict]] = {name: [] for name in variants}
    with tempfile.TemporaryDirectory() as scratch:
        images = linked_folder(utkface_files(args.images), Path(scratch) / "images")
        data = Path(scratch) / "faces"
        agepipe("crop", "--input", str(images), "--output", str(data), "--labels", "utkface",
                "--detector", "none", "--size", "96")  # fmt: skip
        for repeat in range(args.repeats):
            for name, min_per_age in variants.items():
                output = Path(scratch) / f"run-{min_per_age}-{repeat}"
                seconds = agepipe("train", "--data", str(data), "--output", str(output), *base,
                                  "--min-per-age", min_per_age)  # fmt: skip
                split = pd.read_parquet(output / "split.parquet")
                rows = int(split["copies"].sum())
                runs[name].append({"seconds": seconds, "rows": rows, "epoch": last_epoch_seconds(output)})
                print(name, runs[name][-1], flush=True)
    table = [
        {
            "variant": name,
            "runs": len(results),
            "training rows an epoch": results[0]["rows"],
            "wall seconds (median)": median([r["seconds"] for r in results]),
            "last epoch seconds (median)": median([r["epoch"] for r in results]),
        }
        for name, results in runs.items()
    ]
    notes = [
        f"{args.images} UTKFace faces cropped with `--detector none --size 96`; `agepipe train {' '.join(base)}`, "
        "then the variant's `--min-per-age` (the last given wins); each run a fresh process that starts its own "
        "Ray, the variants alternated.",
        "Wall seconds include Ray's start, the worker group's start, three epochs and the export; the last epoch "
        "is the time between the last two checkpoints.",
    ]
    write_results("short-runs", table, notes)


if __name__ == "__main__":
    main()

"""Training recipes side by side: same seeded subset, split and seed, one setting changed per variant.

    .venv/bin/python scripts/compare_recipes.py --data out/faces-utk --limit 5000 \
        --variant base --variant all-stages:unfreeze_stages=9 --variant age-weight:age_loss_weight=5

A variant is `name[:setting=value,...]` over `TrainSettings` (the `agepipe train` defaults otherwise).
Each trains through `agepipe train`'s own code; the validation metrics of each run's best epoch are
printed and written to benchmarks/results/<name>.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from common import write_results  # noqa: E402

from agepipe.config import TrainSettings, apply_overrides  # noqa: E402
from agepipe.train import run_training  # noqa: E402


def parse_variant(text: str) -> tuple[str, dict]:
    """`name:key=value,key=value` -> (name, {key: value}); values parsed as YAML scalars."""
    name, _, assignments = text.partition(":")
    overrides = {}
    for assignment in filter(None, assignments.split(",")):
        key, _, value = assignment.partition("=")
        overrides[key.strip()] = yaml.safe_load(value)
    return name, overrides


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", required=True)
    parser.add_argument("--limit", type=int, default=5000)
    parser.add_argument("--phase1-epochs", type=int, default=1)
    parser.add_argument("--phase2-epochs", type=int, default=2)
    parser.add_argument("--variant", action="append", required=True, help="name[:setting=value,...]")
    parser.add_argument("--results", default="recipes", help="results file name in benchmarks/results")
    args = parser.parse_args()
    base = TrainSettings(
        data=args.data, limit=args.limit, phase1_epochs=args.phase1_epochs, phase2_epochs=args.phase2_epochs
    )
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for name, overrides in map(parse_variant, args.variant):
            settings = apply_overrides(dataclasses.replace(base, output=str(Path(scratch) / name)), overrides)
            started = time.perf_counter()
            run_training(settings)
            minutes = (time.perf_counter() - started) / 60
            history = pd.read_csv(Path(settings.output) / "metrics.csv")
            best = history.loc[history["val_mae"].idxmin()]
            rows.append(
                {
                    "variant": name,
                    "changes": ", ".join(f"{k}={v}" for k, v in overrides.items()) or "none",
                    "faces": args.limit,
                    "epochs": len(history),
                    "best epoch": int(best["epoch"]),
                    "val MAE": round(float(best["val_mae"]), 2),
                    "val age-group acc": round(float(best["val_group_accuracy"]), 3),
                    "val gender acc": round(float(best["val_gender_accuracy"]), 3),
                    "minutes": round(minutes, 1),
                }
            )
            print(rows[-1], flush=True)
    write_results(
        args.results,
        rows,
        [
            f"Same seeded subset of {args.limit} faces, split, {args.phase1_epochs}+{args.phase2_epochs} epochs; "
            "each variant changes only the listed settings from the `agepipe train` defaults; metrics of each "
            "run's best validation epoch. Command: `scripts/compare_recipes.py " + " ".join(sys.argv[1:]) + "`.",
        ],
    )


if __name__ == "__main__":
    main()

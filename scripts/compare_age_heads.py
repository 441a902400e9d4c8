"""Label-distribution age head against plain regression: same data, split, schedule and seed.

    .venv/bin/python scripts/compare_age_heads.py --data out/faces-utk [--limit 6000]

Trains both on a seeded subset through `agepipe train`'s own code and prints the validation metrics
of each one's best epoch; writes benchmarks/results/age_heads.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from common import write_results  # noqa: E402

from agepipe.config import TrainSettings  # noqa: E402
from agepipe.train import run_training  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", required=True)
    parser.add_argument("--limit", type=int, default=6000)
    parser.add_argument("--phase1-epochs", type=int, default=1)
    parser.add_argument("--phase2-epochs", type=int, default=2)
    args = parser.parse_args()
    base = TrainSettings(
        data=args.data, limit=args.limit, phase1_epochs=args.phase1_epochs, phase2_epochs=args.phase2_epochs
    )
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for head in ("distribution", "regression"):
            settings = dataclasses.replace(base, age_head=head, output=str(Path(scratch) / head))
            run_training(settings)
            history = pd.read_csv(Path(settings.output) / "metrics.csv")
            best = history.loc[history["val_mae"].idxmin()]
            rows.append(
                {
                    "age head": head,
                    "faces": args.limit,
                    "epochs": len(history),
                    "best epoch": int(best["epoch"]),
                    "val MAE": float(best["val_mae"]),
                    "val age-group acc": float(best["val_group_accuracy"]),
                    "val gender acc": float(best["val_gender_accuracy"]),
                }
            )
            print(rows[-1], flush=True)
    write_results(
        "age_heads",
        rows,
        [
            f"Same seeded subset of {args.limit} faces, split, {args.phase1_epochs}+{args.phase2_epochs} epochs, "
            "and every other setting at the `agepipe train` defaults; metrics of each run's best validation epoch.",
        ],
    )


if __name__ == "__main__":
    main()

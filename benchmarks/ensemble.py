"""Ensembles: trained networks scored as one model (`agepipe export --model A B ...`), beside each alone.

    .venv/bin/python benchmarks/ensemble.py --faces out/faces-landmarks --models A.pt B.pt [C.pt ...] [--soups]

Each model alone and every combination of two or more of them, exported as an ensemble checkpoint with
`model.export_for_sharing` as the command does, scored on the same held-out test faces as the crop dataset
holds them (aligned), flip TTA off. The models must share one split (`--split`, the test faces); a
combination of networks of other crops or model configs is left out with a line, as `agepipe export`
refuses it. `--soups` also scores each combination's weights averaged into one network (a "model soup",
BatchNorm statistics averaged too), which costs one network's time: it works only for networks in one
basin, such as a run fine-tuned from another (`agepipe train --initial-checkpoint`). `--speed-images N`
also times the scoring job (`agepipe score`, detection included) on N test images with the first model
and with all of them as one ensemble, alternating, and gives each one's median images/s of three runs.
A second table, `<name>-by-age-group`, gives each one's MAE and bias per labelled age group.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import (  # noqa: E402
    UTKFACE,
    age_group_row,
    linked_folder,
    median,
    split_crops,
    split_row,
    split_summary,
    write_results,
)
from score import score_job  # noqa: E402

from agepipe.model import DEFAULT_MODEL, export_for_sharing, read_checkpoint, save_checkpoint  # noqa: E402
from agepipe.predict import Predictor  # noqa: E402


def weight_average(sources: list[str], target: str) -> None:
    """One checkpoint whose every float tensor is the mean of the sources' (the first's other entries)."""
    checkpoints = [read_checkpoint(source) for source in sources]
    state = {
        name: torch.stack([c["state_dict"][name].float() for c in checkpoints]).mean(0) if tensor.is_floating_point()
        else tensor
        for name, tensor in checkpoints[0]["state_dict"].items()
    }  # fmt: skip
    save_checkpoint({**checkpoints[0], "state_dict": state}, target)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--faces", required=True, help="the crop dataset the models were trained from")
    parser.add_argument("--models", nargs="+", required=True, help="checkpoints, named in the table by their place")
    parser.add_argument("--split", default=str(DEFAULT_MODEL.with_name("default_split.parquet")))
    parser.add_argument("--name", default="ensemble", help="results file name under benchmarks/results")
    parser.add_argument("--soups", action="store_true", help="also score each combination's weights averaged")
    parser.add_argument("--speed-images", type=int, default=0, help="time the scoring job on this many test images")
    args = parser.parse_args()

    frame, crops = split_crops(args.faces, args.split)
    rows, group_rows = [], []
    with tempfile.TemporaryDirectory() as scratch:
        for size in range(1, len(args.models) + 1):
            for members in itertools.combinations(range(len(args.models)), size):
                model = args.models[members[0]]
                names = " + ".join(str(i + 1) for i in members)
                if size > 1:
                    model = str(Path(scratch) / f"ensemble-{'-'.join(map(str, members))}.pt")
                    try:
                        export_for_sharing([args.models[i] for i in members], model)
                    except ValueError as refusal:  # networks of other configs or crops are no one model
                        print(f"{names}: not one ensemble ({refusal})", flush=True)
                        continue
                scored = [(names, model)]
                if size > 1 and args.soups:
                    soup = str(Path(scratch) / f"soup-{'-'.join(map(str, members))}.pt")
                    weight_average([args.models[i] for i in members], soup)
                    scored.append((f"soup of {names}", soup))
                for label, checkpoint in scored:
                    summary = split_summary(Predictor(checkpoint, flip_tta=False).predict_crops(crops), frame)
                    rows.append({"models": label, **split_row(summary), "checkpoint": checkpoint})
                    group_rows.append({"models": label, **age_group_row(summary)})
                    print(rows[-1], flush=True)
        if args.speed_images:
            ensembles = [row for row in rows[1:] if not row["models"].startswith("soup")]
            timed = [rows[0], *ensembles[-1:]]
            names = frame["name"][: args.speed_images]
            images = linked_folder([UTKFACE / name for name in names], Path(scratch) / "images")
            rates: list[list[float]] = [[] for _ in timed]
            for attempt in range(3):
                for index, row in enumerate(timed):
                    output = Path(scratch) / f"scored-{attempt}-{index}"
                    rates[index].append(score_job(images, output, {}, model=row["checkpoint"])[0])
            for row, row_rates in zip(timed, rates, strict=True):
                row["score images/s"] = median(row_rates)
    for row in rows:
        del row["checkpoint"]
        if args.speed_images:
            row.setdefault("score images/s", float("nan"))
    accuracy_notes = [
        f"`python benchmarks/ensemble.py --faces {args.faces} --models {' '.join(args.models)}"
        f"{' --soups' if args.soups else ''}{f' --speed-images {args.speed_images}' if args.speed_images else ''}`",
        "models: " + "; ".join(f"{i + 1}: `{model}`" for i, model in enumerate(args.models)),
        "the test split's faces as the crop dataset holds them (aligned), flip TTA off; an ensemble runs "
        "each of its networks on every face (its model time is the sum of theirs)",
    ]
    notes = list(accuracy_notes)
    if args.speed_images:
        notes.append(
            f"score images/s: `agepipe score` (YuNet detection, every face, flip TTA off) on {args.speed_images} test "
            "images, the first model and the largest ensemble alternating, median of 3 runs each"
        )
    write_results(args.name, rows, notes)
    write_results(f"{args.name}-by-age-group", group_rows, [*accuracy_notes, "MAE and bias per labelled age group"])


if __name__ == "__main__":
    main()

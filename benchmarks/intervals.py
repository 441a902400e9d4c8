"""Age intervals: which adaptive split-conformal interval to ship, measured on the held-out faces.

    .venv/bin/python benchmarks/intervals.py --faces out/faces-valtest [--model agepipe/weights/default.pt]

Each network of the model scores the val and test faces as the crop dataset holds them (aligned, flip TTA
off); the model's age is their mean (an ensemble's regression age). Each kind of interval is fitted on the
val faces as `calibrate.fit_calibration` fits one (scale on one half, conformal quantile on the other) and
measured on the test faces: coverage and mean width overall, and the lowest coverage over the age groups,
genders and races. Kinds: plain (the age ± one width), shifted and scaled by the predicted age (what ships:
`calibrate.fit_calibration`), scaled by the predicted age about the age itself, scaled by the ensemble
members' disagreement (their ages' standard deviation), by both, and the fixed band ±(3 + age/4) from issue
37 for reference.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import held_out_parser, split_crops, write_results  # noqa: E402

from agepipe.calibrate import DEFAULT_LEVEL, conformal_quantile, fit_calibration, fit_curves  # noqa: E402
from agepipe.metrics import GROUPINGS, interval_summary  # noqa: E402
from agepipe.model import age_estimate, load_checkpoint, model_input, networks  # noqa: E402

Scale = Callable[[pd.DataFrame], np.ndarray]


@torch.inference_mode()
def member_ages(model_uri: str, crops: list[np.ndarray], batch: int = 64) -> np.ndarray:
    """(faces, networks) ages of each network of the model."""
    model, _, _ = load_checkpoint(model_uri)
    columns = []
    for network in networks(model):
        ages = []
        for start in range(0, len(crops), batch):
            images = torch.from_numpy(np.stack(crops[start : start + batch])).permute(0, 3, 1, 2)
            output = network(model_input(images, network.config.image_size))
            ages.append(age_estimate(output["age"], network.config)[0].numpy())
        columns.append(np.concatenate(ages))
    return np.stack(columns, axis=1)


def fit_scale(fit: pd.DataFrame, by: list[str]) -> Scale:
    """A scale about the age itself: the product of one curve of mean absolute error per column of `by`, each
    fitted in turn on the errors left by the ones before (binned as `fit_curves` bins: its mean-error curve of
    absolute errors is their mean)."""
    curves = []
    residual = (fit["label_age"] - fit["age"]).abs().to_numpy()
    for column in by:
        knots, means, _ = fit_curves(fit[column].to_numpy(), residual)
        curves.append((column, knots, np.maximum(means, 0.5)))
        residual = residual / np.interp(fit[column], knots, curves[-1][2])

    def scale(frame: pd.DataFrame) -> np.ndarray:
        product = np.ones(len(frame))
        for column, knots, means in curves:
            product *= np.interp(frame[column], knots, means)
        return product

    return scale


def scaled_interval(val: pd.DataFrame, test: pd.DataFrame, by: list[str], level: float) -> pd.DataFrame:
    """`test` with the age ± an interval scaled by `by`, fitted on `val` (curves on one half, seeded as
    calibrate's, quantile on the other)."""
    order = np.random.default_rng(0).permutation(len(val))
    fit, score = val.iloc[order[: len(val) // 2]], val.iloc[order[len(val) // 2 :]]
    scale = fit_scale(fit, by)
    q = conformal_quantile(((score["label_age"] - score["age"]).abs() / scale(score)).to_numpy(), level)
    half = q * scale(test)
    return test.assign(age_low=(test["age"] - half).clip(lower=0), age_high=(test["age"] + half).clip(upper=100))


def calibrated_interval(val: pd.DataFrame, test: pd.DataFrame, adaptive: bool, level: float) -> pd.DataFrame:
    """`test` with the interval that `calibrate.fit_calibration` fits on `val`."""
    calibration = fit_calibration(val["age"], val["label_age"], level, adaptive=adaptive)
    low, high = calibration.bounds(test["age"].to_numpy(), 100)
    return test.assign(age_low=low, age_high=high)


def summary_row(name: str, summary: dict) -> dict:
    """Coverage and width overall, and the lowest coverage of each grouping, that group named."""
    row = {"interval": name, **summary["overall"]}
    for grouping in GROUPINGS:
        worst = min(summary[f"by_{grouping}"], key=lambda group: group["coverage"])
        row[f"lowest {grouping.replace('_', ' ')}"] = f"{worst['coverage']:.3f} ({worst['group']})"
    return row


def main() -> None:
    parser = held_out_parser(__doc__.split("\n")[0], "intervals")
    parser.add_argument("--level", type=float, default=DEFAULT_LEVEL)
    args = parser.parse_args()
    frames = {}
    for split in ("val", "test"):
        frame, crops = split_crops(args.faces, args.split, split)
        ages = member_ages(args.model, crops)
        frames[split] = frame.assign(age=ages.mean(1), spread=ages.std(1))
        print(f"{split}: {len(frame)} faces, {ages.shape[1]} network(s)", flush=True)
    val, test = frames["val"], frames["test"]
    kinds = {
        "plain": calibrated_interval(val, test, False, args.level),
        "shifted and scaled by predicted age (shipped)": calibrated_interval(val, test, True, args.level),
        "scaled by predicted age": scaled_interval(val, test, ["age"], args.level),
    }
    if test["spread"].gt(0).any():
        kinds["scaled by members' disagreement"] = scaled_interval(val, test, ["spread"], args.level)
        kinds["scaled by predicted age x disagreement"] = scaled_interval(val, test, ["age", "spread"], args.level)
    band = 3 + test["age"] / 4
    kinds["fixed band ±(3 + age/4)"] = test.assign(age_low=test["age"] - band, age_high=test["age"] + band)
    rows, group_rows = [], []
    for name, measured in kinds.items():
        summary = interval_summary(measured)
        rows.append(summary_row(name, summary))
        group_rows += [{"interval": name, "age group": row.pop("group"), **row} for row in summary["by_age_group"]]
    notes = [
        f"`benchmarks/intervals.py --faces {args.faces} --model {args.model}`: fitted on {len(val)} val faces "
        f"at level {args.level}, measured on {len(test)} test faces (aligned, as the crop dataset holds them)",
        "lowest: the lowest coverage over that grouping's values (age group, gender, race), the group named",
    ]
    write_results(args.results, rows, notes)
    write_results(f"{args.results}-by-age-group", group_rows, notes[:1])


if __name__ == "__main__":
    main()

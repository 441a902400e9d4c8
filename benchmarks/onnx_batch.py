"""How many faces should one onnxruntime call take? Memory and model-only speed of `predict.OnnxRuntime` when a
scoring call of 256 faces (the scoring job's batch) runs `max_batch` faces at a time, each in a fresh process.

    .venv/bin/python benchmarks/onnx_batch.py [--models fast default] [--max-batches 256 128 64 32]

Memory: the process's RSS growth from before the session opens to after the timed calls, which is the session
and its CPU arena (onnxruntime keeps the arena at the largest batch it has run).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import psutil
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import write_results  # noqa: E402

from agepipe.model import load_checkpoint, model_location  # noqa: E402
from agepipe.predict import OnnxRuntime  # noqa: E402

FACES = 256


def measure(model: str, max_batch: int, repeats: int) -> dict:
    """One configuration, in this process: arena MiB and images/s (median of `repeats` calls)."""
    torch.set_num_threads(psutil.cpu_count())
    network, _, _ = load_checkpoint(model_location(model))
    runtime = OnnxRuntime(network, torch.device("cpu"))
    runtime.max_batch = max_batch
    size = network.config.image_size
    images = torch.rand(FACES, 3, size, size)
    before = psutil.Process().memory_info().rss
    runtime(images)
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        runtime(images)
        seconds.append(time.perf_counter() - start)
    growth = (psutil.Process().memory_info().rss - before) / 2**20
    return {"session and arena MiB": growth, "model-only images/s": FACES / statistics.median(seconds)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["fast", "default"])
    parser.add_argument("--max-batches", nargs="+", type=int, default=[256, 128, 64, 32])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--results", default="onnx-batch-memory")
    parser.add_argument("--one", nargs=2, help=argparse.SUPPRESS)  # internal: MODEL MAX_BATCH in this process
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one[0], int(args.one[1]), args.repeats)))
        return

    rows = []
    for model in args.models:
        for max_batch in args.max_batches:
            command = [sys.executable, __file__, "--one", model, str(max_batch), "--repeats", str(args.repeats)]
            result = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)
            rows.append({"model": model, "faces per onnxruntime run": max_batch, **result})
            print(rows[-1], flush=True)
    notes = [
        f"{psutil.cpu_count()} CPUs; each row a fresh process: the model exported to ONNX, a session with as many "
        f"threads as CPUs, then calls of {FACES} random faces at the model's input size, run `max_batch` at a time; "
        f"images/s: the median of {args.repeats} calls after one warm-up",
        "the scoring job runs one such session per actor (one actor per CPU)",
    ]
    write_results(args.results, rows, notes)


if __name__ == "__main__":
    main()

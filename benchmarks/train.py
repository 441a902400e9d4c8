"""Training throughput: Ray Train (DDP workers fed by Ray Data) vs a plain single-process PyTorch
loop with the same model, data, augmentation and batch size, side by side in one run.

    .venv/bin/python benchmarks/train.py [--images 2000] [--repeats 3] [--workers 1 2] [--precisions fp32 bf16]

Both sides do phase-2 steps as the defaults train them, in each training precision asked for. Writes
results/<name>.md and results/<name>.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
import time
from pathlib import Path
from statistics import median

import pandas as pd
import pyarrow.parquet as pq
import torch

from agepipe.augment import image_transform, to_tensors
from agepipe.config import CropJobSettings, CropSettings, LabelSettings, TrainSettings
from agepipe.crop import run_crop
from agepipe.model import AgeModel, freeze_backbone, set_train_mode
from agepipe.result_tables import write_results
from agepipe.shared_data import linked_folder, utkface_files
from agepipe.train import run_training
from agepipe.train_loop import PRECISIONS, model_config, multitask_loss, network_outputs


def plain_loop(settings: TrainSettings, data: Path, images: int) -> float:
    """Images/s of one process training on the crop dataset's rows, read once into memory."""
    torch.set_num_threads(os.cpu_count() or 1)
    table = pq.read_table(data, columns=["image", "age", "gender"]).to_pandas()
    table = table[table["age"].notna()].head(images)
    model = AgeModel(model_config(settings)).to(memory_format=torch.channels_last)
    freeze_backbone(model, settings.unfreeze_stages, settings.freeze_batchnorm)
    set_train_mode(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=settings.phase2_lr)
    transform = image_transform(settings.image_size, True, settings.augmentation)
    started = time.perf_counter()
    for start in range(0, len(table), settings.batch_size):
        rows = table.iloc[start : start + settings.batch_size]
        batch = to_tensors({c: rows[c].to_numpy() for c in rows}, transform, model.config.groups)
        outputs = network_outputs(model, batch["image"], settings.precision)
        loss, _ = multitask_loss(model, outputs, batch, settings)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return len(table) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="Ray Train worker counts to measure")
    parser.add_argument("--precisions", nargs="+", default=["fp32"], choices=sorted(PRECISIONS))
    parser.add_argument("--name", default="train", help="results file name under benchmarks/results")
    args = parser.parse_args()

    import ray

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    with tempfile.TemporaryDirectory() as scratch:
        images = linked_folder(utkface_files(args.images), Path(scratch) / "images")
        data = Path(scratch) / "faces"
        run_crop(
            CropJobSettings(
                input=str(images),
                output=str(data),
                crop=CropSettings(detector="none"),
                labels=LabelSettings(kind="utkface"),
            )
        )
        # Few held-out rows and no balancing: nearly every face is a training step on both sides.
        base = TrainSettings(
            data=str(data),
            phase1_epochs=0,
            phase2_epochs=1,
            val_fraction=0.05,
            test_fraction=0.0,
            max_per_age=10**6,
            min_per_age=0,
            max_failures=0,
        )
        ray_runs: dict[tuple[str, int], list[float]] = {
            (precision, workers): [] for precision in args.precisions for workers in args.workers
        }
        plain_runs: dict[str, list[float]] = {precision: [] for precision in args.precisions}
        for repeat in range(args.repeats):
            for precision, workers in ray_runs:
                settings = dataclasses.replace(
                    base,
                    num_workers=workers,
                    precision=precision,
                    output=str(Path(scratch) / f"run-{precision}-{workers}-{repeat}"),
                )
                run_training(settings)
                history = pd.read_csv(Path(settings.output) / "metrics.csv")
                ray_runs[precision, workers].append(float(history["train_images_per_s"].iloc[0]))
            for precision, runs in plain_runs.items():
                runs.append(plain_loop(dataclasses.replace(base, precision=precision), data, args.images))
            print({"ray": {k: r[-1] for k, r in ray_runs.items()}, "plain": {k: r[-1] for k, r in plain_runs.items()}})
    ray.shutdown()
    cpus = os.cpu_count() or 1
    rows = [
        {
            "images": args.images,
            "backbone": base.backbone,
            "image size": base.image_size,
            "batch": base.batch_size,
            "precision": precision,
            "runs": args.repeats,
            "ray workers x threads": f"{workers} x {max(1, cpus // workers)}",
            "ray train images/s": median(runs),
            "plain loop images/s": median(plain_runs[precision]),
            "ray / plain": median(runs) / median(plain_runs[precision]),
        }
        for (precision, workers), runs in ray_runs.items()
    ]
    notes = [
        f"{cpus} CPUs. Ray Train: DDP workers (gloo) with the CPUs split between them as threads; data through "
        "Ray Data (read, split filter, full shuffle; decode and augmentation in the workers). "
        f"`agepipe train` defaults to {TrainSettings().num_workers} worker(s).",
        "Plain: one process, all CPUs for torch, rows already in memory, same decode and augmentation.",
        "Both: phase-2 steps as the defaults train (every stage and its BatchNorm), AdamW; medians of `runs` runs.",
        "Precision: `TrainSettings.precision` (bf16: the network under torch.autocast, float32 weights).",
    ]
    write_results(args.name, rows, notes)


if __name__ == "__main__":
    main()

"""Training throughput: Ray Train (DDP workers fed by Ray Data) vs a plain single-process PyTorch
loop with the same model, data, augmentation and batch size, side by side in one run.

    .venv/bin/python benchmarks/train.py [--images 2000] [--repeats 3] [--workers 1 2]

Both sides do phase-2 steps (top stages unfrozen). Writes results/train.md and results/train.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import linked_folder, median, utkface_files, write_results  # noqa: E402

from agepipe.augment import image_transform, to_tensors  # noqa: E402
from agepipe.config import CropJobSettings, CropSettings, LabelSettings, TrainSettings  # noqa: E402
from agepipe.crop import run_crop  # noqa: E402
from agepipe.model import AgeModel, freeze_backbone, set_train_mode  # noqa: E402
from agepipe.train import run_training  # noqa: E402
from agepipe.train_loop import model_config, multitask_loss  # noqa: E402


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
        loss, _ = multitask_loss(model, model(batch["image"]), batch, settings)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return len(table) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="Ray Train worker counts to measure")
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
        ray_runs: dict[int, list[float]] = {workers: [] for workers in args.workers}
        plain_runs = []
        for repeat in range(args.repeats):
            for workers in args.workers:
                settings = dataclasses.replace(
                    base, num_workers=workers, output=str(Path(scratch) / f"run-{workers}-{repeat}")
                )
                run_training(settings)
                history = pd.read_csv(Path(settings.output) / "metrics.csv")
                ray_runs[workers].append(float(history["train_images_per_s"].iloc[0]))
            plain_runs.append(plain_loop(base, data, args.images))
            print({"ray": {w: r[-1] for w, r in ray_runs.items()}, "plain": plain_runs[-1]}, flush=True)
    ray.shutdown()
    plain_ips = median(plain_runs)
    cpus = os.cpu_count() or 1
    rows = [
        {
            "images": args.images,
            "backbone": base.backbone,
            "image size": base.image_size,
            "batch": base.batch_size,
            "runs": args.repeats,
            "ray workers x threads": f"{workers} x {max(1, cpus // workers)}",
            "ray train images/s": median(runs),
            "plain loop images/s": plain_ips,
            "ray / plain": median(runs) / plain_ips,
        }
        for workers, runs in ray_runs.items()
    ]
    notes = [
        f"{cpus} CPUs. Ray Train: DDP workers (gloo) with the CPUs split between them as threads; data through "
        "Ray Data (read, split filter, full shuffle; decode and augmentation in the workers). "
        f"`agepipe train` defaults to {TrainSettings().num_workers} worker(s).",
        "Plain: one process, all CPUs for torch, rows already in memory, same decode and augmentation.",
        "Both: phase-2 steps (top stages unfrozen, BatchNorm frozen), AdamW; medians of `runs` runs.",
    ]
    write_results("train", rows, notes)


if __name__ == "__main__":
    main()

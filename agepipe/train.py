"""Two-phase multi-task training on Ray Train, fed by Ray Data from the crop job's Parquet.

Driver: read the label columns, make a seeded stratified split and a balancing
plan, save both with the run, and start a TorchTrainer (DDP on CPU or GPU).
Workers: phase 1 trains the heads on a frozen backbone, phase 2 unfreezes the
top stages (BatchNorm stays frozen) at a lower learning rate; early stopping,
ReduceLROnPlateau and the best weights by validation MAE; a checkpoint every
epoch through Ray Train, so a dead worker or an interrupted run resumes.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import io
import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms import v2

from agepipe import storage
from agepipe.cluster import init_ray
from agepipe.config import AgeGroups, CropSettings, TrainSettings, from_dict, recorded_crop_settings, to_dict
from agepipe.crop import CROP_SETTINGS_FILE
from agepipe.labels import GENDERS, group_index
from agepipe.model import (
    AgeModel,
    ModelConfig,
    age_estimate,
    checkpoint_dict,
    freeze_backbone,
    model_input,
    normalize_uint8,
    resize_uint8,
    save_checkpoint,
    set_train_mode,
    unwrap,
)

logger = logging.getLogger(__name__)
LABEL_COLUMNS = ["path", "face_index", "age", "gender", "race", "error", "detector"]


# ---------------------------------------------------------------- pure logic


def usable_rows(frame: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, int]]:
    """Rows with a face and an age; counts of what was left out and why."""
    has_error = frame["error"].notna()
    no_age = frame["age"].isna() & ~has_error
    dropped = {"error_or_no_face": int(has_error.sum()), "no_age": int(no_age.sum())}
    return frame[~has_error & ~no_age].reset_index(drop=True), dropped


def stratified_split(
    frame: pd.DataFrame, groups: AgeGroups, val_fraction: float, test_fraction: float, seed: int
) -> pd.Series:
    """'train'/'val'/'test' per row, stratified by age group, by image path (all faces of an
    image land in one split), deterministic for a seed."""
    images = frame.drop_duplicates("path")[["path", "age"]].sort_values("path")
    images["group"] = [group_index(a, groups) for a in images["age"]]
    rng = np.random.default_rng(seed)
    assignment: dict[str, str] = {}
    for _, members in images.groupby("group", sort=True):
        paths = members["path"].to_numpy()[rng.permutation(len(members))]
        n_test = int(round(len(paths) * test_fraction))
        n_val = int(round(len(paths) * val_fraction))
        for i, path in enumerate(paths):
            assignment[path] = "test" if i < n_test else "val" if i < n_test + n_val else "train"
    return frame["path"].map(assignment)


def balancing_weights(ages: pd.Series, max_per_age: int, min_per_age: int, seed: int) -> np.ndarray:
    """Copies of each training row: ages above `max_per_age` are subsampled to it (0 copies for the
    rest), ages with fewer than `min_per_age` rows are repeated up to it (augmentation makes the
    copies differ)."""
    rng = np.random.default_rng(seed)
    copies = np.ones(len(ages), dtype=np.int64)
    rounded = ages.round().astype(int).to_numpy()
    for age in np.unique(rounded):
        index = np.flatnonzero(rounded == age)
        if len(index) > max_per_age:
            copies[rng.choice(index, len(index) - max_per_age, replace=False)] = 0
        elif len(index) < min_per_age:
            extra = min_per_age - len(index)
            np.add.at(copies, rng.choice(index, extra, replace=True), 1)
    return copies


def age_targets(ages: torch.Tensor, max_age: int, sigma: float) -> torch.Tensor:
    """Gaussian label distributions over 0..max_age centred on each age (label-distribution learning)."""
    support = torch.arange(max_age + 1, dtype=torch.float32, device=ages.device)
    logits = -((support[None, :] - ages[:, None]) ** 2) / (2 * sigma**2)
    return logits.softmax(-1)


def multitask_loss(
    model: AgeModel, outputs: dict[str, torch.Tensor], batch: dict[str, torch.Tensor], settings: TrainSettings
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted sum of the three head losses, and the batch's predicted ages."""
    config = model.config
    predicted, _ = age_estimate(outputs["age"], config)
    if config.age_head == "distribution":
        target = age_targets(batch["age"], config.max_age, settings.label_sigma)
        distribution_loss = -(target * outputs["age"].log_softmax(-1)).sum(-1).mean()
        age_loss = distribution_loss + 0.1 * F.l1_loss(predicted, batch["age"])
    else:
        age_loss = 0.1 * F.smooth_l1_loss(outputs["age"].squeeze(-1), batch["age"], beta=2.0)
    loss = (
        settings.age_loss_weight * age_loss
        + settings.group_loss_weight * F.cross_entropy(outputs["group"], batch["group"])
        + settings.gender_loss_weight * masked_cross_entropy(outputs["gender"], batch["gender"])
    )
    return loss, predicted


def masked_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over rows with a label (target -1 means unknown)."""
    known = target >= 0
    if not known.any():
        return logits.sum() * 0.0
    return F.cross_entropy(logits[known], target[known])


class DownUp:
    """Downscale to a random fraction of the side, then back: the blur of a small face upscaled."""

    def __init__(self, scale: tuple[float, float]) -> None:
        self.scale = scale

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        side = image.shape[-1]
        small = max(8, round(side * float(torch.empty(1).uniform_(*self.scale))))
        return resize_uint8(resize_uint8(image, small), side)


def basic_augmentation() -> list[Callable[[torch.Tensor], torch.Tensor]]:
    return [
        v2.RandomHorizontalFlip(),
        v2.RandomAffine(degrees=15, scale=(0.9, 1.1), translate=(0.05, 0.05)),
        # No hue jitter: it costs more than the rest of the augmentation together on CPU.
        v2.ColorJitter(brightness=0.25, contrast=0.25, saturation=0.25),
    ]


def photo_augmentation() -> list[Callable[[torch.Tensor], torch.Tensor]]:
    """The basic set plus what faces in wide photos suffer: low resolution, blur, JPEG compression."""
    return [
        *basic_augmentation(),
        v2.RandomApply([DownUp(scale=(0.3, 0.8))], p=0.3),
        v2.RandomApply([v2.GaussianBlur(5, sigma=(0.3, 1.5))], p=0.2),
        v2.RandomApply([v2.JPEG(quality=(50, 95))], p=0.3),
    ]


AUGMENTATIONS: dict[str, Callable[[], list[Callable[[torch.Tensor], torch.Tensor]]]] = {
    "basic": basic_augmentation,
    "photo": photo_augmentation,
}


def image_transform(image_size: int, train: bool, augmentation: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """uint8 CHW tensor -> normalized float tensor; augmentation (by name) only for training."""
    if not train:
        return functools.partial(model_input, size=image_size)
    if augmentation not in AUGMENTATIONS:
        raise ValueError(f"unknown augmentation {augmentation!r}: use one of {sorted(AUGMENTATIONS)}")
    return v2.Compose(
        [functools.partial(resize_uint8, size=image_size), *AUGMENTATIONS[augmentation](), normalize_uint8]
    )


def decode_crop(data: bytes) -> torch.Tensor:
    """An encoded crop from the crop job as a uint8 CHW tensor."""
    array = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


def to_tensors(
    batch: dict[str, np.ndarray], transform: Callable[[torch.Tensor], torch.Tensor], groups: AgeGroups
) -> dict[str, torch.Tensor]:
    """A Ray Data batch of crop rows -> model inputs and targets."""
    images = torch.stack([transform(decode_crop(b)) for b in batch["image"]])
    ages = np.array(batch["age"], dtype=np.float32)  # a writable copy for torch
    genders = [GENDERS.index(g) if g in GENDERS else -1 for g in batch["gender"]]
    return {
        "image": images.contiguous(memory_format=torch.channels_last),
        "age": torch.from_numpy(ages),
        "group": torch.tensor([group_index(float(a), groups) for a in ages]),
        "gender": torch.tensor(genders),
    }


def phase_of(epoch: int, settings: TrainSettings) -> int:
    return 1 if epoch < settings.phase1_epochs else 2


def model_config(settings: TrainSettings) -> ModelConfig:
    return ModelConfig(
        backbone=settings.backbone,
        pretrained=settings.pretrained,
        age_head=settings.age_head,
        max_age=int(settings.labels.max_age),
        dense_units=settings.dense_units,
        dropout=settings.dropout,
        image_size=settings.image_size,
        groups=settings.labels.groups,
    )


# ---------------------------------------------------------------- worker loop


def cosine_schedule(optimizer: torch.optim.Optimizer, settings: TrainSettings, epochs: int) -> Any:
    """Cosine decay over the phase's epochs, to 1% of the starting rate."""
    start = optimizer.param_groups[0]["lr"]
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(epochs, 1), eta_min=start / 100)


def plateau_schedule(optimizer: torch.optim.Optimizer, settings: TrainSettings, epochs: int) -> Any:
    """Multiply the rate by `lr_factor` after `lr_patience` epochs without a better val MAE."""
    return torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="min", factor=settings.lr_factor, patience=settings.lr_patience
    )


LR_SCHEDULES = {"cosine": cosine_schedule, "plateau": plateau_schedule}


def step_schedule(scheduler: Any, val_mae: float) -> None:
    """Advance a per-epoch schedule; the plateau schedule needs the epoch's val MAE."""
    if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        scheduler.step(val_mae)
    else:
        scheduler.step()


class PhaseState:
    """Model, optimizer and LR schedule for one training phase."""

    def __init__(self, model: AgeModel, phase: int, settings: TrainSettings) -> None:
        import ray.train.torch

        freeze_backbone(model, 0 if phase == 1 else settings.unfreeze_stages, settings.freeze_batchnorm)
        self.phase = phase
        self.model = ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": False})
        trainable = [p for p in model.parameters() if p.requires_grad]
        lr = settings.phase1_lr if phase == 1 else settings.phase2_lr
        self.optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=settings.weight_decay)
        if settings.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"unknown lr schedule {settings.lr_schedule!r}: use one of {sorted(LR_SCHEDULES)}")
        epochs = settings.phase1_epochs if phase == 1 else settings.phase2_epochs
        self.scheduler = LR_SCHEDULES[settings.lr_schedule](self.optimizer, settings, epochs)


def warmup_factor(step: int, warmup_steps: int) -> float:
    """Linear warm-up: Adam's first updates move every weight by about the full rate, which wrecks
    freshly unfrozen pretrained features (the first fine-tuning epoch's loss rose above phase 1's)."""
    return min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0


def _all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    # On the training device: NCCL, the GPU process group's backend, reduces CUDA tensors only.
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(tensor)
    return tensor.tolist()


def run_epoch(
    state: PhaseState, shard: Any, settings: TrainSettings, train: bool, device: torch.device, warmup_steps: int = 0
) -> dict:
    """One pass over a data shard; metrics summed over all workers. The first `warmup_steps`
    optimizer steps ramp the learning rate up to the scheduled one."""
    model = unwrap(state.model)
    transform = image_transform(settings.image_size, train, settings.augmentation)
    totals = np.zeros(6)  # loss, abs error, group correct, gender correct, gender known, rows
    if train:
        set_train_mode(model)
    else:
        model.eval()
    batches = shard.iter_batches(
        batch_size=settings.batch_size,
        batch_format="numpy",
        local_shuffle_buffer_size=4 * settings.batch_size if train else None,
        local_shuffle_seed=settings.seed if train else None,
    )
    scheduled_lrs = [group["lr"] for group in state.optimizer.param_groups]
    for step, raw in enumerate(batches):
        batch = {k: v.to(device) for k, v in to_tensors(raw, transform, model.config.groups).items()}
        with torch.set_grad_enabled(train):
            outputs = state.model(batch["image"])
            loss, predicted = multitask_loss(model, outputs, batch, settings)
        if train:
            if step < warmup_steps:
                for group, lr in zip(state.optimizer.param_groups, scheduled_lrs, strict=True):
                    group["lr"] = lr * warmup_factor(step, warmup_steps)
            state.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            state.optimizer.step()
        n = len(batch["age"])
        known = batch["gender"] >= 0
        totals += [
            loss.item() * n,
            (predicted.detach() - batch["age"]).abs().sum().item(),
            (outputs["group"].argmax(-1) == batch["group"]).sum().item(),
            (outputs["gender"].argmax(-1)[known] == batch["gender"][known]).sum().item(),
            known.sum().item(),
            n,
        ]
    for group, lr in zip(state.optimizer.param_groups, scheduled_lrs, strict=True):
        group["lr"] = lr  # the epoch schedule steps from the scheduled rate, not a warm-up one
    loss_sum, abs_error, group_ok, gender_ok, gender_known, rows = _all_reduce_sum(totals.tolist(), device)
    rows = max(rows, 1)
    return {
        "loss": loss_sum / rows,
        "mae": abs_error / rows,
        "group_accuracy": group_ok / rows,
        "gender_accuracy": gender_ok / max(gender_known, 1),
        "rows": int(rows),
    }


def train_loop_per_worker(config: dict) -> None:
    """The Ray Train worker function; `config` holds the settings and the crop settings as dicts."""
    import ray.train
    import ray.train.torch

    settings = from_dict(TrainSettings, config["settings"])
    crop = from_dict(CropSettings, config["crop"])
    torch.manual_seed(settings.seed)
    if not settings.use_gpu:
        torch.set_num_threads(max(1, int(config.get("threads_per_worker", 1))))
    device = ray.train.torch.get_device()
    model = AgeModel(model_config(settings))
    if settings.age_head == "regression":
        # Start at the training split's mean age, so phase 1 need not spend its epoch moving a bias there.
        torch.nn.init.constant_(model.age_head.bias, float(config.get("mean_train_age", 0.0)))
    model = model.to(memory_format=torch.channels_last)
    resume = _load_resume_state(ray.train.get_checkpoint())
    start_epoch = resume.get("epoch", -1) + 1
    history: list[dict] = resume.get("history", [])
    best = resume.get("best", {"val_mae": math.inf, "epoch": -1, "state_dict": None, "stale": 0})
    if "state_dict" in resume:
        model.load_state_dict(resume["state_dict"])
    state = None
    total_epochs = settings.phase1_epochs + settings.phase2_epochs
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")
    for epoch in range(start_epoch, total_epochs):
        phase = phase_of(epoch, settings)
        if epoch == settings.phase1_epochs:
            best["stale"] = 0  # early stopping counts within a phase
        if phase == 2 and best["stale"] >= settings.patience:
            break
        if state is None or state.phase != phase:
            # The previous phase's DDP wrapper must be gone before the next one hooks the same
            # parameters, or its gradient hooks would still fire.
            state = None
            gc.collect()
            state = PhaseState(model, phase, settings)
            if resume.get("phase") == phase and "optimizer" in resume:
                state.optimizer.load_state_dict(resume.pop("optimizer"))
                state.scheduler.load_state_dict(resume.pop("scheduler"))
        started = time.perf_counter()
        warmup = (
            config.get("train_steps_per_epoch", 0) * settings.warmup_epochs if epoch == settings.phase1_epochs else 0
        )
        train_metrics = run_epoch(state, train_shard, settings, True, device, math.ceil(warmup))
        seconds = time.perf_counter() - started
        val_metrics = run_epoch(state, val_shard, settings, False, device)
        lr = state.optimizer.param_groups[0]["lr"]  # the rate this epoch trained at
        step_schedule(state.scheduler, val_metrics["mae"])
        improved = val_metrics["mae"] < best["val_mae"]
        if improved:
            best = {
                "val_mae": val_metrics["mae"],
                "epoch": epoch,
                "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
                "stale": 0,
            }
        else:
            best["stale"] += 1
        metrics = {
            "epoch": epoch,
            "phase": phase,
            "train_loss": train_metrics["loss"],
            "train_mae": train_metrics["mae"],
            "val_loss": val_metrics["loss"],
            "val_mae": val_metrics["mae"],
            "val_group_accuracy": val_metrics["group_accuracy"],
            "val_gender_accuracy": val_metrics["gender_accuracy"],
            "lr": lr,
            "train_images_per_s": train_metrics["rows"] / seconds,
            "best_val_mae": best["val_mae"],
        }
        history.append(metrics)
        _report(epoch, metrics, model, state, best, history, crop)


def _load_resume_state(checkpoint: Any) -> dict:
    if checkpoint is None:
        return {}
    with checkpoint.as_directory() as directory:
        return torch.load(os.path.join(directory, "state.pt"), map_location="cpu", weights_only=True)


# Reported with rank 0's metrics (not kept in the history): the worker group's placement group, so
# that Tune can give it back when it stops a trial (Train's own cleaner needs the dashboard's State API).
PLACEMENT_GROUP_ID = "placement_group_id"


def _report(epoch: int, metrics: dict, model: AgeModel, state: PhaseState, best: dict, history: list, crop) -> None:
    import ray.train
    import ray.util

    if ray.train.get_context().get_world_rank() != 0:
        ray.train.report(metrics, checkpoint=None)
        return
    with tempfile.TemporaryDirectory() as directory:
        torch.save(
            {
                "epoch": epoch,
                "phase": state.phase,
                "state_dict": model.state_dict(),
                "optimizer": state.optimizer.state_dict(),
                "scheduler": state.scheduler.state_dict(),
                "best": best,
                "history": history,
            },
            os.path.join(directory, "state.pt"),
        )
        final = checkpoint_dict(model, crop, {"val_mae": best["val_mae"], "epoch": best["epoch"]})
        final["state_dict"] = best["state_dict"] if best["state_dict"] is not None else final["state_dict"]
        torch.save(final, os.path.join(directory, "model.pt"))
        group = ray.util.get_current_placement_group()
        if group is not None:
            metrics = {**metrics, PLACEMENT_GROUP_ID: group.id.hex()}
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))


# ---------------------------------------------------------------- driver


def read_labels(data: str) -> pd.DataFrame:
    """The crop dataset's label columns (no image bytes) as a DataFrame."""
    fs, path = storage.resolve(data)
    table = pq.read_table(path, filesystem=fs, columns=LABEL_COLUMNS)
    return table.to_pandas()


def plan_dataset(settings: TrainSettings) -> tuple[pd.DataFrame, dict[str, int]]:
    """Per row of the crop dataset to train on: its split and copies for balancing."""
    frame, dropped = usable_rows(read_labels(settings.data))
    frame["age"] = frame["age"].clip(upper=settings.labels.max_age)
    if settings.limit:
        frame = frame.sample(n=min(settings.limit, len(frame)), random_state=settings.seed)
    frame["split"] = stratified_split(
        frame, settings.labels.groups, settings.val_fraction, settings.test_fraction, settings.seed
    ).to_numpy()
    frame["copies"] = 1
    train = frame["split"] == "train"
    frame.loc[train, "copies"] = balancing_weights(
        frame.loc[train, "age"], settings.max_per_age, settings.min_per_age, settings.seed
    )
    return frame.reset_index(drop=True), dropped


class SplitFilter:
    """Ray Data UDF: keep the rows of one split, repeated by their balancing copies."""

    def __init__(self, copies: dict[tuple[str, int], int]) -> None:
        self.copies = copies

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        keys = zip(batch["path"], batch["face_index"].fillna(-1).astype(int), strict=True)
        repeats = np.array([self.copies.get(key, 0) for key in keys], dtype=np.int64)
        columns = ["image", "age", "gender"]
        return batch[columns].loc[batch.index.repeat(repeats)].reset_index(drop=True)


def split_dataset(settings: TrainSettings, plan: pd.DataFrame, split: str, cpus: float) -> Any:
    import ray.data

    fs, path = storage.resolve(settings.data)
    rows = plan[plan["split"] == split]
    copies = {
        (p, int(i)): int(c) for p, i, c in zip(rows["path"], rows["face_index"], rows["copies"], strict=True) if c
    }
    dataset = ray.data.read_parquet(
        path,
        filesystem=fs,
        columns=["path", "face_index", "image", "age", "gender"],
        file_extensions=["parquet"],
        num_cpus=cpus,
    )
    dataset = dataset.map_batches(SplitFilter(copies), batch_format="pandas", num_cpus=cpus)
    # Crop datasets are often ordered (by file name, hence by age for UTKFace): without a full
    # shuffle every batch holds one narrow age range and the model chases it.
    return dataset.random_shuffle(num_cpus=cpus) if split == "train" else dataset


def crop_settings_of(data: str) -> CropSettings:
    """The crop settings the dataset was made with (recorded by the crop job), for the checkpoint."""
    path = storage.join(data, CROP_SETTINGS_FILE)
    if storage.exists(path):
        return recorded_crop_settings(json.loads(storage.read_bytes(path))["crop"])
    logger.warning("%s has no recorded crop settings; assuming defaults", data)
    return CropSettings()


def require_gpus(settings: TrainSettings, cluster_gpus: float) -> None:
    """Refuse a GPU run the cluster cannot hold: Ray Train would wait for the workers' GPUs for ever."""
    if settings.use_gpu and cluster_gpus < settings.num_workers:
        fix = f"--num-workers {int(cluster_gpus)}" if cluster_gpus >= 1 else "leave out --use-gpu"
        raise ValueError(
            f"--use-gpu needs one GPU per worker ({settings.num_workers}) but the Ray cluster has "
            f"{cluster_gpus:g}: {fix}"
        )


def prepare_run(settings: TrainSettings) -> pd.DataFrame:
    """Start Ray, plan the split and balancing, and save settings and split with the run."""
    import ray
    import ray.data

    if not settings.data or not settings.output:
        raise ValueError("train needs --data and --output")
    init_ray(log_to_driver=True)
    require_gpus(settings, ray.cluster_resources().get("GPU", 0))
    # Per-epoch metrics are the progress report; Data's bars from inside workers would flood the log.
    ray.data.DataContext.get_current().enable_progress_bars = False
    plan, dropped = plan_dataset(settings)
    logger.info("training rows by split: %s; left out: %s", plan["split"].value_counts().to_dict(), dropped)
    storage.write_bytes(
        storage.join(settings.output, "settings.json"), json.dumps(to_dict(settings), indent=2).encode()
    )
    split_buffer = io.BytesIO()
    plan[["path", "face_index", "age", "gender", "race", "split", "copies"]].to_parquet(split_buffer)
    storage.write_bytes(storage.join(settings.output, "split.parquet"), split_buffer.getvalue())
    return plan


def make_trainer(
    settings: TrainSettings,
    plan: pd.DataFrame,
    storage_uri: str,
    name: str,
    callbacks: list | None = None,
    materialize: bool = False,
) -> Any:
    """The TorchTrainer for one run; re-made with the same storage and name, it resumes that run."""
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    cluster_cpus = ray.cluster_resources().get("CPU", 1)
    # Leave one whole CPU unreserved: Ray Data's file listing and read tasks feed the workers from it.
    cpus_per_worker = settings.cpus_per_worker or max(0.25, (cluster_cpus - 1) / settings.num_workers)
    data_cpus = 0.25
    fs, path = storage.resolve(storage_uri)
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "settings": to_dict(settings),
            "crop": to_dict(crop_settings_of(settings.data)),
            "threads_per_worker": max(1, int(cluster_cpus // settings.num_workers)),
            "mean_train_age": float(plan.loc[plan["split"] == "train", "age"].mean()),
            "train_steps_per_epoch": int(plan.loc[plan["split"] == "train", "copies"].sum())
            // (settings.batch_size * settings.num_workers),
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=settings.num_workers,
            use_gpu=settings.use_gpu,
            resources_per_worker={"CPU": cpus_per_worker},
        ),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=path,
            storage_filesystem=fs,
            failure_config=ray.train.FailureConfig(max_failures=settings.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            callbacks=callbacks,
        ),
        datasets={
            split: dataset.materialize() if materialize else dataset
            for split in ("train", "val")
            for dataset in [split_dataset(settings, plan, split, data_cpus)]
        },
    )


def export_checkpoint(checkpoint: Any, settings: TrainSettings, output: str) -> dict:
    """Write a run checkpoint's best weights as `model.pt` and its history as `metrics.csv`."""
    with checkpoint.as_directory() as directory:
        final = torch.load(os.path.join(directory, "model.pt"), map_location="cpu", weights_only=True)
        state = torch.load(os.path.join(directory, "state.pt"), map_location="cpu", weights_only=True)
    final["train_settings"] = to_dict(settings)
    final["history"] = state["history"]
    save_checkpoint(final, storage.join(output, "model.pt"))
    metrics_buffer = io.BytesIO()
    pd.DataFrame(state["history"]).to_csv(metrics_buffer, index=False)
    storage.write_bytes(storage.join(output, "metrics.csv"), metrics_buffer.getvalue())
    return {"best_val_mae": final["val_mae"], "best_epoch": final["epoch"], "epochs": len(state["history"])}


def with_absolute_paths(settings: TrainSettings) -> TrainSettings:
    """A copy whose local data, output and weights paths are absolute: Tune runs each trial in a
    directory of its own."""
    pretrained = settings.pretrained
    if pretrained not in (None, "default", "hub"):
        pretrained = storage.absolute(pretrained)
    return dataclasses.replace(
        settings, data=storage.absolute(settings.data), output=storage.absolute(settings.output), pretrained=pretrained
    )


def run_training(settings: TrainSettings) -> dict:
    """Train and write `model.pt`, `metrics.csv`, `split.parquet` and `settings.json` to the output.

    Running it again with the same output resumes an interrupted run from its last checkpoint.
    """
    settings = with_absolute_paths(settings)
    plan = prepare_run(settings)
    result = make_trainer(settings, plan, settings.output, "ray_train").fit()
    return export_checkpoint(result.checkpoint, settings, settings.output)

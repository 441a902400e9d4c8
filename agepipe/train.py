"""Two-phase multi-task training on Ray Train, fed by Ray Data from the crop job's Parquet: the driver.

It reads the label columns, makes a seeded stratified split and a balancing plan, saves both with the
run, and starts a TorchTrainer (DDP on CPU or GPU) whose workers run `train_loop.train_loop_per_worker`.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import torch

from agepipe import storage
from agepipe.cluster import init_ray
from agepipe.config import AgeGroups, CropSettings, TrainSettings, recorded_crop_settings, to_dict
from agepipe.crop import CROP_SETTINGS_FILE
from agepipe.labels import group_index
from agepipe.model import save_checkpoint
from agepipe.train_loop import train_loop_per_worker

logger = logging.getLogger(__name__)
LABEL_COLUMNS = ["path", "face_index", "age", "gender", "race", "error", "detector"]


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


def worker_cpus(cluster_cpus: float, workers: int, reserved: float = 0.0) -> float:
    """CPUs for each of `workers` training workers sharing the cluster, besides `reserved` ones. One
    whole CPU stays unreserved: Ray Data's file listing and read tasks feed the workers from it."""
    return max(0.25, (cluster_cpus - 1 - reserved) / workers)


def make_trainer(
    settings: TrainSettings,
    plan: pd.DataFrame,
    storage_uri: str,
    name: str,
    callbacks: list | None = None,
    materialize_train: bool = False,
) -> Any:
    """The TorchTrainer for one run; re-made with the same storage and name, it resumes that run."""
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    cluster_cpus = ray.cluster_resources().get("CPU", 1)
    cpus_per_worker = settings.cpus_per_worker or worker_cpus(cluster_cpus, settings.num_workers)
    data_cpus = 0.25
    fs, path = storage.resolve(storage_uri)
    train = split_dataset(settings, plan, "train", data_cpus)
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
            # Val is read once, not each epoch: the crop dataset's read and split filter would otherwise
            # run again every epoch for a tenth of its rows.
            "train": train.materialize() if materialize_train else train,
            "val": split_dataset(settings, plan, "val", data_cpus).materialize(),
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

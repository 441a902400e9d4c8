"""Two-phase multi-task training on Ray Train, fed by Ray Data from the crop job's Parquet: the driver.

It plans the split and the balancing (`train_data`), saves both with the run, and starts a TorchTrainer
(DDP on CPU or GPU) whose workers run `train_loop.train_loop_per_worker`.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch

from agepipe import storage
from agepipe.augment import decode_crop
from agepipe.calibrate import calibrate_checkpoint, describe
from agepipe.cluster import init_ray
from agepipe.config import CropSettings, TrainSettings, from_dict, recorded_crop_settings, to_dict
from agepipe.crop import CROP_SETTINGS_FILE
from agepipe.model import ModelConfig, model_location, read_checkpoint, require_same_network, save_checkpoint
from agepipe.predict import Predictor
from agepipe.train_data import FaceKey, age_loss_weights, face_keys, plan_dataset, split_dataset
from agepipe.train_loop import check_setting_names, model_config, train_loop_per_worker

logger = logging.getLogger(__name__)


def crop_settings_of(data: str) -> CropSettings:
    """The crop settings the dataset was made with (recorded by the crop job), for the checkpoint."""
    path = storage.join(data, CROP_SETTINGS_FILE)
    if storage.exists(path):
        return recorded_crop_settings(json.loads(storage.read_bytes(path))["crop"])
    logger.warning("%s has no recorded crop settings; assuming defaults", data)
    return CropSettings()


# Crop settings that change what a network sees of a face.
CROP_VIEW_FIELDS = ("detector", "geometry", "margin", "size")


def warn_of_other_crops(checkpoint: dict, uri: str, data: str, consequence: str) -> None:
    """Warn when the crops a checkpoint was trained on show faces otherwise than the dataset's."""
    trained_on = recorded_crop_settings(checkpoint["crop"])
    data_crop = crop_settings_of(data)
    differences = [
        f"{name} {getattr(trained_on, name)!r} (the data: {getattr(data_crop, name)!r})"
        for name in CROP_VIEW_FIELDS
        if getattr(trained_on, name) != getattr(data_crop, name)
    ]
    if differences:
        logger.warning(
            "%s was trained on other crops than %s holds: %s; %s", uri, data, "; ".join(differences), consequence
        )


def check_initial_checkpoint(settings: TrainSettings) -> None:
    """Refuse a starting checkpoint whose network has another shape than the settings build, and warn
    when it was trained on crops that show faces otherwise than this dataset's."""
    checkpoint = read_checkpoint(settings.initial_checkpoint)
    require_same_network(checkpoint, model_config(settings), settings.initial_checkpoint)
    consequence = (
        "fine-tuning will first have to unlearn them (crop the images as it was trained, or start from "
        "--pretrained weights)"
    )
    warn_of_other_crops(checkpoint, settings.initial_checkpoint, settings.data, consequence)


def check_teacher(settings: TrainSettings) -> None:
    """Refuse a teacher whose age groups differ from the run's (its group probabilities are the targets),
    and warn when it was trained on crops that show faces otherwise than this dataset's."""
    checkpoint = read_checkpoint(settings.teacher)
    teacher_groups = from_dict(ModelConfig, checkpoint["model_config"]).groups
    if teacher_groups != settings.labels.groups:
        raise ValueError(
            f"--teacher {settings.teacher} predicts the age groups {teacher_groups.names} at "
            f"{teacher_groups.lower_bounds}, this run trains {settings.labels.groups.names} at "
            f"{settings.labels.groups.lower_bounds}: distil from a teacher with the run's groups"
        )
    consequence = "as a teacher its predictions on these crops are worse targets than on its own"
    warn_of_other_crops(checkpoint, settings.teacher, settings.data, consequence)


def teacher_predictions(predictor: Predictor, images: Sequence[bytes]) -> np.ndarray:
    """Per encoded crop, the teacher's age, age-group probabilities and gender probabilities in one row
    (what `train_loop.distilled_losses` reads), on the network input that validation and scoring use."""
    inputs = torch.stack([predictor.transform(decode_crop(image)) for image in images])
    outputs = predictor.predict_tensor(inputs.to(predictor.device))
    return torch.cat([outputs["age"][:, None], outputs["group"], outputs["gender"]], -1).float().cpu().numpy()


class TeacherScorer:
    """Ray Data UDF: `teacher_predictions` for the crop dataset's rows among `faces`."""

    def __init__(self, teacher: str, faces: set[FaceKey]) -> None:
        self.predictor = Predictor(teacher)
        self.faces = faces

    def __call__(self, batch: pd.DataFrame) -> dict[str, np.ndarray]:
        all_keys = face_keys(batch)
        wanted = [key in self.faces for key in all_keys]
        keys = [key for key, keep in zip(all_keys, wanted, strict=True) if keep]
        images = batch["image"].to_numpy()[wanted]
        step = self.predictor.batch_size
        width = 1 + len(self.predictor.group_names) + 2
        rows = [teacher_predictions(self.predictor, images[i : i + step]) for i in range(0, len(images), step)]
        return {
            "path": np.array([path for path, _ in keys], dtype=object),
            "face_index": np.array([index for _, index in keys], dtype=np.int64),
            "teacher": np.concatenate(rows) if rows else np.zeros((0, width), dtype=np.float32),
        }


def teacher_targets(settings: TrainSettings, plan: pd.DataFrame) -> dict[FaceKey, np.ndarray]:
    """The teacher's predictions for every face the run trains on, scored once on the cluster."""
    import ray.data

    faces = set(face_keys(plan[plan["trained"]]))
    fs, path = storage.resolve(settings.data)
    logger.info("scoring the %d training faces with the teacher %s", len(faces), settings.teacher)
    scored = ray.data.read_parquet(
        path, filesystem=fs, columns=["path", "face_index", "image"], file_extensions=["parquet"]
    ).map_batches(
        TeacherScorer,
        fn_constructor_args=(settings.teacher, faces),
        batch_format="pandas",
        batch_size=256,
        compute=ray.data.ActorPoolStrategy(size=1),
    )
    targets: dict[FaceKey, np.ndarray] = {}
    for batch in scored.iter_batches(batch_format="numpy", batch_size=None):
        before = len(targets)
        keys = zip(batch["path"].tolist(), batch["face_index"].tolist(), strict=True)
        targets.update(zip(keys, batch["teacher"], strict=True))
        if len(targets) * 10 // len(faces) > before * 10 // len(faces):  # a line per tenth: the scoring's progress
            logger.info("teacher: %d of %d training faces scored", len(targets), len(faces))
    missing = len(faces - targets.keys())
    if missing:
        raise RuntimeError(f"the teacher scored {len(targets)} of the {len(faces)} training faces ({missing} missing)")
    return targets


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
    check_setting_names(settings)
    if settings.initial_checkpoint:
        check_initial_checkpoint(settings)  # a mismatch fails here, not in the workers
    if settings.teacher:
        check_teacher(settings)
    init_ray(log_to_driver=True)
    require_gpus(settings, ray.cluster_resources().get("GPU", 0))
    # Per-epoch metrics are the progress report; Data's bars from inside workers would flood the log.
    ray.data.DataContext.get_current().enable_progress_bars = False
    plan, dropped = plan_dataset(settings)
    logger.info("training rows by split: %s; left out: %s", plan["split"].value_counts().to_dict(), dropped)
    if settings.train_on_val:
        logger.warning("--train-on-val: the network trains on the val faces too, so its val metrics read trained faces")
    storage.write_bytes(
        storage.join(settings.output, "settings.json"), json.dumps(to_dict(settings), indent=2).encode()
    )
    split_buffer = io.BytesIO()
    plan[["path", "face_index", "age", "gender", "race", "split", "trained", "copies"]].to_parquet(split_buffer)
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
    teacher: dict[FaceKey, np.ndarray] | None = None,
) -> Any:
    """The TorchTrainer for one run; re-made with the same storage and name, it resumes that run."""
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    cluster_cpus = ray.cluster_resources().get("CPU", 1)
    cpus_per_worker = settings.cpus_per_worker or worker_cpus(cluster_cpus, settings.num_workers)
    data_cpus = 0.25
    fs, path = storage.resolve(storage_uri)
    train = split_dataset(settings, plan, "train", data_cpus, teacher)
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "settings": to_dict(settings),
            "crop": to_dict(crop_settings_of(settings.data)),
            "threads_per_worker": max(1, int(cluster_cpus // settings.num_workers)),
            "mean_train_age": float(plan.loc[plan["trained"], "age"].mean()),
            "age_weights": age_loss_weights(
                plan["age"].repeat(plan["copies"]).to_numpy(), int(settings.labels.max_age), settings.age_weighting
            ).tolist(),
            "train_steps_per_epoch": int(plan["copies"].sum()) // (settings.batch_size * settings.num_workers),
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
        settings,
        data=storage.absolute(settings.data),
        output=storage.absolute(settings.output),
        pretrained=pretrained,
        initial_checkpoint=settings.initial_checkpoint and model_location(settings.initial_checkpoint),
        teacher=settings.teacher and model_location(settings.teacher),
    )


def run_training(settings: TrainSettings) -> dict:
    """Train and write `model.pt`, `metrics.csv`, `split.parquet` and `settings.json` to the output.

    Running it again with the same output resumes an interrupted run from its last checkpoint.
    """
    settings = with_absolute_paths(settings)
    plan = prepare_run(settings)
    teacher = teacher_targets(settings, plan) if settings.teacher else None
    result = make_trainer(settings, plan, settings.output, "ray_train", teacher=teacher).fit()
    summary = export_checkpoint(result.checkpoint, settings, settings.output)
    return {**summary, "calibration": calibrate_run(settings)}


def calibrate_run(settings: TrainSettings) -> str:
    """Calibrate the run's `model.pt` on its val faces (`calibrate.held_out_faces`); the line that says so.
    With --train-on-val there are none the network did not train on: it says how to calibrate instead."""
    model = storage.join(settings.output, "model.pt")
    if settings.train_on_val:
        logger.warning(
            "--train-on-val: no val faces held out, so %s has no calibration and its age intervals are null; "
            "calibrate it on faces it did not train on with `agepipe calibrate --model %s --data FACES`",
            model,
            model,
        )
        return "none (--train-on-val)"
    try:
        return describe(calibrate_checkpoint(model, settings.data, level=settings.interval_level))
    except ValueError as exc:  # too few val faces (a --limit run): the trained network is still worth keeping
        logger.warning("%s has no calibration: %s", model, exc)
        return f"none ({exc})"

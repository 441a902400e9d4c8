"""Ray Data batch scoring: image files -> one prediction row per face in a Parquet dataset.

Streams from a folder or `s3://` prefix through actor pools: on CPU-only
clusters one pool reads, crops (the crop job's function) and runs the model;
when the cluster has GPUs, cropping stays on CPU actors (a YOLO detector's with a
GPU share) and the model runs on actors holding a fraction of a GPU. Every input image gets a row (scored,
`no_face`, or an error), and re-running into the same output resumes.

The actor that scores a batch writes it as one Parquet file named after the batch's inputs (its paths; on
the GPU path its faces), as the crop job does: a retried batch replaces its own file, and no write stage
waits for the last batch to start its own worker.
"""

from __future__ import annotations

import json
import time
from typing import Any

import numpy as np
import pyarrow as pa

from agepipe import labels as labels_lib
from agepipe import storage
from agepipe.batch import (
    JobSummary,
    detection_pool,
    limit_threads,
    part_name,
    path_dataset,
    plan_inputs,
    read_and_crop,
    rows_to_table,
    summarize_output,
    worker_count,
    write_part,
)
from agepipe.cluster import init_ray
from agepipe.config import LabelSettings, ScoreSettings, to_dict
from agepipe.faces import FACE_SCHEMA
from agepipe.predict import PREDICTION_FIELDS, Predictor, prediction_columns

LABEL_FIELDS = [
    pa.field("label_age", pa.float32()),
    pa.field("label_gender", pa.string()),
    pa.field("label_race", pa.string()),
    pa.field("label_age_group", pa.string()),
]
SCORE_SCHEMA = pa.schema(list(FACE_SCHEMA) + PREDICTION_FIELDS)
CROP_STAGE_SCHEMA = pa.schema(
    list(FACE_SCHEMA) + [pa.field("crop", pa.binary()), pa.field("crop_shape", pa.list_(pa.int32()))]
)


def output_schema(with_labels: bool) -> pa.Schema:
    return pa.schema(list(SCORE_SCHEMA) + (LABEL_FIELDS if with_labels else []))


def label_columns(path: str, label_fn: Any, settings: LabelSettings) -> dict[str, Any]:
    labels = labels_lib.finalize(label_fn(path), settings)
    return {f"label_{k}": labels[k] for k in ("age", "gender", "race", "age_group")}


def cropped_rows(batch: dict[str, np.ndarray], predictor: Predictor) -> list[dict[str, Any]]:
    """The face rows, crops attached, of a batch of image paths, by the predictor's detector and crop."""
    return read_and_crop([str(p) for p in batch["path"]], predictor.crop_images, predictor.crop.detector)


def score_rows(rows: list[dict[str, Any]], predictor: Predictor) -> list[dict[str, Any]]:
    """Add predictions to the rows that have a face crop."""
    faces = [row for row in rows if row.get("crop") is not None]
    for row, prediction in zip(faces, predictor.predict_crops([r["crop"] for r in faces]), strict=True):
        row.update(prediction_columns(prediction))
    return rows


class _LabelledOutput:
    """Writes a batch's scored rows as its Parquet file of the output, with label columns when labels are
    asked for."""

    def __init__(self, settings: ScoreSettings) -> None:
        self.label_settings = settings.labels
        self.output = settings.output
        self.with_labels = settings.labels.kind != "none"
        self.label_fn = labels_lib.label_source(settings.labels, settings.input) if self.with_labels else None
        self.schema = output_schema(self.with_labels)

    def write(self, rows: list[dict[str, Any]], batch_keys: list[str]) -> dict[str, np.ndarray]:
        """Write the rows of one batch as the file named after `batch_keys`, what a retry of the batch
        has too; returns the row count."""
        if self.with_labels:
            for row in rows:
                row.update(label_columns(row["path"], self.label_fn, self.label_settings))
        write_part(rows_to_table(rows, self.schema), self.output, part_name(batch_keys))
        return {"rows": np.array([len(rows)])}


class ScoreWorker(_LabelledOutput):
    """CPU clusters: one actor reads, crops and scores (no crops cross the object store).

    It gets the driver's Predictor: with the onnx runtime (the CPU default) that is the exported
    network, so the actor starts without rebuilding the model."""

    def __init__(self, settings: ScoreSettings, threads: int, predictor: Predictor) -> None:
        import torch

        super().__init__(settings)
        torch.set_num_threads(threads)
        limit_threads(threads)
        self.predictor = predictor

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = cropped_rows(batch, self.predictor)
        # Named by its paths, as crop's files: a retry whose reads fail otherwise still replaces the file.
        return self.write(score_rows(rows, self.predictor), [str(p) for p in batch["path"]])


class CropStageWorker:
    """GPU clusters, stage 1 on CPU actors (with a GPU share for a detector that runs on one): read,
    detect and crop; crops travel as raw bytes.

    It gets the driver's CPU Predictor for its crop settings and detector, not to build a model it
    never runs."""

    def __init__(self, predictor: Predictor) -> None:
        limit_threads(1)
        self.predictor = predictor

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        rows = cropped_rows(batch, self.predictor)
        for row in rows:
            crop = row.pop("crop")
            row["crop"] = None if crop is None else crop.tobytes()
            row["crop_shape"] = None if crop is None else list(crop.shape)
        return rows_to_table(rows, CROP_STAGE_SCHEMA)


class ModelStageWorker(_LabelledOutput):
    """GPU clusters, stage 2 on actors holding a GPU fraction: score the crops."""

    def __init__(self, settings: ScoreSettings) -> None:
        super().__init__(settings)
        self.predictor = Predictor.from_settings(settings, batch_size=settings.batch_size)

    def __call__(self, batch: pa.Table) -> dict[str, np.ndarray]:
        rows = batch.to_pylist()
        for row in rows:
            data, shape = row.pop("crop"), row.pop("crop_shape")
            row["crop"] = None if data is None else np.frombuffer(data, np.uint8).reshape(shape)
        # Named by its faces: the crop stage's rows may split one photo's faces over two batches.
        return self.write(score_rows(rows, self.predictor), [f"{row['path']}\t{row['face_index']}" for row in rows])


SCORE_SETTINGS_FILE = "_agepipe_score.json"


def record_score_settings(settings: ScoreSettings, predictor: Predictor) -> None:
    """Write the run's settings beside its predictions, where `evaluate` finds its model, crop and
    input root: the model and crop settings as the Predictor uses them (after the job's overrides)."""
    record = {
        "model": predictor.model_uri,  # absolute: evaluate may run in another directory
        "crop": to_dict(predictor.crop),
        "input": settings.input,
        "labels": to_dict(settings.labels),
        "flip_tta": settings.flip_tta,
        "runtime": settings.runtime,  # None: each actor's device default
        "interval_level": predictor.level,
    }
    storage.write_bytes(storage.join(settings.output, SCORE_SETTINGS_FILE), json.dumps(record, indent=2).encode())


def run_score(settings: ScoreSettings) -> JobSummary:
    """Score every image under `settings.input` into the Parquet dataset at `settings.output`."""
    import ray

    if not settings.input or not settings.output:
        raise ValueError("score needs --input and --output")
    # On the CPU whatever the driver has: actors without a GPU share unpickle it.
    predictor = Predictor.from_settings(settings, device="cpu", batch_size=settings.batch_size)
    _ = predictor.detector  # fail fast on a bad model or detector before any work
    if settings.labels.kind != "none":
        labels_lib.label_source(settings.labels, settings.input)
    todo, summary = plan_inputs(settings.input, settings.output)
    record_score_settings(settings, predictor)
    started = time.perf_counter()
    if todo:
        init_ray(log_to_driver=False)
        resources = ray.cluster_resources()
        cpus, gpus = int(resources.get("CPU", 1)), resources.get("GPU", 0)
        gpu_path = gpus > 0 and settings.gpu_fraction > 0
        if gpu_path:
            # A detector that runs on a GPU (YOLO) holds up to half the GPUs; the model actors the rest.
            actors, detector_gpus = detection_pool(
                predictor.crop.detector, settings.concurrency, settings.gpu_fraction, gpu_share=0.5
            )
            model_actors = max(1, int((gpus - actors * detector_gpus) / settings.gpu_fraction))
        else:
            actors = worker_count(settings.concurrency)
        dataset, batch_size = path_dataset(todo, settings.batch_size, actors)
        if gpu_path:
            dataset = dataset.map_batches(
                CropStageWorker,
                fn_constructor_kwargs={"predictor": predictor},
                batch_size=batch_size,
                compute=ray.data.ActorPoolStrategy(size=actors),
                num_cpus=1,
                num_gpus=detector_gpus,
                batch_format="numpy",
            ).map_batches(
                ModelStageWorker,
                fn_constructor_kwargs={"settings": settings},
                batch_size=batch_size,
                compute=ray.data.ActorPoolStrategy(size=model_actors),
                num_gpus=settings.gpu_fraction,
                batch_format="pyarrow",
            )
        else:
            dataset = dataset.map_batches(
                ScoreWorker,
                fn_constructor_kwargs={"settings": settings, "threads": max(1, cpus // actors), "predictor": predictor},
                batch_size=batch_size,
                compute=ray.data.ActorPoolStrategy(size=actors),
                num_cpus=1,
                batch_format="numpy",
            )
        dataset.materialize()  # runs the job; what it holds is one row count per file
    summary.seconds = time.perf_counter() - started
    return summarize_output(settings.output, set(todo), summary)

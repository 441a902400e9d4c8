"""Ray Data job: image files -> face crops in a Parquet dataset (with error rows).

Image paths are listed on the driver, then streamed through an actor pool where
each actor loads its detector once, reads, decodes, detects, crops, encodes and
labels a batch, and writes it as one Parquet file itself, named after the batch and
written atomically, so a retried batch replaces its file (exactly once): crops never cross the
object store and no write tasks compete for the CPUs, so memory stays flat
however many images there are. Re-running into the same output skips the images
already there.
"""

from __future__ import annotations

import json
import time
from functools import partial
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
    write_part,
)
from agepipe.cluster import init_ray
from agepipe.config import CropJobSettings, CropSettings, LabelSettings, to_dict
from agepipe.detectors import Detector, create_detector
from agepipe.faces import FACE_SCHEMA, arrow_fields, check_crop_names, crop_images
from agepipe.images import encode

CROP_SCHEMA = pa.schema(
    list(FACE_SCHEMA)
    + arrow_fields("image:binary age:float32 gender:string race:string age_group:string label_note:string")
)


def crop_rows(
    paths: list[str],
    detector: Detector,
    crop_settings: CropSettings,
    label_fn: Any,
    label_settings: LabelSettings,
) -> list[dict[str, Any]]:
    """Rows of the crop dataset for a batch of image URIs: every path gets at least one row."""
    rows = read_and_crop(paths, partial(crop_images, detector=detector, settings=crop_settings), detector.name)
    for row in rows:
        crop = row.pop("crop")
        row["image"] = None if crop is None else encode(crop, crop_settings.encoding, crop_settings.jpeg_quality)
        row.update(labels_lib.finalize(label_fn(row["path"]), label_settings))
    return rows


class CropWorker:
    """Ray Data actor: one detector per actor; a batch of paths in, one Parquet file of crops written,
    the batch's row count out."""

    def __init__(self, crop_settings: CropSettings, label_settings: LabelSettings, input_root: str, output: str):
        limit_threads(1)
        self.crop_settings = crop_settings
        self.label_settings = label_settings
        self.output = output
        self.detector = create_detector(crop_settings.detector, crop_settings.detector_weights, crop_settings.min_score)
        self.label_fn = labels_lib.label_source(label_settings, input_root)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        paths = [str(p) for p in batch["path"]]
        rows = crop_rows(paths, self.detector, self.crop_settings, self.label_fn, self.label_settings)
        write_part(rows_to_table(rows, CROP_SCHEMA), self.output, part_name(paths))
        return {"rows": np.array([len(rows)])}


CROP_SETTINGS_FILE = "_agepipe_crop.json"


def record_crop_settings(settings: CropJobSettings) -> None:
    """Write the crop and label settings beside the dataset; training copies them into checkpoints.

    Refuses to add to a dataset made with other crop settings: its crops would not match.
    """
    uri = storage.join(settings.output, CROP_SETTINGS_FILE)
    record = json.dumps({"crop": to_dict(settings.crop), "labels": to_dict(settings.labels)}, indent=2)
    if storage.exists(uri):
        previous = json.loads(storage.read_bytes(uri))
        if previous["crop"] != to_dict(settings.crop):
            raise ValueError(
                f"{settings.output} was cropped with other settings ({previous['crop']}); "
                "use a new output or the same settings"
            )
        return
    storage.write_bytes(uri, record.encode())


def run_crop(settings: CropJobSettings) -> JobSummary:
    """Crop every image under `settings.input` into the Parquet dataset at `settings.output`."""
    import ray

    if not settings.input or not settings.output:
        raise ValueError("crop needs --input and --output")
    labels_lib.label_source(settings.labels, settings.input)  # fail fast on bad label settings
    check_crop_names(settings.crop)
    create_detector(settings.crop.detector, settings.crop.detector_weights, settings.crop.min_score)
    todo, summary = plan_inputs(settings.input, settings.output)
    record_crop_settings(settings)
    started = time.perf_counter()
    if todo:
        init_ray(log_to_driver=False)
        actors, gpus = detection_pool(settings.crop.detector, settings.concurrency, settings.gpu_fraction)
        dataset, batch_size = path_dataset(todo, settings.batch_size, actors)
        written = dataset.map_batches(
            CropWorker,
            fn_constructor_kwargs={
                "crop_settings": settings.crop,
                "label_settings": settings.labels,
                "input_root": settings.input,
                "output": settings.output,
            },
            batch_size=batch_size,
            compute=ray.data.ActorPoolStrategy(size=actors),
            num_cpus=1,
            num_gpus=gpus,
            batch_format="numpy",
        )
        written.materialize()  # runs the job; what it holds is one row count per file
    summary.seconds = time.perf_counter() - started
    return summarize_output(settings.output, set(todo), summary)

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

import hashlib
import json
import logging
import math
import random
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from agepipe import labels as labels_lib
from agepipe import storage
from agepipe.cluster import init_ray
from agepipe.config import CropJobSettings, CropSettings, LabelSettings, to_dict
from agepipe.faces import DETECTORS, Detector, create_detector, crop_images
from agepipe.images import encode

logger = logging.getLogger(__name__)

FACE_FIELDS = [
    pa.field("path", pa.string()),
    pa.field("face_index", pa.int32()),
    pa.field("x1", pa.float32()),
    pa.field("y1", pa.float32()),
    pa.field("x2", pa.float32()),
    pa.field("y2", pa.float32()),
    pa.field("crop_box", pa.list_(pa.int32())),
    pa.field("score", pa.float32()),
    pa.field("num_faces", pa.int32()),
    pa.field("detector", pa.string()),
    pa.field("width", pa.int32()),
    pa.field("height", pa.int32()),
    pa.field("error", pa.string()),
]
CROP_SCHEMA = pa.schema(
    FACE_FIELDS
    + [
        pa.field("image", pa.binary()),
        pa.field("age", pa.float32()),
        pa.field("gender", pa.string()),
        pa.field("race", pa.string()),
        pa.field("age_group", pa.string()),
        pa.field("label_note", pa.string()),
    ]
)


def read_payloads(paths: list[str], threads: int = 8) -> list[bytes | None]:
    """File contents for each URI, None where the file cannot be read (remote reads overlap)."""

    def read(path: str) -> bytes | None:
        try:
            return storage.read_bytes(path)
        except OSError:
            return None

    if len(paths) <= 1 or not storage.is_remote(paths[0]):
        return [read(p) for p in paths]
    with ThreadPoolExecutor(max_workers=threads) as pool:
        return list(pool.map(read, paths))


def crop_rows(
    paths: list[str],
    detector: Detector,
    crop_settings: CropSettings,
    label_fn: Any,
    label_settings: LabelSettings,
) -> list[dict[str, Any]]:
    """Rows of the crop dataset for a batch of image URIs: every path gets at least one row."""
    payloads = read_payloads(paths)
    readable = [i for i, payload in enumerate(payloads) if payload is not None]
    cropped = crop_images([payloads[i] for i in readable], detector, crop_settings)
    per_path: dict[int, list[dict[str, Any]]] = dict(zip(readable, cropped, strict=True))
    rows = []
    for index, path in enumerate(paths):
        image_labels = labels_lib.finalize(label_fn(path), label_settings)
        for face in per_path.get(index) or [unreadable_row(detector.name)]:
            crop = face.pop("crop")
            image = None
            if crop is not None:
                image = encode(crop, crop_settings.encoding, crop_settings.jpeg_quality)
            rows.append({"path": path, **face, "image": image, **image_labels})
    return rows


def unreadable_row(detector_name: str) -> dict[str, Any]:
    """The row for a file that could not be read at all (crop and scoring jobs)."""
    row = {f.name: None for f in FACE_FIELDS if f.name != "path"}
    row.update(num_faces=0, detector=detector_name, error="unreadable", crop=None)
    return row


def rows_to_table(rows: list[dict[str, Any]], schema: pa.Schema) -> pa.Table:
    """A table with exactly `schema`'s columns and types (so every Parquet file agrees)."""
    return pa.Table.from_pylist([{f.name: row.get(f.name) for f in schema} for row in rows], schema)


TEMPORARY_PREFIX = "_tmp-"  # Parquet readers skip names that start with "_"


def part_name(paths: list[str]) -> str:
    """The output file name of a batch of inputs: the same batch always gets the same name."""
    digest = hashlib.sha1("\n".join(sorted(paths)).encode()).hexdigest()
    return f"part-{digest[:32]}.parquet"


def write_part(table: pa.Table, output: str, name: str) -> str:
    """Write `table` as file `name` of the Parquet dataset at `output`, atomically; returns its path.

    It is written under a temporary name and then renamed (a copy on S3, where each object appears
    whole), so a reader never sees half a file, and a batch retried after a lost node or a failed task
    replaces its own file instead of adding a second copy of its rows."""
    fs, root = storage.resolve(output)
    fs.create_dir(root, recursive=True)
    final = f"{root.rstrip('/')}/{name}"
    temporary = f"{root.rstrip('/')}/{TEMPORARY_PREFIX}{uuid.uuid4().hex}-{name}"
    pq.write_table(table, temporary, filesystem=fs)
    fs.move(temporary, final)
    return final


class CropWorker:
    """Ray Data actor: one detector per actor; a batch of paths in, one Parquet file of crops written,
    the batch's row count out."""

    def __init__(self, crop_settings: CropSettings, label_settings: LabelSettings, input_root: str, output: str):
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


def completed_paths(output: str) -> set[str]:
    """Input paths already present in an output dataset.

    A Parquet file that cannot be read (torn by an interrupted write) is
    deleted, so its images are done again rather than lost or duplicated.
    """
    fs, root = storage.resolve(output)
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        return set()
    if info.type != pafs.FileType.Directory:
        raise storage.StorageError(f"output {output!r} exists and is not a directory")
    done: set[str] = set()
    for entry in fs.get_file_info(pafs.FileSelector(root, recursive=True)):
        if entry.type == pafs.FileType.File and entry.base_name.startswith(TEMPORARY_PREFIX):
            fs.delete_file(entry.path)  # a writer that died before its rename
            continue
        if entry.type != pafs.FileType.File or not entry.path.endswith(".parquet"):
            continue
        try:
            with fs.open_input_file(entry.path) as f:
                done.update(pq.read_table(f, columns=["path"]).column("path").to_pylist())
        except (OSError, pa.ArrowInvalid) as exc:
            logger.warning("removing unreadable output file %s (%s)", entry.path, exc)
            fs.delete_file(entry.path)
    return done


@dataclass
class JobSummary:
    """What a crop or scoring run did, printed at the end."""

    images_found: int = 0
    images_skipped_done: int = 0
    images_processed: int = 0
    other_files_skipped: int = 0
    rows_written: int = 0
    faces_written: int = 0
    no_face: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def images_per_second(self) -> float:
        return self.images_processed / self.seconds if self.seconds else 0.0

    def render(self, title: str) -> str:
        errors = ", ".join(f"{k}={v}" for k, v in sorted(self.errors.items())) or "none"
        return (
            f"{title}: {self.images_found} images found, {self.images_skipped_done} already done, "
            f"{self.images_processed} processed in {self.seconds:.1f}s "
            f"({self.images_per_second:.1f} images/s); {self.faces_written} faces written, "
            f"{self.no_face} no_face, errors: {errors}; "
            f"{self.other_files_skipped} non-image files skipped"
        )


def summarize_output(output: str, paths: set[str], summary: JobSummary) -> JobSummary:
    """Fill face, no_face and error counts from the output rows of `paths` (this run's images)."""
    fs, root = storage.resolve(output)
    columns = ["path", "face_index", "error"]
    try:
        table = pq.read_table(root, filesystem=fs, columns=columns)
    except (OSError, pa.ArrowInvalid):
        return summary
    frame = table.to_pandas()
    frame = frame[frame["path"].isin(paths)]
    summary.rows_written = len(frame)
    summary.faces_written = int(frame["face_index"].notna().sum())
    summary.no_face = int((frame["error"] == "no_face").sum())
    counts = Counter(e for e in frame["error"].dropna() if e != "no_face")
    summary.errors = dict(counts)
    return summary


def plan_inputs(input_uri: str, output_uri: str) -> tuple[list[str], JobSummary]:
    """Images still to do and the summary so far; raises StorageError when storage is unusable."""
    images, other_files = storage.list_images(input_uri)
    done = completed_paths(output_uri)
    todo = [p for p in images if p not in done]
    # Listing order often follows the labels (UTKFace names start with the age); a seeded shuffle
    # spreads them over output files, so no file holds one narrow slice of the data.
    random.Random(0).shuffle(todo)
    summary = JobSummary(
        images_found=len(images),
        images_skipped_done=len(images) - len(todo),
        images_processed=len(todo),
        other_files_skipped=other_files,
    )
    return todo, summary


def path_dataset(paths: list[str], batch_size: int, actors: int) -> tuple[Any, int]:
    """A Ray dataset of `paths` in blocks of one batch each, and that batch size: no block splits into a
    full batch and a sliver (each sliver costs a model call), and small jobs get smaller batches so
    that every actor has work."""
    import ray

    batch_size = max(1, min(batch_size, math.ceil(len(paths) / (2 * actors))))
    blocks = math.ceil(len(paths) / batch_size)
    return ray.data.from_items([{"path": p} for p in paths], override_num_blocks=blocks), batch_size


def worker_count(requested: int | None) -> int:
    """Actors for a stage: as asked, else one per CPU of the cluster."""
    import ray

    if requested:
        return requested
    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def plan_detection_pool(actors: int, uses_gpu: bool, cluster_gpus: float, gpu_fraction: float) -> tuple[int, float]:
    """Actors for a detection stage and the GPU share each asks for. Ray hides the GPUs from an actor
    that asks for none, so a detector that runs on a GPU gets `gpu_fraction` of one where the cluster
    has GPUs, and the pool holds no more actors than the GPUs fit."""
    if not (uses_gpu and cluster_gpus > 0 and gpu_fraction > 0):
        return actors, 0.0
    return min(actors, max(1, int(cluster_gpus / gpu_fraction))), gpu_fraction


def detection_pool(
    detector: str, requested: int | None, gpu_fraction: float, gpu_share: float = 1.0
) -> tuple[int, float]:
    """`plan_detection_pool` for `detector` on the running Ray cluster, whose GPUs detection may hold
    `gpu_share` of."""
    import ray

    gpus = ray.cluster_resources().get("GPU", 0) * gpu_share
    return plan_detection_pool(worker_count(requested), DETECTORS[detector].uses_gpu, gpus, gpu_fraction)


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

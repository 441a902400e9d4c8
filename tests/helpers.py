"""Helpers shared by the tests: the agepipe command in a subprocess, a folder of bad inputs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image


def run_cli(
    *args: str, env: dict | None = None, timeout: float = 900, cwd: Path | None = None
) -> subprocess.CompletedProcess:
    """`agepipe ARGS...` in a fresh process, as a user runs it."""
    return subprocess.run(
        [sys.executable, "-m", "agepipe.cli", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=timeout,
        cwd=cwd,
    )


# A training run of seconds an epoch on the small crop dataset (conftest.small_faces). No balancing
# copies: on 240 faces most ages have fewer than the default 10, which made 748 training rows of 192.
TINY_RUN = (
    "--image-size",
    "64",
    "--batch-size",
    "32",
    "--num-workers",
    "2",
    "--backbone",
    "efficientnet_lite0",
    "--min-per-age",
    "1",
)


def kill_when_files_appear(args: list[str], output: Path, files: int, timeout: float = 300) -> None:
    """Start `agepipe ARGS` in a process group of its own (the driver and the Ray it starts), kill the
    whole group once `output` holds `files` Parquet files, and return once nothing writes there."""
    process = subprocess.Popen(
        [sys.executable, "-m", "agepipe.cli", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.time() + timeout
    while len(list(output.glob("*.parquet"))) < files:
        assert process.poll() is None and time.time() < deadline, "no output files before the run ended"
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    # Ray's worker processes run in process groups of their own and exit once they see their raylet
    # gone: one in the middle of a batch may still finish writing it. Wait until the output is still.
    files, still_since = set(output.glob("*")), time.time()
    while time.time() - still_since < 5 and time.time() < deadline + 60:
        time.sleep(0.5)
        if (now := set(output.glob("*"))) != files:
            files, still_since = now, time.time()


def registered_checkpoints(run_dir: Path) -> list[str]:
    """Checkpoints a Ray Train run (its storage folder) has registered, which a resumed run sees: a
    checkpoint folder appears before its entry in the snapshot, and a run killed in between resumes
    from the one before."""
    try:
        snapshot = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return []
    return sorted(result["checkpoint_dir_name"] for result in snapshot["checkpoint_results"])


# What the bad-input folder's files must come out as (None: decoded and a face found).
BAD_INPUT_ERRORS = {
    "empty.jpg": "empty",
    "truncated.jpg": "truncated",
    "corrupt.png": "corrupt",
    "text.jpg": "not_image",
    "bomb.png": "too_large",
    "no_face.jpg": "no_face",
}


def bad_input_folder(root: Path) -> set[str]:
    """Every kind of bad input beside good images; returns the image files' paths."""
    from skimage import data

    photo = Image.fromarray(data.astronaut())
    photo.save(root / "good.jpg")
    photo.save(root / "UPPER.JPEG")
    photo.convert("CMYK").save(root / "cmyk.jpg")
    photo.convert("RGBA").save(root / "rgba.png")
    photo.convert("L").save(root / "gray.webp")
    photo.save(root / "bitmap.bmp")
    Image.fromarray(np.asarray(photo.convert("L")).astype(np.uint16) * 257).save(root / "deep16.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways; upright (and so detectable) only once EXIF is applied
    photo.rotate(90).save(root / "rotated.jpg", exif=exif.tobytes())
    Image.fromarray(data.coffee()).save(root / "no_face.jpg")
    (root / "empty.jpg").write_bytes(b"")
    full = (root / "good.jpg").read_bytes()
    (root / "truncated.jpg").write_bytes(full[: len(full) // 3])
    (root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(2000))
    (root / "text.jpg").write_text("this is not an image")
    Image.new("1", (12_000, 12_000)).save(root / "bomb.png")
    (root / "notes.txt").write_text("stray file")
    (root / "labels.csv").write_text("path,age\n")
    (root / "folder.jpg").mkdir()
    photo.save(root / "folder.jpg" / "inside.png")
    return {str(p) for p in root.rglob("*") if p.is_file() and p.suffix.lower() != ".txt" and p.suffix != ".csv"}

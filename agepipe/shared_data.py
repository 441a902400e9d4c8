"""The shared data folder's inputs of the benchmarks and scripts: the UTKFace images and YuNet's weights."""

from __future__ import annotations

import os
from pathlib import Path

from agepipe.config import shared_data_dir

UTKFACE = shared_data_dir() / "data" / "utkface"
YUNET = str(shared_data_dir() / "models" / "face_detection_yunet.onnx")
# The bundled models record their YuNet weights by file name: found here without a download.
os.environ.setdefault("AGEPIPE_WEIGHTS_PATH", str(shared_data_dir() / "models"))


def utkface_files(limit: int | None = None) -> list[Path]:
    """The UTKFace images by name, or `limit` of them spread evenly over that order."""
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

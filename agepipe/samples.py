"""Real photos that ship with scikit-image (public domain), so a fresh machine has input."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

SAMPLE_PHOTOS = ("astronaut", "coffee", "chelsea", "camera")


def write_sample_photos(folder: Path) -> Path:
    """Write scikit-image's sample photos as JPEGs into `folder`: `astronaut` has a face, `coffee` none."""
    from skimage import data

    folder.mkdir(parents=True, exist_ok=True)
    for name in SAMPLE_PHOTOS:
        target = folder / f"{name}.jpg"
        if not target.exists():
            Image.fromarray(getattr(data, name)()).save(target, quality=95)
    return folder

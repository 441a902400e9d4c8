"""Composite photos: face images pasted at known places onto a textured background, for tests and benchmarks
that need photos with several faces whose boxes are known."""

from __future__ import annotations

import numpy as np
from PIL import Image


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

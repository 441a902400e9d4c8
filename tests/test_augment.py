"""Training augmentation on real crops from the shared UTKFace folder (no cluster)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from agepipe.augment import RandomBackground, fill_mask, image_transform
from agepipe.faces import FILL_COLOUR
from agepipe.model import resize_uint8


@pytest.fixture
def faces(utkface_dir: Path) -> list[torch.Tensor]:
    return [_image(path) for path in sorted(utkface_dir.glob("*.jpg"))[:4]]


def _image(path: Path) -> torch.Tensor:
    return torch.from_numpy(np.asarray(Image.open(path).convert("RGB")).copy()).permute(2, 0, 1)


def _with_fill(face: torch.Tensor, strip: int) -> torch.Tensor:
    """The face at 128 px with its top `strip` rows and a rotated-away corner in the fill colour, as
    a landmark crop of an aligned image shows them."""
    crop = resize_uint8(face, 128).clone()
    fill = torch.tensor(FILL_COLOUR, dtype=torch.uint8)[:, None, None]
    crop[:, :strip] = fill
    rows, cols = torch.meshgrid(torch.arange(128), torch.arange(128), indexing="ij")
    crop[:, (rows + cols) > 220] = fill[:, :, 0]
    return crop


def test_fill_mask_finds_the_fill_at_the_border_and_not_inside_the_face(faces: list[torch.Tensor]) -> None:
    crop = _with_fill(faces[0], strip=20)
    inner = crop.clone()
    inner[:, 60:66, 60:66] = torch.tensor(FILL_COLOUR, dtype=torch.uint8)[:, None, None]
    mask = fill_mask(inner)
    assert mask[:20].all() and mask[127, 127]
    assert not mask[60:66, 60:66].any()  # fill-coloured but not reached from the border
    assert 0.18 < mask.mean() < 0.30


def test_random_background_replaces_only_the_fill(faces: list[torch.Tensor]) -> None:
    background = RandomBackground(p=1.0)
    source, crop = resize_uint8(faces[1], 128), _with_fill(faces[2], strip=24)
    assert torch.equal(background(source), source)  # nothing seen yet to take a background from
    mask = torch.from_numpy(fill_mask(crop))
    out = background(crop)
    assert torch.equal(out[:, ~mask], crop[:, ~mask])
    replaced = (out[:, mask].int() - torch.tensor(FILL_COLOUR)[:, None]).abs().amax(0)
    assert (replaced > 10).float().mean() > 0.5


def test_wild_augmentation_gives_model_inputs(faces: list[torch.Tensor]) -> None:
    crops = [_with_fill(face, strip=16) for face in faces]
    outputs = [image_transform(96, train=True, augmentation="wild")(crop) for crop in crops]
    assert all(o.shape == (3, 96, 96) and o.dtype == torch.float32 for o in outputs)
    assert not torch.equal(outputs[2], image_transform(96, train=False, augmentation="wild")(crops[2]))

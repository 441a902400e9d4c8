"""Training augmentation on real crops from the shared UTKFace folder (no cluster)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from agepipe.augment import RandomBackground, border_cut_mask, fill_mask, image_transform
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


def test_border_cut_mask_cuts_its_share_of_the_source_from_the_side() -> None:
    source = np.zeros((128, 128), bool)
    source[20:, :] = True  # a crop whose top 20 rows lie outside its source image
    left = border_cut_mask(source, 0.25, side=0, tilt=0.0)
    assert left[:, :32].all() and not left[:, 32:].any()
    top = border_cut_mask(source, 0.25, side=2, tilt=0.0)
    assert top[:47].all() and not top[47:].any()  # 20 + a quarter of the 108 source rows
    bottom = border_cut_mask(source, 0.5, side=3, tilt=0.0)
    assert bottom[74:].all() and not bottom[:74].any()
    tilted = border_cut_mask(source, 0.25, side=0, tilt=10.0)
    assert not np.array_equal(tilted, left)
    assert abs(tilted[source].mean() - 0.25) < 0.01  # the line turns about its point halfway down the source


def test_random_background_cut_fills_one_side_and_keeps_the_rest(faces: list[torch.Tensor]) -> None:
    cut = RandomBackground(p=0.0, border_cut=1.0, cut_tilt=0.0)
    fill = torch.tensor(FILL_COLOUR, dtype=torch.uint8)[:, None]
    for face in faces:
        crop = _with_fill(face, strip=16)
        out = cut(crop)
        changed = (out != crop).any(0).numpy()
        assert (out[:, torch.from_numpy(changed)] == fill).all()
        visible = (crop != fill[:, :, None]).any(0).numpy()
        coordinates = np.mgrid[0:128, 0:128]
        bands = [  # every visible pixel up to the cut's reach from one side, and nothing else
            visible & (position < reach if from_start else position >= reach)
            for position, used in ((coordinates[1], changed.any(0)), (coordinates[0], changed.any(1)))
            for from_start, reach in ((True, np.flatnonzero(used).max() + 1), (False, np.flatnonzero(used).min()))
        ]
        assert any(np.array_equal(changed, band) for band in bands)
        assert 0.05 < changed[visible].mean() < 0.45  # 10-40% of the source's extent, the corner aside
        assert fill_mask(out).sum() > fill_mask(crop).sum()


@pytest.mark.parametrize("augmentation", ["wild", "wild_cut"])
def test_wild_augmentations_give_model_inputs(faces: list[torch.Tensor], augmentation: str) -> None:
    crops = [_with_fill(face, strip=16) for face in faces]
    outputs = [image_transform(96, train=True, augmentation=augmentation)(crop) for crop in crops]
    assert all(o.shape == (3, 96, 96) and o.dtype == torch.float32 for o in outputs)
    assert not torch.equal(outputs[2], image_transform(96, train=False, augmentation=augmentation)(crops[2]))

"""Training inputs: crops decoded from the crop dataset, augmented by name, as model tensors."""

from __future__ import annotations

import collections
import functools
import io
from collections.abc import Callable

import cv2
import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2

from agepipe.config import AgeGroups
from agepipe.faces import FILL_COLOUR
from agepipe.labels import GENDERS, group_index
from agepipe.model import model_input, normalize_uint8, resize_uint8
from agepipe.registry import Registry


class DownUp:
    """Downscale to a random fraction of the side, then back: the blur of a small face upscaled."""

    def __init__(self, scale: tuple[float, float]) -> None:
        self.scale = scale

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        side = image.shape[-1]
        small = max(8, round(side * float(torch.empty(1).uniform_(*self.scale))))
        return resize_uint8(resize_uint8(image, small), side)


def fill_mask(image: torch.Tensor, tolerance: int = 10) -> np.ndarray:
    """Where a crop (uint8 CHW) shows the crop's fill colour, as (H, W) bool: the pixels within `tolerance`
    of FILL_COLOUR in every channel that connect to the crop's border, grown by a pixel to take in the
    seam that resizing blends."""
    pixels = image.permute(1, 2, 0).numpy().astype(np.int16)
    near = (np.abs(pixels - np.array(FILL_COLOUR, np.int16)).max(axis=2) <= tolerance).astype(np.uint8)
    count, labels = cv2.connectedComponents(near, connectivity=4)
    if count <= 1:
        return np.zeros(near.shape, bool)
    border = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    touching = np.isin(labels, border[border > 0])
    return cv2.dilate(touching.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)


def border_cut_mask(source: np.ndarray, fraction: float, side: int, tilt: float) -> np.ndarray:
    """Where a photo's border cuts off a face whose source image covers `source` ((H, W) bool) in its
    crop: the half-plane past a line `fraction` of the source's extent in from its `side` (0 left,
    1 right, 2 top, 3 bottom), tilted by `tilt` degrees, as (H, W) bool."""
    height, width = source.shape
    rows, cols = np.nonzero(source) if source.any() else (np.array([0, height - 1]), np.array([0, width - 1]))
    top, bottom, left, right = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    centre = ((left + right) / 2.0, (top + bottom) / 2.0)
    inward, point = {
        0: ((1.0, 0.0), (left + fraction * (right - left), centre[1])),
        1: ((-1.0, 0.0), (right - fraction * (right - left), centre[1])),
        2: ((0.0, 1.0), (centre[0], top + fraction * (bottom - top))),
        3: ((0.0, -1.0), (centre[0], bottom - fraction * (bottom - top))),
    }[side]
    angle = np.deg2rad(tilt)
    normal = (
        inward[0] * np.cos(angle) - inward[1] * np.sin(angle),
        inward[0] * np.sin(angle) + inward[1] * np.cos(angle),
    )
    y, x = np.mgrid[0:height, 0:width] + 0.5
    return (x - point[0]) * normal[0] + (y - point[1]) * normal[1] < 0


class RandomBackground:
    """Fill what lies outside a face's source image with a piece of another training crop, zoomed and
    placed at random: an aligned dataset's crops run past their image into the flat fill colour, where
    a face in a photo has a background. Sources are the last `memory` crops this transform has seen.
    With probability `border_cut` the face is also cut off, as a photo's border cuts a face near it: the
    fill colour past a line `cut_fraction` of the source image in from one side, tilted up to
    `cut_tilt` degrees, as the crop of such a face is filled past the photo."""

    def __init__(
        self,
        p: float = 0.8,
        memory: int = 16,
        zoom: tuple[float, float] = (1.0, 3.0),
        border_cut: float = 0.0,
        cut_fraction: tuple[float, float] = (0.1, 0.4),
        cut_tilt: float = 15.0,
    ) -> None:
        self.p = p
        self.zoom = zoom
        self.border_cut = border_cut
        self.cut_fraction = cut_fraction
        self.cut_tilt = cut_tilt
        self._seen: collections.deque[torch.Tensor] = collections.deque(maxlen=memory)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        sources = list(self._seen)
        self._seen.append(image)
        with_background = bool(sources) and float(torch.rand(1)) < self.p
        # No draw when cutting is off, so the wild set's random stream is as before.
        with_cut = self.border_cut > 0 and float(torch.rand(1)) < self.border_cut
        if not (with_background or with_cut):
            return image
        mask = fill_mask(image)
        if with_background and mask.any():
            image = torch.where(torch.from_numpy(mask), self._texture(sources, image.shape[-1]), image)
        if with_cut:
            cut = border_cut_mask(
                ~mask,
                float(torch.empty(1).uniform_(*self.cut_fraction)),
                int(torch.randint(4, (1,))),
                float(torch.empty(1).uniform_(-self.cut_tilt, self.cut_tilt)),
            )
            fill = torch.tensor(FILL_COLOUR, dtype=image.dtype)[:, None, None]
            image = torch.where(torch.from_numpy(cut), fill, image)
        return image

    def _texture(self, sources: list[torch.Tensor], size: int) -> torch.Tensor:
        source = sources[int(torch.randint(len(sources), (1,)))]
        side = source.shape[-1]
        window = max(8, round(side / float(torch.empty(1).uniform_(*self.zoom))))
        top, left = (int(torch.randint(side - window + 1, (1,))) for _ in range(2))
        texture = resize_uint8(source[:, top : top + window, left : left + window], size)
        if float(torch.rand(1)) < 0.5:
            texture = texture.flip(-1)
        return texture


def basic_augmentation(affine_fill: tuple[int, int, int] = (0, 0, 0)) -> list[Callable[[torch.Tensor], torch.Tensor]]:
    return [
        v2.RandomHorizontalFlip(),
        v2.RandomAffine(degrees=15, scale=(0.9, 1.1), translate=(0.05, 0.05), fill=list(affine_fill)),
        # No hue jitter: it costs more than the rest of the augmentation together on CPU.
        v2.ColorJitter(brightness=0.25, contrast=0.25, saturation=0.25),
    ]


def photo_degradations() -> list[Callable[[torch.Tensor], torch.Tensor]]:
    """What faces in wide photos suffer: low resolution, blur, JPEG compression."""
    return [
        v2.RandomApply([DownUp(scale=(0.3, 0.8))], p=0.3),
        v2.RandomApply([v2.GaussianBlur(5, sigma=(0.3, 1.5))], p=0.2),
        v2.RandomApply([v2.JPEG(quality=(50, 95))], p=0.3),
    ]


def photo_augmentation() -> list[Callable[[torch.Tensor], torch.Tensor]]:
    return [*basic_augmentation(), *photo_degradations()]


def wild_augmentation(border_cut: float = 0.0) -> list[Callable[[torch.Tensor], torch.Tensor]]:
    """The photo set with a background wherever the crop runs past its image, the corners that the
    affine uncovers included (they get the fill colour first, as the crop job gives them); with
    `border_cut`, that share of faces cut off by a photo's border too (`RandomBackground`)."""
    return [
        *basic_augmentation(affine_fill=FILL_COLOUR),
        RandomBackground(border_cut=border_cut),
        *photo_degradations(),
    ]


AUGMENTATIONS: Registry[Callable[[], list[Callable[[torch.Tensor], torch.Tensor]]]] = Registry(
    "augmentation",
    {
        "basic": basic_augmentation,
        "photo": photo_augmentation,
        "wild": wild_augmentation,
        "wild_cut": functools.partial(wild_augmentation, border_cut=0.2),  # one face in five cut off
    },
)


def image_transform(image_size: int, train: bool, augmentation: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """uint8 CHW tensor -> normalized float tensor; augmentation (by name) only for training."""
    if not train:
        return functools.partial(model_input, size=image_size)
    return v2.Compose(
        [functools.partial(resize_uint8, size=image_size), *AUGMENTATIONS.create(augmentation), normalize_uint8]
    )


def decode_crop(data: bytes) -> torch.Tensor:
    """An encoded crop from the crop job as a uint8 CHW tensor."""
    array = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


def to_tensors(
    batch: dict[str, np.ndarray], transform: Callable[[torch.Tensor], torch.Tensor], groups: AgeGroups
) -> dict[str, torch.Tensor]:
    """A Ray Data batch of crop rows -> model inputs and targets."""
    images = torch.stack([transform(decode_crop(b)) for b in batch["image"]])
    ages = np.array(batch["age"], dtype=np.float32)  # a writable copy for torch
    genders = [GENDERS.index(g) if g in GENDERS else -1 for g in batch["gender"]]
    tensors = {
        "image": images.contiguous(memory_format=torch.channels_last),
        "age": torch.from_numpy(ages),
        "group": torch.tensor([group_index(float(a), groups) for a in ages]),
        "gender": torch.tensor(genders),
    }
    if "teacher" in batch:  # a distilled run's training rows: the teacher's predictions, one row a face
        tensors["teacher"] = torch.from_numpy(np.stack(batch["teacher"]).astype(np.float32))
    return tensors

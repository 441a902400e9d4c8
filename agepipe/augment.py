"""Training inputs: crops decoded from the crop dataset, augmented by name, as model tensors."""

from __future__ import annotations

import functools
import io
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2

from agepipe.config import AgeGroups
from agepipe.labels import GENDERS, group_index
from agepipe.model import model_input, normalize_uint8, resize_uint8


class DownUp:
    """Downscale to a random fraction of the side, then back: the blur of a small face upscaled."""

    def __init__(self, scale: tuple[float, float]) -> None:
        self.scale = scale

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        side = image.shape[-1]
        small = max(8, round(side * float(torch.empty(1).uniform_(*self.scale))))
        return resize_uint8(resize_uint8(image, small), side)


def basic_augmentation() -> list[Callable[[torch.Tensor], torch.Tensor]]:
    return [
        v2.RandomHorizontalFlip(),
        v2.RandomAffine(degrees=15, scale=(0.9, 1.1), translate=(0.05, 0.05)),
        # No hue jitter: it costs more than the rest of the augmentation together on CPU.
        v2.ColorJitter(brightness=0.25, contrast=0.25, saturation=0.25),
    ]


def photo_augmentation() -> list[Callable[[torch.Tensor], torch.Tensor]]:
    """The basic set plus what faces in wide photos suffer: low resolution, blur, JPEG compression."""
    return [
        *basic_augmentation(),
        v2.RandomApply([DownUp(scale=(0.3, 0.8))], p=0.3),
        v2.RandomApply([v2.GaussianBlur(5, sigma=(0.3, 1.5))], p=0.2),
        v2.RandomApply([v2.JPEG(quality=(50, 95))], p=0.3),
    ]


AUGMENTATIONS: dict[str, Callable[[], list[Callable[[torch.Tensor], torch.Tensor]]]] = {
    "basic": basic_augmentation,
    "photo": photo_augmentation,
}


def image_transform(image_size: int, train: bool, augmentation: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """uint8 CHW tensor -> normalized float tensor; augmentation (by name) only for training."""
    if not train:
        return functools.partial(model_input, size=image_size)
    if augmentation not in AUGMENTATIONS:
        raise ValueError(f"unknown augmentation {augmentation!r}: use one of {sorted(AUGMENTATIONS)}")
    return v2.Compose(
        [functools.partial(resize_uint8, size=image_size), *AUGMENTATIONS[augmentation](), normalize_uint8]
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
    return {
        "image": images.contiguous(memory_format=torch.channels_last),
        "age": torch.from_numpy(ages),
        "group": torch.tensor([group_index(float(a), groups) for a in ages]),
        "gender": torch.tensor(genders),
    }

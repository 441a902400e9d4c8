"""Faces to crops: the crop geometries, the one crop function and the per-face row.

A geometry (`CROP_GEOMETRIES`, by name) maps a detected face to the square crop's transform.
`crop_images` is the only place where faces become crops: the crop job, the
scoring job and the server all call it, with settings recorded in checkpoints.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import cv2
import numpy as np
import pyarrow as pa

from agepipe.config import CropSettings
from agepipe.detectors import DETECTORS, Detector, Face, clip_box, scale_face
from agepipe.images import ENCODINGS, ImageError, SourceImage
from agepipe.registry import Registry

# A geometry maps a face to the affine transform from source pixels to crop pixels. What falls outside
# the image is filled with ImageNet's mean colour, which the network's input normalization turns into
# zeros: the most neutral input there is. Reflection would mirror the face into the border (a second
# chin or row of eyes wherever an aligned dataset's face reaches its image's edge).

FILL_MODE = cv2.BORDER_CONSTANT
FILL_COLOUR = (124, 116, 104)

# Five landmarks in a face's square box, as fractions of its side: the median positions, left-right
# symmetrized, of YuNet's landmarks within YuNet's own face boxes over UTKFace (one image in 100).
# The landmark crop so frames the same region as the box crop, eyes level and at a fixed scale.
LANDMARK_TEMPLATE = np.array(
    [[0.310, 0.363], [0.690, 0.363], [0.500, 0.581], [0.337, 0.730], [0.663, 0.730]], dtype=np.float64
)


def square_crop_box(box: Sequence[float], margin: float) -> tuple[float, float, float]:
    """The crop square of a face box: centred on the box, side the box's longer side grown by `margin`
    on each side. Returns (left, top, side) in source pixels, not clipped to the image."""
    x1, y1, x2, y2 = (float(v) for v in box)
    side = max(max(x2 - x1, y2 - y1) * (1.0 + 2.0 * margin), 1.0)
    return (x1 + x2 - side) / 2.0, (y1 + y2 - side) / 2.0, side


def _square_transform(left: float, top: float, side: float, size: int) -> np.ndarray:
    """Scale and shift only: the source square (left, top, side) becomes the size x size crop."""
    scale = size / side
    return np.array([[scale, 0.0, -left * scale], [0.0, scale, -top * scale]])


def box_transform(face: Face, margin: float, size: int, image_shape: tuple[int, ...]) -> np.ndarray:
    """The margin-grown square around the face box becomes the crop."""
    return _square_transform(*square_crop_box(face.box, margin), size)


def landmark_transform(face: Face, margin: float, size: int, image_shape: tuple[int, ...]) -> np.ndarray:
    """Similarity transform (rotation, scale, shift) that puts the five landmarks on the template:
    eyes level, scale from the eye and mouth positions, the template's face square grown by `margin`.
    Faces without landmarks (detectors that give none) fall back to the box crop."""
    if face.landmarks is None:
        return box_transform(face, margin, size, image_shape)
    target = (0.5 + (LANDMARK_TEMPLATE - 0.5) / (1.0 + 2.0 * margin)) * size
    source = np.asarray(face.landmarks, dtype=np.float64)
    # Least squares over all five points (Umeyama): a robust fit would drop points on a profile face.
    source_mean, target_mean = source.mean(0), target.mean(0)
    source_c, target_c = source - source_mean, target - target_mean
    variance = (source_c**2).sum()
    if variance <= 0:
        return box_transform(face, margin, size, image_shape)
    a = (source_c * target_c).sum()
    b = (source_c[:, 0] * target_c[:, 1] - source_c[:, 1] * target_c[:, 0]).sum()
    rotation = np.array([[a, -b], [b, a]]) / variance
    shift = target_mean - rotation @ source_mean
    return np.hstack([rotation, shift[:, None]])


def clamped_transform(face: Face, margin: float, size: int, image_shape: tuple[int, ...]) -> np.ndarray:
    """The crop of checkpoints made before the geometry setting: the square is shrunk to fit the image
    and moved inside it, so the face's scale in its crop depends on the image. Kept only so that such
    checkpoints score as they were measured."""
    height, width = image_shape[:2]
    x1, y1, x2, y2 = clip_box(face.box, width, height)
    side = max(int(round(min(max(x2 - x1, y2 - y1) * (1.0 + 2.0 * margin), width, height))), 1)
    left = int(round(min(max((x1 + x2 - side) / 2.0, 0), width - side)))
    top = int(round(min(max((y1 + y2 - side) / 2.0, 0), height - side)))
    return _square_transform(left, top, side, size)


CROP_GEOMETRIES: Registry[Callable[[Face, float, int, tuple[int, ...]], np.ndarray]] = Registry(
    "crop geometry", {"box": box_transform, "landmarks": landmark_transform, "clamped": clamped_transform}
)


def warp_crop(image: np.ndarray, transform: np.ndarray, size: int) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """The size x size crop that `transform` (source -> crop pixels) selects, outside the image filled by
    FILL_MODE, and the crop's bounding box in source pixels."""
    if transform[0, 1] == 0 and transform[1, 0] == 0 and math.isclose(transform[0, 0], transform[1, 1]):
        return _square_crop(image, transform, size)
    scale = math.sqrt(abs(np.linalg.det(transform[:, :2])))
    height, width = image.shape[:2]
    inverse = cv2.invertAffineTransform(transform)
    corners = np.array([[0, 0, 1], [size, 0, 1], [0, size, 1], [size, size, 1]], dtype=np.float64) @ inverse.T
    left, top = (int(v) - 1 for v in np.floor(corners.min(0)))
    right, bottom = (int(v) + 1 for v in np.ceil(corners.max(0)))
    # Only the source region under the crop is warped; where it shrinks it is area-resized to the crop's
    # scale first, since bilinear warping alone aliases a large face.
    x0, y0, x1, y1 = max(left, 0), max(top, 0), min(right, width), min(bottom, height)
    if x1 <= x0 or y1 <= y0:
        x0, y0, x1, y1 = 0, 0, width, height
    patch = image[y0:y1, x0:x1]
    local = transform.copy()
    local[:, 2] += transform[:, :2] @ np.array([x0, y0], dtype=np.float64)
    if scale < 1.0:
        shrunk = (max(1, round(patch.shape[1] * scale)), max(1, round(patch.shape[0] * scale)))
        local[:, 0] *= patch.shape[1] / shrunk[0]
        local[:, 1] *= patch.shape[0] / shrunk[1]
        patch = cv2.resize(patch, shrunk, interpolation=cv2.INTER_AREA)
    crop = cv2.warpAffine(
        patch, local, (size, size), flags=cv2.INTER_LINEAR, borderMode=FILL_MODE, borderValue=FILL_COLOUR
    )
    return np.ascontiguousarray(crop, dtype=np.uint8), (left, top, right, bottom)


def _square_crop(image: np.ndarray, transform: np.ndarray, size: int) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """An axis-aligned crop: the source square cut out (filled where it leaves the image) and resized."""
    height, width = image.shape[:2]
    scale = transform[0, 0]
    side = max(int(round(size / scale)), 1)
    left, top = int(round(-transform[0, 2] / scale)), int(round(-transform[1, 2] / scale))
    right, bottom = left + side, top + side
    patch = image[max(top, 0) : max(min(bottom, height), 0), max(left, 0) : max(min(right, width), 0)]
    pads = (max(-top, 0), max(bottom - height, 0), max(-left, 0), max(right - width, 0))
    if patch.size == 0:
        patch = np.full((side, side, image.shape[2]), FILL_COLOUR, dtype=image.dtype)
    elif any(pads):
        patch = cv2.copyMakeBorder(patch, *pads, FILL_MODE, value=FILL_COLOUR)
    interpolation = cv2.INTER_AREA if side > size else cv2.INTER_LINEAR
    crop = cv2.resize(patch, (size, size), interpolation=interpolation)
    return np.ascontiguousarray(crop, dtype=np.uint8), (left, top, right, bottom)


def check_crop_names(settings: CropSettings) -> None:
    """Refuse a crop whose detector, geometry or encoding is not a registered name, before any image."""
    DETECTORS.check(settings.detector)
    CROP_GEOMETRIES.check(settings.geometry)
    ENCODINGS.check(settings.encoding)


def crop_transform(face: Face, settings: CropSettings, image_shape: tuple[int, ...]) -> np.ndarray:
    """The affine transform from source pixels to the face's crop, by `settings.geometry`."""
    return CROP_GEOMETRIES.create(settings.geometry, face, settings.margin, settings.size, image_shape)


def crop_face(image: np.ndarray, face: Face, settings: CropSettings) -> tuple[np.ndarray, tuple]:
    """The crop of one face by `settings.geometry`, resized to `settings.size`, and its box in source pixels."""
    return warp_crop(image, crop_transform(face, settings, image.shape), settings.size)


def whole_image_crop(image: np.ndarray, settings: CropSettings) -> tuple[np.ndarray, tuple]:
    """An image that already is a face crop, resized to `settings.size`."""
    height, width = image.shape[:2]
    interpolation = cv2.INTER_AREA if max(height, width) > settings.size else cv2.INTER_LINEAR
    crop = cv2.resize(image, (settings.size, settings.size), interpolation=interpolation)
    return np.ascontiguousarray(crop, dtype=np.uint8), (0, 0, width, height)


def select_faces(faces: list[Face], settings: CropSettings) -> list[Face]:
    """Faces largest first; only the largest unless `settings.all_faces`."""
    ordered = sorted(faces, key=lambda f: f.area, reverse=True)
    return ordered if settings.all_faces else ordered[:1]


def arrow_fields(columns: str) -> list[pa.Field]:
    """Arrow fields from "name:type" words: pyarrow's type aliases (string, int32, float32, binary) or
    list<alias>."""
    fields = []
    for column in columns.split():
        name, kind = column.split(":")
        if kind.startswith("list<") and kind.endswith(">"):
            fields.append(pa.field(name, pa.list_(pa.type_for_alias(kind[5:-1]))))
        else:
            fields.append(pa.field(name, pa.type_for_alias(kind)))
    return fields


# The per-face columns every job's output starts with (crop, score and serve rows, the evaluation's
# input): one row per face found, or one row with an `error` for an image without one. The box is in
# source pixels; crop_box is the crop's bounding box there.
FACE_SCHEMA = pa.schema(
    arrow_fields(
        "path:string face_index:int32 x1:float32 y1:float32 x2:float32 y2:float32 crop_box:list<int32> "
        "score:float32 num_faces:int32 detector:string width:int32 height:int32 error:string"
    )
)

_UNSET_FACE_COLUMNS = {f.name: None for f in FACE_SCHEMA if f.name != "path"}


def crop_images(
    payloads: Sequence[bytes | np.ndarray | SourceImage],
    detector: Detector,
    settings: CropSettings,
    source_side: int | None = None,
) -> list[list[dict[str, Any]]]:
    """Decode, detect and crop a batch of images (encoded bytes, RGB pixels or opened images); one list of
    rows per input.

    Each row has face_index, x1..y2 (face box in the upright image's pixels), crop_box, score,
    num_faces, detector, width, height, `crop` (RGB uint8 array or None) and `error` (None, `no_face`,
    or the decoding failure's reason).

    Images go through `detector.batch_size` at a time, each decoded only as finely as a step needs: the
    detector's input side for detection, and for the crops enough pixels that each face's crop region
    holds at least `source_side` of them (default `settings.size`) where the image has them. A frame is
    released once its crops are cut, so memory does not grow with the batch or the photo size.
    """
    results: list[list[dict[str, Any]]] = []
    for start in range(0, len(payloads), detector.batch_size):
        sources = [_open(payload, settings) for payload in payloads[start : start + detector.batch_size]]
        opened = [source for source in sources if isinstance(source, SourceImage)]
        found = iter(_detect(opened, detector))
        for source in sources:
            if isinstance(source, str):
                results.append([face_row(detector.name, error=source)])
                continue
            results.append(_crop_rows(source, next(found), detector, settings, source_side or settings.size))
            source.release()
    return results


def _open(payload: bytes | np.ndarray | SourceImage, settings: CropSettings) -> SourceImage | str:
    """The image, or the reason it cannot be decoded."""
    if isinstance(payload, SourceImage):
        return payload
    if isinstance(payload, np.ndarray):
        return SourceImage.from_pixels(payload)
    try:
        return SourceImage(payload, settings.max_pixels)
    except ImageError as exc:
        return exc.reason


def _detect(sources: list[SourceImage], detector: Detector) -> list[list[Face] | str]:
    """Faces per image in its upright pixels, found on a decode no larger than the detector looks at;
    the decoding failure's reason for an image whose header reads but whose pixels do not."""
    if detector.whole_image:
        return [[Face((0.0, 0.0, float(s.width), float(s.height)), 1.0)] for s in sources]
    views: dict[int, np.ndarray] = {}
    errors: dict[int, str] = {}
    for index, source in enumerate(sources):
        try:
            views[index] = source.pixels(detector.input_side)
        except ImageError as exc:
            errors[index] = exc.reason
    found = dict(zip(views, detector.detect(list(views.values())), strict=True))
    return [
        errors[i]
        if i in errors
        else [scale_face(face, s.width / views[i].shape[1], s.height / views[i].shape[0]) for face in found[i]]
        for i, s in enumerate(sources)
    ]


def crop_region_side(face: Face, settings: CropSettings, image_shape: tuple[int, ...]) -> float:
    """How many source pixels across the face's crop takes."""
    transform = crop_transform(face, settings, image_shape)
    return settings.size / math.sqrt(abs(np.linalg.det(transform[:, :2])))


def _crop_rows(
    source: SourceImage, faces: list[Face] | str, detector: Detector, settings: CropSettings, source_side: int
) -> list[dict[str, Any]]:
    """The rows of one image: its chosen faces cut from a decode that gives each crop region at least
    `source_side` pixels across where the image has them."""
    width, height = source.width, source.height
    if isinstance(faces, str):
        return [face_row(detector.name, error=faces)]
    chosen = select_faces(faces, settings)
    if not chosen:
        return [face_row(detector.name, error="no_face", width=width, height=height)]
    if detector.whole_image:
        needed = source_side
    else:
        shape = (height, width)
        needed = max(
            math.ceil(source.long_side * min(1.0, source_side / crop_region_side(face, settings, shape)))
            for face in chosen
        )
    try:
        image = source.pixels(needed)
    except ImageError as exc:
        return [face_row(detector.name, error=exc.reason)]
    scale_x, scale_y = width / image.shape[1], height / image.shape[0]
    rows = []
    for index, face in enumerate(chosen):
        if detector.whole_image:
            crop, crop_box = whole_image_crop(image, settings)
        else:
            crop, crop_box = crop_face(image, scale_face(face, 1 / scale_x, 1 / scale_y), settings)
        left, top, right, bottom = crop_box
        x1, y1, x2, y2 = clip_box(face.box, width, height)  # the face's visible part
        rows.append(
            face_row(
                detector.name,
                face_index=index,
                x1=x1,
                y1=y1,
                x2=x2,
                y2=y2,
                crop_box=[round(left * scale_x), round(top * scale_y), round(right * scale_x), round(bottom * scale_y)],
                score=face.score,
                num_faces=len(faces),
                width=width,
                height=height,
                crop=crop,
            )
        )
    return rows


def face_row(detector_name: str, **values: Any) -> dict[str, Any]:
    """A row of `FACE_SCHEMA` but its path (unset columns None), with the face's `crop` pixels attached."""
    return {**_UNSET_FACE_COLUMNS, "num_faces": 0, "detector": detector_name, "crop": None, **values}

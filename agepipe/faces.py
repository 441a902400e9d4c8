"""Face detectors behind one interface, and the one crop function.

Detectors are chosen by name from DETECTORS (`create_detector("yunet", weights)`),
as timm chooses models. Every detector takes a batch of RGB uint8 images and
returns, per image, faces as boxes in source pixels with a score.

`crop_images` is the only place where faces become crops: the crop job, the
scoring job and the server all call it, with settings recorded in checkpoints.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import cv2
import numpy as np

from agepipe import storage
from agepipe.config import CropSettings, detector_min_score
from agepipe.images import ImageError, decode


@dataclass(frozen=True)
class Face:
    """A detected face: box (x1, y1, x2, y2) in source pixels, detector confidence, and five landmarks
    (image-left eye, image-right eye, nose tip, image-left and image-right mouth corner) where the
    detector gives them."""

    box: tuple[float, float, float, float]  # as detected: part of it may lie past the image border
    score: float
    landmarks: tuple[tuple[float, float], ...] | None = None

    @property
    def area(self) -> float:
        x1, y1, x2, y2 = self.box
        return max(x2 - x1, 0.0) * max(y2 - y1, 0.0)


class Detector(Protocol):
    name: str
    uses_gpu: bool  # runs on a GPU where its process can see one
    whole_image: bool  # every image is already a face crop: it is used as it is

    def detect(self, images: Sequence[np.ndarray]) -> list[list[Face]]:
        """Faces per image, for RGB uint8 arrays."""
        ...


DETECTORS: dict[str, Callable[..., Detector]] = {}

# Where users without a local copy get a detector's weights.
DETECTOR_WEIGHT_URLS = {
    "yunet": "https://github.com/opencv/opencv_zoo/raw/main/models/face_detection_yunet/"
    "face_detection_yunet_2023mar.onnx",
}


def register_detector(name: str) -> Callable[[Callable[..., Detector]], Callable[..., Detector]]:
    def add(factory: Callable[..., Detector]) -> Callable[..., Detector]:
        DETECTORS[name] = factory
        return factory

    return add


def create_detector(
    name: str, weights: str | None = None, min_score: float | None = None, device: str | None = None
) -> Detector:
    """A detector by registry name; `weights` is a path or URI where the detector needs one, and
    `min_score` None means the detector's measured default (`config.DETECTOR_MIN_SCORES`)."""
    if name not in DETECTORS:
        raise ValueError(f"unknown detector {name!r}: choose one of {sorted(DETECTORS)}")
    return DETECTORS[name](weights=weights, min_score=detector_min_score(name, min_score), device=device)


def _scale_to(image: np.ndarray, max_side: int) -> tuple[np.ndarray, float]:
    """Downscale so the longer side is at most `max_side`; returns the image and the factor."""
    height, width = image.shape[:2]
    factor = min(1.0, max_side / max(height, width))
    if factor < 1.0:
        size = (max(1, round(width * factor)), max(1, round(height * factor)))
        image = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
    return image, factor


def _visible(faces: list[Face], width: int, height: int) -> list[Face]:
    """Faces with some of their box inside the image."""
    visible = []
    for face in faces:
        x1, y1, x2, y2 = _clip_box(face.box, width, height)
        if x2 > x1 and y2 > y1:
            visible.append(face)
    return visible


def _clip_box(box: Sequence[float], width: int, height: int) -> tuple[float, float, float, float]:
    x1, y1, x2, y2 = (float(v) for v in box)
    return (
        min(max(x1, 0.0), width),
        min(max(y1, 0.0), height),
        min(max(x2, 0.0), width),
        min(max(y2, 0.0), height),
    )


@register_detector("none")
class WholeImage:
    """Every image is already an aligned face crop."""

    name = "none"
    uses_gpu = False
    whole_image = True

    def __init__(self, *, weights: str | None, min_score: float, device: Any):
        del weights, min_score, device

    def detect(self, images: Sequence[np.ndarray]) -> list[list[Face]]:
        return [[Face((0.0, 0.0, float(im.shape[1]), float(im.shape[0])), 1.0)] for im in images]


@register_detector("yunet")
class YuNet:
    """OpenCV FaceDetectorYN with YuNet weights (a path or URI to the .onnx file).

    Images are downscaled to at most `max_side` for detection and padded by a
    border so faces that fill the frame (aligned crops) are still found.
    """

    name = "yunet"
    uses_gpu = False
    whole_image = False
    max_side = 640
    pad_fraction = 0.25

    def __init__(self, *, weights: str | None, min_score: float, device: Any):
        del device
        if not weights:
            raise ValueError(
                "yunet needs --detector-weights: a path or URI to face_detection_yunet*.onnx (OpenCV model zoo)"
            )
        self._model = cv2.FaceDetectorYN.create(storage.local_copy(weights), "", (320, 320), min_score, 0.3, 5000)

    def detect(self, images: Sequence[np.ndarray]) -> list[list[Face]]:
        return [self._detect_one(image) for image in images]

    def _detect_one(self, image: np.ndarray) -> list[Face]:
        height, width = image.shape[:2]
        small, factor = _scale_to(image, self.max_side)
        pad = int(round(max(small.shape[:2]) * self.pad_fraction))
        bgr = cv2.copyMakeBorder(np.ascontiguousarray(small[:, :, ::-1]), pad, pad, pad, pad, cv2.BORDER_CONSTANT)
        self._model.setInputSize((bgr.shape[1], bgr.shape[0]))
        _, found = self._model.detect(bgr)
        faces = []
        for row in [] if found is None else found:
            x, y, w, h = (float(v) for v in row[:4])
            box = [(x - pad) / factor, (y - pad) / factor, (x + w - pad) / factor, (y + h - pad) / factor]
            # YuNet's points: right eye, left eye, nose, right and left mouth corner of the person,
            # which in the image run left to right as Face.landmarks does.
            points = tuple(((row[i] - pad) / factor, (row[i + 1] - pad) / factor) for i in range(4, 14, 2))
            faces.append(Face(tuple(box), float(row[-1]), tuple(map(_floats, points))))
        return _visible(faces, width, height)


@register_detector("dlib")
class DlibHog:
    """dlib's HOG frontal-face detector: needs no weight file, so a fresh machine works."""

    name = "dlib"
    uses_gpu = False
    whole_image = False
    max_side = 800
    # HOG scores are SVM margins around 0, not probabilities: shifted so that a face's score, like every
    # detector's, is kept when it is at least `min_score`.
    score_offset = 0.6

    def __init__(self, *, weights: str | None, min_score: float, device: Any):
        import dlib

        del weights, device
        self._model = dlib.get_frontal_face_detector()
        self._threshold = min_score - self.score_offset

    def detect(self, images: Sequence[np.ndarray]) -> list[list[Face]]:
        return [self._detect_one(image) for image in images]

    def _detect_one(self, image: np.ndarray) -> list[Face]:
        height, width = image.shape[:2]
        small, factor = _scale_to(image, self.max_side)
        upsample = 1 if max(small.shape[:2]) < 400 else 0
        rects, scores, _ = self._model.run(np.ascontiguousarray(small), upsample, self._threshold)
        faces = []
        for rect, score in zip(rects, scores, strict=True):
            box = [rect.left() / factor, rect.top() / factor, rect.right() / factor, rect.bottom() / factor]
            faces.append(Face(tuple(box), float(score) + self.score_offset))
        return _visible(faces, width, height)


@register_detector("yolo")
class Yolo:
    """Ultralytics YOLO face model: weights path or URI (`face_yolov8n.pt`) or a model YAML.

    Runs batched, on the GPU when one is visible.
    """

    name = "yolo"
    uses_gpu = True
    whole_image = False
    image_size = 640

    def __init__(self, *, weights: str | None, min_score: float, device: Any):
        from ultralytics import YOLO

        if not weights:
            raise ValueError("yolo needs --detector-weights: a YOLO face model path or URI (.pt)")
        source = weights if weights.endswith((".yaml", ".yml")) else storage.local_copy(weights)
        self._model = YOLO(source)
        self._min_score = min_score
        if device is None:
            import torch

            device = "cuda:0" if torch.cuda.is_available() else "cpu"
        self._device = device

    def detect(self, images: Sequence[np.ndarray]) -> list[list[Face]]:
        if not images:
            return []
        bgr = [np.ascontiguousarray(image[:, :, ::-1]) for image in images]
        results = self._model.predict(
            bgr, imgsz=self.image_size, conf=self._min_score, device=self._device, verbose=False
        )
        out = []
        for image, result in zip(images, results, strict=True):
            height, width = image.shape[:2]
            boxes = result.boxes.xyxy.cpu().numpy() if result.boxes is not None else []
            scores = result.boxes.conf.cpu().numpy() if result.boxes is not None else []
            points = _five_points(result, len(boxes))
            faces = [Face(tuple(map(float, b)), float(s), p) for b, s, p in zip(boxes, scores, points, strict=True)]
            out.append(_visible(faces, width, height))
        return out


def _floats(point: Sequence[float]) -> tuple[float, float]:
    return float(point[0]), float(point[1])


def _five_points(result: Any, count: int) -> list[tuple[tuple[float, float], ...] | None]:
    """Each box's five landmarks from a YOLO pose-style face model; None per box for models without them."""
    keypoints = getattr(result, "keypoints", None)
    if keypoints is None or keypoints.xy is None or keypoints.xy.shape[-2] != 5:
        return [None] * count
    return [tuple(map(_floats, face)) for face in keypoints.xy.cpu().numpy()]


# ---------------------------------------------------------------- crop geometry
#
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
    x1, y1, x2, y2 = _clip_box(face.box, width, height)
    side = max(int(round(min(max(x2 - x1, y2 - y1) * (1.0 + 2.0 * margin), width, height))), 1)
    left = int(round(min(max((x1 + x2 - side) / 2.0, 0), width - side)))
    top = int(round(min(max((y1 + y2 - side) / 2.0, 0), height - side)))
    return _square_transform(left, top, side, size)


CROP_GEOMETRIES: dict[str, Callable[[Face, float, int, tuple[int, ...]], np.ndarray]] = {
    "box": box_transform,
    "landmarks": landmark_transform,
    "clamped": clamped_transform,
}


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


def crop_face(image: np.ndarray, face: Face, settings: CropSettings) -> tuple[np.ndarray, tuple]:
    """The crop of one face by `settings.geometry`, resized to `settings.size`, and its box in source pixels."""
    if settings.geometry not in CROP_GEOMETRIES:
        raise ValueError(f"unknown crop geometry {settings.geometry!r}: choose one of {sorted(CROP_GEOMETRIES)}")
    transform = CROP_GEOMETRIES[settings.geometry](face, settings.margin, settings.size, image.shape)
    return warp_crop(image, transform, settings.size)


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


def crop_images(
    payloads: Sequence[bytes | np.ndarray], detector: Detector, settings: CropSettings
) -> list[list[dict[str, Any]]]:
    """Decode, detect and crop a batch of images; one list of rows per input.

    Each row has face_index, x1..y2 (face box in source pixels), crop_box,
    score, num_faces, detector, width, height, `crop` (RGB uint8 array or None)
    and `error` (None, `no_face`, or the decoding failure's reason).
    """
    decoded: list[np.ndarray | None] = []
    errors: list[str | None] = []
    for payload in payloads:
        try:
            image = payload if isinstance(payload, np.ndarray) else decode(payload, settings.max_pixels)
            decoded.append(image)
            errors.append(None)
        except ImageError as exc:
            decoded.append(None)
            errors.append(exc.reason)
    valid = [image for image in decoded if image is not None]
    found = iter(detector.detect(valid))
    results = []
    for image, error in zip(decoded, errors, strict=True):
        if image is None:
            results.append([_empty_row(detector.name, error)])
            continue
        faces = next(found)
        chosen = select_faces(faces, settings)
        if not chosen:
            row = _empty_row(detector.name, "no_face")
            row.update(width=image.shape[1], height=image.shape[0])
            results.append([row])
            continue
        rows = []
        for index, face in enumerate(chosen):
            if detector.whole_image:
                crop, crop_box = whole_image_crop(image, settings)
            else:
                crop, crop_box = crop_face(image, face, settings)
            x1, y1, x2, y2 = _clip_box(face.box, image.shape[1], image.shape[0])  # the face's visible part
            rows.append(
                {
                    "face_index": index,
                    "x1": x1,
                    "y1": y1,
                    "x2": x2,
                    "y2": y2,
                    "crop_box": list(crop_box),
                    "score": face.score,
                    "num_faces": len(faces),
                    "detector": detector.name,
                    "width": image.shape[1],
                    "height": image.shape[0],
                    "crop": crop,
                    "error": None,
                }
            )
        results.append(rows)
    return results


def _empty_row(detector_name: str, error: str | None) -> dict[str, Any]:
    return {
        "face_index": None,
        "x1": None,
        "y1": None,
        "x2": None,
        "y2": None,
        "crop_box": None,
        "score": None,
        "num_faces": 0,
        "detector": detector_name,
        "width": None,
        "height": None,
        "crop": None,
        "error": error,
    }

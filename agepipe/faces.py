"""Face detectors behind one interface, and the one crop function.

Detectors are chosen by name from DETECTORS (`create_detector("yunet", weights)`),
as timm chooses models. Every detector takes a batch of RGB uint8 images and
returns, per image, faces as boxes in source pixels with a score.

`crop_images` is the only place where faces become crops: the crop job, the
scoring job and the server all call it, with settings recorded in checkpoints.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import cv2
import numpy as np

from agepipe import storage
from agepipe.config import CropSettings
from agepipe.images import ImageError, decode


@dataclass(frozen=True)
class Face:
    """A detected face: box (x1, y1, x2, y2) in source pixels and detector confidence."""

    box: tuple[float, float, float, float]
    score: float

    @property
    def area(self) -> float:
        x1, y1, x2, y2 = self.box
        return max(x2 - x1, 0.0) * max(y2 - y1, 0.0)


class Detector(Protocol):
    name: str
    uses_gpu: bool  # runs on a GPU where its process can see one

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
    name: str, weights: str | None = None, min_score: float = 0.6, device: str | None = None
) -> Detector:
    """A detector by registry name; `weights` is a path or URI where the detector needs one."""
    if name not in DETECTORS:
        raise ValueError(f"unknown detector {name!r}: choose one of {sorted(DETECTORS)}")
    return DETECTORS[name](weights=weights, min_score=min_score, device=device)


def _scale_to(image: np.ndarray, max_side: int) -> tuple[np.ndarray, float]:
    """Downscale so the longer side is at most `max_side`; returns the image and the factor."""
    height, width = image.shape[:2]
    factor = min(1.0, max_side / max(height, width))
    if factor < 1.0:
        size = (max(1, round(width * factor)), max(1, round(height * factor)))
        image = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
    return image, factor


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

    def __init__(self, weights: str | None = None, min_score: float = 0.0, device: Any = None):
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
    max_side = 640
    pad_fraction = 0.25

    def __init__(self, weights: str | None = None, min_score: float = 0.6, device: Any = None):
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
            faces.append(Face(_clip_box(box, width, height), float(row[-1])))
        return [f for f in faces if f.area > 0]


@register_detector("dlib")
class DlibHog:
    """dlib's HOG frontal-face detector: needs no weight file, so a fresh machine works."""

    name = "dlib"
    uses_gpu = False
    max_side = 800

    def __init__(self, weights: str | None = None, min_score: float = 0.0, device: Any = None):
        import dlib

        del weights, device
        self._model = dlib.get_frontal_face_detector()
        # HOG scores are SVM margins, not probabilities: map the 0-1 threshold onto them.
        self._threshold = min_score - 0.6

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
            faces.append(Face(_clip_box(box, width, height), float(score)))
        return [f for f in faces if f.area > 0]


@register_detector("yolo")
class Yolo:
    """Ultralytics YOLO face model: weights path or URI (`face_yolov8n.pt`) or a model YAML.

    Runs batched, on the GPU when one is visible.
    """

    name = "yolo"
    uses_gpu = True
    image_size = 640

    def __init__(self, weights: str | None = None, min_score: float = 0.5, device: Any = None):
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
            faces = [Face(_clip_box(b, width, height), float(s)) for b, s in zip(boxes, scores, strict=True)]
            out.append([f for f in faces if f.area > 0])
        return out


def square_crop_box(box: Sequence[float], margin: float, width: int, height: int) -> tuple[int, int, int, int]:
    """A square around `box` grown by `margin` of its size on each side, moved and shrunk to fit."""
    x1, y1, x2, y2 = box
    side = max(x2 - x1, y2 - y1) * (1.0 + 2.0 * margin)
    side = int(round(min(side, width, height)))
    side = max(side, 1)
    center_x, center_y = (x1 + x2) / 2.0, (y1 + y2) / 2.0
    left = int(round(min(max(center_x - side / 2.0, 0), width - side)))
    top = int(round(min(max(center_y - side / 2.0, 0), height - side)))
    return left, top, left + side, top + side


def crop_face(image: np.ndarray, face: Face, settings: CropSettings) -> tuple[np.ndarray, tuple]:
    """The square, margin-padded crop of one face resized to `settings.size`, and its box."""
    height, width = image.shape[:2]
    left, top, right, bottom = square_crop_box(face.box, settings.margin, width, height)
    patch = image[top:bottom, left:right]
    interpolation = cv2.INTER_AREA if patch.shape[0] > settings.size else cv2.INTER_LINEAR
    crop = cv2.resize(patch, (settings.size, settings.size), interpolation=interpolation)
    return np.ascontiguousarray(crop, dtype=np.uint8), (left, top, right, bottom)


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
            crop, crop_box = crop_face(image, face, settings)
            x1, y1, x2, y2 = face.box
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

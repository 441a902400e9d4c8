"""Face detectors behind one interface, chosen by name.

Detectors are chosen by name from DETECTORS (`create_detector("yunet", weights)`),
as timm chooses models. Every detector takes a batch of RGB uint8 images and
returns, per image, faces as unclipped boxes in source pixels with a score and,
where the detector gives them, five landmarks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import cv2
import numpy as np

from agepipe import storage
from agepipe.config import detector_min_score
from agepipe.registry import Registry


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


def scale_face(face: Face, scale_x: float, scale_y: float) -> Face:
    """The face in pixels `scale_x` (`scale_y`) times as large."""
    x1, y1, x2, y2 = face.box
    landmarks = None
    if face.landmarks is not None:
        landmarks = tuple((x * scale_x, y * scale_y) for x, y in face.landmarks)
    return Face((x1 * scale_x, y1 * scale_y, x2 * scale_x, y2 * scale_y), face.score, landmarks)


class Detector(Protocol):
    name: str
    uses_gpu: bool  # runs on a GPU where its process can see one
    whole_image: bool  # every image is already a face crop: it is used as it is
    input_side: int | None  # the longest image side it looks at; larger images are decoded smaller for it
    batch_size: int  # images it takes at once (decoded together, so keep it small for per-image detectors)

    def detect(self, images: Sequence[np.ndarray]) -> list[list[Face]]:
        """Faces per image, for RGB uint8 arrays."""
        ...


DETECTORS: Registry[Callable[..., Detector]] = Registry("detector")

# Where users without a local copy get a detector's weights.
DETECTOR_WEIGHT_URLS = {
    "yunet": "https://github.com/opencv/opencv_zoo/raw/main/models/face_detection_yunet/"
    "face_detection_yunet_2023mar.onnx",
}


def create_detector(
    name: str, weights: str | None = None, min_score: float | None = None, device: str | None = None
) -> Detector:
    """A detector by registry name; `weights` is a path or URI where the detector needs one, and
    `min_score` None means the detector's measured default (`config.DETECTOR_MIN_SCORES`)."""
    return DETECTORS.create(name, weights=weights, min_score=detector_min_score(name, min_score), device=device)


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
        x1, y1, x2, y2 = clip_box(face.box, width, height)
        if x2 > x1 and y2 > y1:
            visible.append(face)
    return visible


def clip_box(box: Sequence[float], width: int, height: int) -> tuple[float, float, float, float]:
    x1, y1, x2, y2 = (float(v) for v in box)
    return (
        min(max(x1, 0.0), width),
        min(max(y1, 0.0), height),
        min(max(x2, 0.0), width),
        min(max(y2, 0.0), height),
    )


@DETECTORS.register("none")
class WholeImage:
    """Every image is already an aligned face crop."""

    name = "none"
    uses_gpu = False
    whole_image = True
    input_side = None
    batch_size = 1

    def __init__(self, *, weights: str | None, min_score: float, device: Any):
        del weights, min_score, device

    def detect(self, images: Sequence[np.ndarray]) -> list[list[Face]]:
        return [[Face((0.0, 0.0, float(im.shape[1]), float(im.shape[0])), 1.0)] for im in images]


class PerImageDetector:
    """A CPU detector that takes one image at a time (OpenCV and dlib run no batches)."""

    uses_gpu = False
    whole_image = False
    batch_size = 1

    def detect(self, images: Sequence[np.ndarray]) -> list[list[Face]]:
        return [self._detect_one(image) for image in images]

    def _detect_one(self, image: np.ndarray) -> list[Face]:
        raise NotImplementedError


@DETECTORS.register("yunet")
class YuNet(PerImageDetector):
    """OpenCV FaceDetectorYN with YuNet weights (a path or URI to the .onnx file).

    Two passes, their faces merged: the image shrunk to `coarse_side` and padded by a border, so that a
    face filling the frame (an aligned crop) or cut by it is still found, and, for larger images, the
    image at up to `input_side` unpadded, so that a small face in a large photo spans enough of
    YuNet's input to be found.
    """

    name = "yunet"
    input_side = 1344
    coarse_side = 320
    pad_fraction = 0.25
    overlap = 0.3  # boxes of two passes overlapping more than this (IoU) are one face

    def __init__(self, *, weights: str | None, min_score: float, device: Any):
        del device
        if not weights:
            raise ValueError(
                "yunet needs --detector-weights: a path or URI to face_detection_yunet*.onnx (OpenCV model zoo)"
            )
        self._model = cv2.FaceDetectorYN.create(
            storage.local_copy(weights), "", (320, 320), min_score, self.overlap, 5000
        )

    def _detect_one(self, image: np.ndarray) -> list[Face]:
        height, width = image.shape[:2]
        # Both passes shrink the fine pass's image, not the original: shrinking a large frame twice costs more.
        fine, factor = _scale_to(image, self.input_side)
        faces = self._pass(fine, self.coarse_side, self.pad_fraction)
        if max(fine.shape[:2]) > self.coarse_side:
            faces = merge_faces(self._pass(fine, self.input_side, 0.0), faces, self.overlap)
        return _visible([scale_face(face, 1 / factor, 1 / factor) for face in faces], width, height)

    def _pass(self, image: np.ndarray, max_side: int, pad_fraction: float) -> list[Face]:
        small, factor = _scale_to(image, max_side)
        pad = int(round(max(small.shape[:2]) * pad_fraction))
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
        return faces


def merge_faces(fine: list[Face], coarse: list[Face], overlap: float) -> list[Face]:
    """The faces of a finer pass, and those of a coarser pass that none of them overlaps by more than
    `overlap` (IoU): a face found twice keeps the finer pass's box and landmarks, drawn on more pixels."""
    return fine + [face for face in coarse if all(box_iou(face.box, other.box) <= overlap for other in fine)]


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two (x1, y1, x2, y2) boxes."""
    width = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    height = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = width * height
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


@DETECTORS.register("dlib")
class DlibHog(PerImageDetector):
    """dlib's HOG frontal-face detector: needs no weight file, so a fresh machine works."""

    name = "dlib"
    max_side = 800
    input_side = max_side
    # HOG scores are SVM margins around 0, not probabilities: shifted so that a face's score, like every
    # detector's, is kept when it is at least `min_score`.
    score_offset = 0.6

    def __init__(self, *, weights: str | None, min_score: float, device: Any):
        import dlib

        del weights, device
        self._model = dlib.get_frontal_face_detector()
        self._threshold = min_score - self.score_offset

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


@DETECTORS.register("yolo")
class Yolo:
    """Ultralytics YOLO face model: weights path or URI (`face_yolov8n.pt`) or a model YAML.

    Runs batched, on the GPU when one is visible.
    """

    name = "yolo"
    uses_gpu = True
    whole_image = False
    image_size = 640
    input_side = image_size
    batch_size = 32  # a GPU's batch; frames this small hold 32 x 1.2 MB at most

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

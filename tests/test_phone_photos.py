"""Phone photos: 12-megapixel frames are decoded one at a time and only as finely as each step needs,
EXIF-rotated shots give boxes in the upright photo, and small faces in large photos are found."""

from __future__ import annotations

import io
import tracemalloc

import cv2
import numpy as np
import pytest
from PIL import Image

from agepipe.config import CropSettings
from agepipe.detectors import create_detector
from agepipe.faces import crop_images
from agepipe.images import SourceImage, decode

PHONE_SIZE = (4032, 3024)  # width, height
FRAME_BYTES = PHONE_SIZE[0] * PHONE_SIZE[1] * 3


def phone_photo(
    faces: list[np.ndarray], spots: list[tuple[int, int, int]], size: tuple[int, int] = PHONE_SIZE, seed: int = 0
) -> np.ndarray:
    """A photo of `size` (width, height): sensor grain on grey, each face resized to `side` with its top-left
    corner at (x, y) for each (x, y, side) in `spots`."""
    rng = np.random.default_rng(seed)
    photo = (rng.standard_normal((size[1], size[0], 1), dtype=np.float32) * 6 + 120).clip(0, 255).astype(np.uint8)
    photo = np.ascontiguousarray(np.repeat(photo, 3, axis=2))
    for face, (x, y, side) in zip(faces, spots, strict=True):
        photo[y : y + side, x : x + side] = cv2.resize(face, (side, side), interpolation=cv2.INTER_AREA)
    return photo


def jpeg(photo: np.ndarray, orientation: int = 1) -> bytes:
    """JPEG bytes; with orientation 6 the pixels are stored turned a quarter anticlockwise, tagged to show upright."""
    buffer = io.BytesIO()
    if orientation == 6:
        exif = Image.Exif()
        exif[0x0112] = 6
        Image.fromarray(np.ascontiguousarray(np.rot90(photo, 1))).save(buffer, "JPEG", quality=90, exif=exif.tobytes())
    else:
        Image.fromarray(photo).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def faces(utkface_dir) -> list[np.ndarray]:
    """Adult faces of both genders from UTKFace, as RGB arrays."""
    names = sorted(p for p in utkface_dir.iterdir() if 20 <= int(p.name.split("_")[0]) <= 50)[::900][:6]
    return [decode(p.read_bytes()) for p in names]


@pytest.fixture(scope="module")
def yunet(yunet_weights):
    return create_detector("yunet", yunet_weights)


class RecordingDetector:
    """A detector, recording its calls and the size of every image it is given."""

    def __init__(self, detector) -> None:
        self.detector = detector
        self.name, self.uses_gpu, self.whole_image = detector.name, detector.uses_gpu, detector.whole_image
        self.input_side, self.batch_size = detector.input_side, detector.batch_size
        self.seen: list[tuple[int, ...]] = []
        self.calls = 0

    def detect(self, images):
        self.seen += [image.shape for image in images]
        self.calls += 1
        return self.detector.detect(images)


def test_a_batch_of_large_photos_is_never_decoded_all_at_once(faces, yunet) -> None:
    """Six 12 MP photos, each with a face small enough to need every pixel: the traced peak stays under two
    full frames (the old code held all six), and the detector never sees a full-size frame."""
    payloads = [jpeg(phone_photo([face], [(1500, 1200, 150)], seed=i)) for i, face in enumerate(faces)]
    detector = RecordingDetector(yunet)
    tracemalloc.start()
    try:
        rows = crop_images(payloads, detector, CropSettings(all_faces=True))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert [len(r) for r in rows] == [1] * 6 and all(r[0]["error"] is None for r in rows)
    assert FRAME_BYTES <= peak < 2 * FRAME_BYTES, peak / FRAME_BYTES  # one frame at a time, and it is traced
    assert len(detector.seen) == 6 and max(max(shape[:2]) for shape in detector.seen) < PHONE_SIZE[0]


def test_large_faces_come_from_a_reduced_decode_with_the_same_crops(faces, yunet) -> None:
    """Faces of 700-1000 px: their crops are cut from a decode at a fraction of the photo's size, and match
    the crops cut from every pixel within a small tolerance; so do the boxes."""
    photo = phone_photo(faces[:3], [(200, 400, 700), (1300, 900, 850), (2600, 1500, 1000)])
    data = jpeg(photo)
    source = SourceImage(data)
    settings = CropSettings(all_faces=True)
    reduced = crop_images([source], yunet, settings)[0]
    assert source.reduction_for(source.long_side // 2) == 2  # DCT scaling applies to this photo
    full = crop_images([decode(data)], yunet, settings)[0]
    assert len(reduced) == len(full) == 3
    for a, b in zip(reduced, full, strict=True):
        box_a, box_b = (np.array([row[k] for k in ("x1", "y1", "x2", "y2")]) for row in (a, b))
        assert np.abs(box_a - box_b).max() < 0.03 * (b["x2"] - b["x1"]), (box_a, box_b)
        difference = np.abs(a["crop"].astype(int) - b["crop"].astype(int)).mean()
        assert difference < 6, difference
        assert a["width"] == b["width"] == PHONE_SIZE[0] and a["height"] == b["height"] == PHONE_SIZE[1]


def test_exif_rotated_portraits_give_boxes_in_the_upright_photo(faces, yunet) -> None:
    """A portrait shot stored sideways with EXIF orientation 6: width and height are the upright photo's, and
    each box lies where the face is when the photo is shown upright, as for the same photo stored upright."""
    spots = [(400, 600, 400), (1800, 2500, 700)]
    photo = phone_photo(faces[:2], spots, size=(3024, 4032))
    sideways = crop_images([jpeg(photo, orientation=6)], yunet, CropSettings(all_faces=True))[0]
    upright = crop_images([jpeg(photo)], yunet, CropSettings(all_faces=True))[0]
    assert len(sideways) == len(upright) == 2
    for rows in (sideways, upright):
        assert all(r["width"] == 3024 and r["height"] == 4032 for r in rows)
        centres = sorted(((r["x1"] + r["x2"]) / 2, (r["y1"] + r["y2"]) / 2) for r in rows)
        for (cx, cy), (x, y, side) in zip(centres, sorted(spots), strict=True):
            assert abs(cx - (x + side / 2)) < side / 6 and abs(cy - (y + side / 2)) < side / 4, (cx, cy, x, y)


def test_small_faces_in_a_large_photo_are_found(faces, yunet) -> None:
    """Six faces of 120-200 px in a 12 MP photo (3-5% of its width): each is found, with no other face."""
    spots = [
        (300, 300, 120),
        (1000, 700, 140),
        (1800, 400, 160),
        (2600, 1600, 180),
        (3300, 2400, 200),
        (700, 2200, 130),
    ]
    photo = phone_photo(faces, spots)
    rows = crop_images([jpeg(photo)], yunet, CropSettings(all_faces=True))[0]
    centres = [((r["x1"] + r["x2"]) / 2, (r["y1"] + r["y2"]) / 2) for r in rows if r["face_index"] is not None]
    for x, y, side in spots:
        assert any(abs(cx - x - side / 2) < side / 3 and abs(cy - y - side / 2) < side / 3 for cx, cy in centres), (
            x,
            y,
            side,
        )
    assert len(centres) == len(spots)


def test_the_gpu_paths_batched_detector_gets_small_frames_together(faces) -> None:
    """YOLO (the GPU path's detector; here an untrained one on the CPU) takes a batch's photos in one call,
    each decoded at its input size or a little over, never at full size; every photo gets its rows."""
    payloads = [jpeg(phone_photo([face], [(1500, 1200, 300)], seed=i)) for i, face in enumerate(faces[:3])]
    detector = RecordingDetector(create_detector("yolo", "yolov8n.yaml", min_score=0.0))
    rows = crop_images(payloads, detector, CropSettings())
    assert detector.calls == 1 and len(detector.seen) == 3
    assert all(detector.input_side <= max(shape[:2]) < PHONE_SIZE[0] for shape in detector.seen), detector.seen
    assert [len(r) for r in rows] == [1, 1, 1]
    assert all(r[0]["width"] == PHONE_SIZE[0] and r[0]["crop"].shape == (224, 224, 3) for r in rows)

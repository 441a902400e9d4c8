"""Detectors behind one interface, and the one crop function."""

from __future__ import annotations

import numpy as np
import pytest

from agepipe.config import CropSettings
from agepipe.detectors import DETECTORS, Face, create_detector
from agepipe.faces import crop_images, square_crop_box
from agepipe.images import decode
from agepipe.scenes import compose_scene


def test_registry_names() -> None:
    assert {"none", "yunet", "dlib", "yolo"} <= set(DETECTORS)
    with pytest.raises(ValueError, match="unknown detector"):
        create_detector("haar")


def test_detectors_that_need_weights_say_so() -> None:
    for name in ("yunet", "yolo"):
        with pytest.raises(ValueError, match="detector-weights"):
            create_detector(name)


@pytest.mark.parametrize("box", [(10, 10, 50, 70), (0, 0, 30, 30), (80, 5, 99, 95), (-20, 40, 60, 160)])
def test_square_crop_box_is_centred_on_the_face_and_grown_by_the_margin(box) -> None:
    left, top, side = square_crop_box(box, 0.15)
    assert side == pytest.approx(max(box[2] - box[0], box[3] - box[1]) * 1.3)
    assert left + side / 2 == pytest.approx((box[0] + box[2]) / 2)
    assert top + side / 2 == pytest.approx((box[1] + box[3]) / 2)


def test_crop_is_uint8_of_the_configured_size_and_not_dark() -> None:
    image = np.full((300, 400, 3), 180, np.uint8)
    detector = create_detector("none")
    rows = crop_images([image], detector, CropSettings(detector="none", size=96))[0]
    assert len(rows) == 1
    crop = rows[0]["crop"]
    assert crop.dtype == np.uint8 and crop.shape == (96, 96, 3)
    assert crop.mean() > 150


def test_largest_face_first_and_all_faces_option() -> None:
    class TwoFaces:
        name = "two"
        whole_image = False
        input_side = None
        batch_size = 4

        def detect(self, images):
            return [[Face((0, 0, 10, 10), 0.9), Face((20, 20, 60, 60), 0.8)] for _ in images]

    image = np.zeros((100, 100, 3), np.uint8)
    largest = crop_images([image], TwoFaces(), CropSettings())[0]
    assert len(largest) == 1 and largest[0]["x1"] == 20 and largest[0]["num_faces"] == 2
    every = crop_images([image], TwoFaces(), CropSettings(all_faces=True))[0]
    assert [r["face_index"] for r in every] == [0, 1]


def test_undecodable_and_faceless_images_get_error_rows() -> None:
    blank = np.zeros((50, 50, 3), np.uint8)
    rows = crop_images([b"", blank], create_detector("dlib"), CropSettings())
    assert rows[0][0]["error"] == "empty" and rows[0][0]["face_index"] is None
    assert rows[1][0]["error"] == "no_face" and rows[1][0]["width"] == 50


def test_dlib_needs_no_weights_and_finds_the_astronaut() -> None:
    from skimage import data

    faces = create_detector("dlib").detect([data.astronaut(), data.coffee()])
    assert len(faces[0]) == 1 and not faces[1]
    x1, y1, x2, y2 = faces[0][0].box
    assert 150 < (x1 + x2) / 2 < 290 and 40 < (y1 + y2) / 2 < 180  # her face, not the flag


def test_yolo_path_runs_batched_from_a_model_config() -> None:
    detector = create_detector("yolo", "yolov8n.yaml", min_score=0.0)
    images = [np.full((240, 320, 3), 90, np.uint8), np.full((100, 80, 3), 200, np.uint8)]
    faces = detector.detect(images)
    # At min_score 0 the untrained network keeps candidate boxes in every image (ultralytics' cap: 300).
    assert len(faces) == 2 and all(0 < len(found) <= 300 for found in faces), [len(f) for f in faces]
    for image, found in zip(images, faces, strict=True):
        for face in found:
            x1, y1, x2, y2 = face.box
            assert 0 <= x1 < x2 <= image.shape[1] and 0 <= y1 < y2 <= image.shape[0]


def test_yunet_finds_pasted_faces_and_crops_contain_them(utkface_dir, yunet_weights) -> None:
    rng = np.random.default_rng(7)
    files = sorted(utkface_dir.iterdir())
    detector = create_detector("yunet", yunet_weights)
    settings = CropSettings(detector="yunet", all_faces=True, geometry="box")  # the box crop contains the box
    found = total = 0
    for scene_index in range(25):
        faces = [decode(files[i].read_bytes()) for i in rng.choice(len(files), 3, replace=False)]
        canvas = (480, 640) if scene_index % 2 else (900, 1200)
        scene, boxes = compose_scene(faces, canvas, rng)
        rows = crop_images([scene], detector, settings)[0]
        for px1, py1, px2, py2 in boxes:
            total += 1
            matches = [
                r
                for r in rows
                if r["error"] is None
                and px1 <= (r["x1"] + r["x2"]) / 2 <= px2
                and py1 <= (r["y1"] + r["y2"]) / 2 <= py2
            ]
            if matches:
                found += 1
                cx1, cy1, cx2, cy2 = matches[0]["crop_box"]
                r = matches[0]
                assert cx1 <= r["x1"] + 1 and cy1 <= r["y1"] + 1 and cx2 >= r["x2"] - 1 and cy2 >= r["y2"] - 1
    assert found / total >= 0.95, f"YuNet found {found} of {total} pasted faces"

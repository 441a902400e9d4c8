"""The Serve endpoint: request parsing and response shaping as plain functions, then real Serve on
local Ray answering over HTTP (faces with `--detector none`, scenes with YuNet), every bad input,
50 concurrent clients, and the upload page driven in headless Chromium."""

from __future__ import annotations

import asyncio
import io
import json
import os
import re
import signal
import struct
import threading
import time
import zlib
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import requests
from PIL import Image
from ray.exceptions import ActorDiedError

from agepipe.config import DEFAULT_AGE_GROUPS, ServeSettings
from agepipe.images import encode
from agepipe.scenes import compose_scene
from agepipe.serve import (
    REPLICA_ATTEMPTS,
    RETRY_AFTER_S,
    ReplicaLost,
    RequestError,
    batch_wait_s,
    call_with_retries,
    check_content_length,
    largest_face,
    multipart_file,
    predict_response,
    replica_lost_response,
    replica_resources,
    split_by_counts,
    start_server,
    stop_server,
    upload_bytes,
    upload_kind,
    with_absolute_paths,
)

PORT = 8765
TIMEOUT_S = 180


def png_declaring(width: int, height: int) -> bytes:
    """A small, valid PNG whose header declares width x height pixels: a decompression bomb."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    rows = zlib.compress(b"\x00" * (width // 8 + 1) * 16)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")


def multipart_body(field: str, data: bytes, boundary: str = "agepipe-test") -> tuple[bytes, str]:
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="face.jpg"\r\n'
            f"Content-Type: image/jpeg\r\n\r\n"
        ).encode()
        + data
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return body, f"multipart/form-data; boundary={boundary}"


# Pure functions: no cluster.


def test_upload_kind_accepts_images_and_multipart_and_refuses_other_types():
    assert upload_kind("image/jpeg") == "raw"
    assert upload_kind("application/octet-stream") == "raw"
    assert upload_kind(None) == "raw"
    assert upload_kind("multipart/form-data; boundary=x") == "multipart"
    for content_type in ("application/json", "text/plain", "application/x-www-form-urlencoded"):
        with pytest.raises(RequestError) as caught:
            upload_kind(content_type)
        assert caught.value.status == 415


def test_content_length_over_the_limit_is_413_and_garbage_is_400():
    check_content_length(None, 100)
    check_content_length("100", 100)
    with pytest.raises(RequestError) as caught:
        check_content_length("101", 100)
    assert (caught.value.status, caught.value.reason) == (413, "body_too_large")
    with pytest.raises(RequestError) as caught:
        check_content_length("ten", 100)
    assert caught.value.status == 400


def test_multipart_file_returns_the_exact_bytes_of_the_file_field():
    data = bytes(range(256)) * 10 + b"\r\n--not-a-boundary\r\n"
    body, content_type = multipart_body("file", data)
    assert multipart_file(body, content_type) == data
    assert upload_bytes(body, content_type) == data
    assert upload_bytes(data, "image/png") == data


def test_multipart_without_the_file_field_or_malformed_is_400():
    body, content_type = multipart_body("photo", b"abc")
    with pytest.raises(RequestError) as caught:
        multipart_file(body, content_type)
    assert (caught.value.status, caught.value.reason) == (400, "missing_file")
    with pytest.raises(RequestError) as caught:
        multipart_file(b"no boundary here", "multipart/form-data")
    assert caught.value.status == 400


def test_split_by_counts_restores_each_requests_predictions_in_order():
    assert split_by_counts([1, 2, 3, 4, 5], [2, 0, 3]) == [[1, 2], [], [3, 4, 5]]
    with pytest.raises(ValueError):
        split_by_counts([1, 2], [3])


def test_batches_wait_to_fill_only_while_other_requests_are_at_the_model():
    assert batch_wait_s(0, busy_wait_s=0.02) == 0.0
    assert batch_wait_s(3, busy_wait_s=0.02) == 0.02


def test_replica_takes_a_gpu_fraction_only_where_the_cluster_has_gpus():
    settings = ServeSettings(num_cpus=1.0, gpu_fraction=0.25)
    assert replica_resources(settings, cluster_gpus=0) == {"num_cpus": 1.0}
    assert replica_resources(settings, cluster_gpus=4) == {"num_cpus": 1.0, "num_gpus": 0.25}


def test_the_model_deployment_scales_on_ongoing_requests_per_replica():
    from ray.serve.autoscaling_policy import replica_queue_length_autoscaling_policy

    from agepipe.serve import application

    ingress = application(ServeSettings(min_replicas=1, max_replicas=3, target_ongoing_requests=4))._bound_deployment
    model = ingress.init_args[0]._bound_deployment
    scaling = model._deployment_config.autoscaling_config
    assert (scaling.min_replicas, scaling.max_replicas) == (1, 3)
    assert ingress._deployment_config.autoscaling_config is None and ingress._deployment_config.num_replicas == 1

    def desired(requests: int, replicas: int) -> float:
        """Serve's own replica-queue policy on the deployment's config: the replicas it asks for."""
        load = SimpleNamespace(
            current_num_replicas=replicas, target_num_replicas=replicas, total_num_requests=requests, config=scaling
        )
        return replica_queue_length_autoscaling_policy(load)[0]

    # 4 ongoing requests a replica: 12 on one replica ask for three, 4 on two for one.
    assert (desired(12, 1), desired(4, 1), desired(4, 2)) == (3, 1, 1)


def test_predict_response_shapes_faces_and_an_image_without_face():
    no_face = [{"face_index": None, "crop": None, "width": 640, "height": 480, "error": "no_face"}]
    assert predict_response(no_face, [], 0.9) == {"faces": [], "width": 640, "height": 480, "interval_level": 0.9}
    with pytest.raises(RequestError) as caught:
        largest_face(no_face)
    assert caught.value.status == 422
    crop = np.zeros((4, 4, 3), np.uint8)
    rows = [
        {"face_index": i, "x1": x, "y1": 0, "x2": x + side, "y2": side, "score": 0.9, "crop": crop}
        | {"width": 640, "height": 480}
        for i, (x, side) in enumerate([(0, 10), (100, 50)])
    ]
    prediction = {
        "age": 31.234,
        "age_low": 25.449,
        "age_high": 38.0,
        "age_std": 4.567,
        "age_group": "Adult",
        "age_group_probs": {"Adult": 0.8, "Youth": 0.2},
        "gender": "female",
        "gender_prob": 0.9,
    }
    response = predict_response(rows, [prediction, prediction], 0.8)
    assert response["faces"][1]["box"] == [100.0, 0.0, 150.0, 50.0] and response["interval_level"] == 0.8
    face = response["faces"][0]
    assert (face["age"], face["age_low"], face["age_high"], face["age_std"]) == (31.23, 25.45, 38.0, 4.57)
    uncalibrated = predict_response(rows, [prediction | {"age_low": None, "age_high": None}] * 2)
    assert uncalibrated["faces"][0]["age_low"] is None and uncalibrated["interval_level"] is None
    assert largest_face(rows)["face_index"] == 1


def test_serve_config_file_is_a_valid_serve_config_that_builds_the_app():
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from agepipe.config import PROJECT_ROOT
    from agepipe.serve import app_builder

    values = yaml.safe_load((PROJECT_ROOT / "serve_config.yaml").read_text())
    schema = ServeDeploySchema.model_validate(values)
    assert schema.http_options.host == "127.0.0.1"
    [app] = values["applications"]
    assert app["import_path"] == "agepipe.serve:app_builder"
    ingress = app_builder(app["args"])._bound_deployment
    deployment = ingress.init_args[0]._bound_deployment  # the model, called through the HTTP ingress
    assert (ingress.name, deployment.name) == ("AgeIngress", "AgeService")
    assert deployment._deployment_config.autoscaling_config.max_replicas == app["args"]["max_replicas"]
    assert deployment._deployment_config.max_ongoing_requests == app["args"]["max_ongoing_requests"]
    served = with_absolute_paths(ServeSettings(model=app["args"]["model"])).model
    assert served == with_absolute_paths(ServeSettings()).model, "the file serves what `agepipe serve` serves"


def test_the_endpoint_serves_the_default_model_unless_told_otherwise():
    from agepipe.model import BUNDLED_MODELS

    assert with_absolute_paths(ServeSettings()).model == str(BUNDLED_MODELS["fast"])
    assert with_absolute_paths(ServeSettings(model="ensemble")).model == str(BUNDLED_MODELS["ensemble"])


# Real Serve on local Ray, over HTTP.


@pytest.fixture(scope="module")
def face_paths(utkface_dir) -> list[Path]:
    return sorted(utkface_dir.glob("*.jpg"))[:25]


@pytest.fixture(scope="module")
def scene(face_paths) -> tuple[bytes, list[tuple[int, int, int, int]]]:
    """A 640x480 JPEG with two UTKFace faces pasted on a textured background, and their boxes."""
    rng = np.random.default_rng(0)
    faces = [np.asarray(Image.open(path).convert("RGB")) for path in face_paths[:2]]
    pixels, boxes = compose_scene(faces, (480, 640), rng, min_side=100)
    return encode(pixels, "jpeg", 95), boxes


@pytest.fixture(scope="module")
def server(ray_local, model_path, yunet_weights):
    """Two applications on one Serve: aligned faces at / and YuNet scenes at /scenes."""
    common = {"port": PORT, "model": model_path, "max_replicas": 1, "num_cpus": 0.5}
    faces_url = start_server(ServeSettings(**common, crop_overrides={"detector": "none", "all_faces": True}))
    scenes = {"detector": "yunet", "detector_weights": yunet_weights, "all_faces": True}
    scenes_url = start_server(ServeSettings(**common, crop_overrides=scenes), "scenes", "/scenes")
    health = requests.get(faces_url + "healthz", timeout=TIMEOUT_S).json()
    yield SimpleNamespace(url=faces_url, scenes_url=scenes_url + "/", replica=health["replica"])
    stop_server()


def post_image(url: str, data: bytes, content_type: str = "image/jpeg", **kwargs) -> requests.Response:
    return requests.post(url, data=data, headers={"Content-Type": content_type}, timeout=TIMEOUT_S, **kwargs)


def test_healthz_answers_once_the_model_is_loaded(server, model_path):
    response = requests.get(server.url + "healthz", timeout=TIMEOUT_S)
    assert response.status_code == 200
    health = response.json()
    assert health["status"] == "ok"
    assert health["model"] == str(Path(model_path).resolve())
    assert health["detector"] == "none"


def test_predict_raw_body_answers_the_contract(server, face_paths):
    response = post_image(server.url + "predict", face_paths[0].read_bytes())
    assert response.status_code == 200
    body = response.json()
    assert (body["width"], body["height"]) == (200, 200)
    [face] = body["faces"]
    assert face["box"] == [0.0, 0.0, 200.0, 200.0]
    assert 0 <= face["age_low"] <= face["age"] <= face["age_high"] <= 100 and body["interval_level"] == 0.9
    # The face is a 100-year-old man's (its file name), the last of face_paths a 10-year-old boy's.
    assert face_paths[0].name.startswith("100_0_") and face_paths[-1].name.startswith("10_0_")
    assert face["age"] > 85 and face["gender"] == "male", face
    [young] = post_image(server.url + "predict", face_paths[-1].read_bytes()).json()["faces"]
    assert young["age"] == pytest.approx(10, abs=5) and young["gender"] == "male", young
    assert face["age_std"] is None or face["age_std"] >= 0
    assert face["age_group"] in DEFAULT_AGE_GROUPS
    assert face["gender"] in ("male", "female") and 0.5 <= face["gender_prob"] <= 1
    assert sum(face["age_group_probs"].values()) == pytest.approx(1, abs=1e-3)


def test_multipart_upload_gives_the_same_answer_as_the_raw_body(server, face_paths):
    data = face_paths[1].read_bytes()
    raw = post_image(server.url + "predict", data).json()
    form = requests.post(server.url + "predict", files={"file": ("face.jpg", data, "image/jpeg")}, timeout=TIMEOUT_S)
    assert form.status_code == 200
    assert form.json()["faces"][0]["age"] == pytest.approx(raw["faces"][0]["age"], abs=0.05)


def test_yunet_scene_answers_a_box_on_each_pasted_face(server, scene):
    data, pasted = scene
    response = post_image(server.scenes_url + "predict", data)
    assert response.status_code == 200
    faces = response.json()["faces"]
    assert len(faces) == len(pasted)
    for x1, y1, x2, y2 in pasted:
        centers = [((f["box"][0] + f["box"][2]) / 2, (f["box"][1] + f["box"][3]) / 2) for f in faces]
        assert any(x1 <= cx <= x2 and y1 <= cy <= y2 for cx, cy in centers), (pasted, faces)


def test_image_without_a_face_answers_an_empty_list(server):
    blank = encode(np.full((480, 640, 3), 200, np.uint8), "png")
    response = post_image(server.scenes_url + "predict", blank, "image/png")
    assert response.status_code == 200
    assert response.json()["faces"] == []


def test_explain_answers_a_gradcam_png_of_the_largest_face(server, scene, face_paths):
    response = post_image(server.scenes_url + "explain", scene[0])
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/png"
    overlay = np.asarray(Image.open(io.BytesIO(response.content)))
    assert overlay.ndim == 3 and overlay.shape[0] == overlay.shape[1] >= 64
    blank = encode(np.full((480, 640, 3), 200, np.uint8), "png")
    no_face = post_image(server.scenes_url + "explain", blank, "image/png")
    assert no_face.status_code == 422 and no_face.json()["error"] == "no_face"


def bad_inputs(face: bytes) -> dict[str, tuple[dict, int, str]]:
    """name -> (requests.post keyword arguments, expected status, expected error tag)."""
    over_limit = face + b"\0" * (10 * 1024 * 1024)  # decodable: refused for its size alone
    missing_field, missing_type = multipart_body("photo", face)
    return {
        "empty body": ({"data": b""}, 400, "empty"),
        "non-image bytes": ({"data": b"hello, this is not an image" * 10}, 422, "not_image"),
        "truncated image": ({"data": face[: len(face) // 2]}, 422, "truncated"),
        "decompression bomb": ({"data": png_declaring(50_000, 50_000)}, 413, "too_large"),
        "body over the limit": ({"data": over_limit}, 413, "body_too_large"),
        "body over the limit, chunked": ({"data": iter([face, over_limit])}, 413, "body_too_large"),
        "wrong content type": (
            {"data": face, "headers": {"Content-Type": "application/json"}},
            415,
            "unsupported_media_type",
        ),
        "multipart without file": (
            {"data": missing_field, "headers": {"Content-Type": missing_type}},
            400,
            "missing_file",
        ),
    }


BAD_INPUT_NAMES = list(bad_inputs(b"x"))


@pytest.mark.parametrize("endpoint", ["predict", "explain"])
@pytest.mark.parametrize("name", BAD_INPUT_NAMES)
def test_bad_input_is_a_4xx_with_a_json_detail(server, face_paths, name, endpoint):
    kwargs, status, reason = bad_inputs(face_paths[0].read_bytes())[name]
    kwargs.setdefault("headers", {"Content-Type": "image/jpeg"})
    response = requests.post(server.url + endpoint, timeout=TIMEOUT_S, **kwargs)
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error"] == reason
    assert isinstance(body["detail"], str) and body["detail"]


def test_the_replica_survives_every_bad_input(server, face_paths):
    for kwargs, _, _ in bad_inputs(face_paths[0].read_bytes()).values():
        kwargs.setdefault("headers", {"Content-Type": "image/jpeg"})
        assert requests.post(server.url + "predict", timeout=TIMEOUT_S, **kwargs).status_code < 500
    health = requests.get(server.url + "healthz", timeout=TIMEOUT_S).json()
    assert health["replica"] == server.replica
    assert post_image(server.url + "predict", face_paths[0].read_bytes()).status_code == 200


def test_50_concurrent_clients_all_get_their_own_answer(server, face_paths):
    images = [path.read_bytes() for path in face_paths]
    expected = [post_image(server.url + "predict", data).json()["faces"][0]["age"] for data in images]

    def client(index: int) -> list[tuple[int, int, float | None]]:
        answers = []
        with requests.Session() as session:
            for request in range(2):
                image_index = (index + request) % len(images)
                response = session.post(
                    server.url + "predict",
                    data=images[image_index],
                    headers={"Content-Type": "image/jpeg"},
                    timeout=TIMEOUT_S,
                )
                age = response.json()["faces"][0]["age"] if response.status_code == 200 else None
                answers.append((response.status_code, image_index, age))
        return answers

    with ThreadPoolExecutor(50) as pool:
        answers = [answer for answers in pool.map(client, range(50)) for answer in answers]
    assert [status for status, _, _ in answers] == [200] * 100
    # Batched answers go back to the request they belong to: each matches its image's own age.
    for _, image_index, age in answers:
        assert age == pytest.approx(expected[image_index], abs=0.05)


def test_upload_page_is_served(server):
    response = requests.get(server.url, timeout=TIMEOUT_S)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    assert 'id="file"' in response.text


def test_upload_page_in_chromium_shows_the_predicted_age(server, face_paths, browser_page):
    path = face_paths[2]
    expected = post_image(server.url + "predict", path.read_bytes()).json()["faces"][0]
    page = browser_page
    page.goto(server.url)
    page.set_input_files("#file", str(path))
    page.wait_for_selector("#faces li", timeout=TIMEOUT_S * 1000)
    shown = page.inner_text("#faces li")
    assert page.is_visible("#canvas")
    assert '"faces"' in page.inner_text("#json")
    page.click("#explain")
    page.wait_for_function("document.getElementById('explain-image').naturalWidth > 0", timeout=TIMEOUT_S * 1000)
    shown_age = re.match(r"([\d.]+) years, ([\d.]+)-([\d.]+) with 90% confidence", shown)
    assert shown_age, shown
    for text, name in zip(shown_age.groups(), ("age", "age_low", "age_high"), strict=True):
        assert float(text) == pytest.approx(expected[name], abs=0.051)
    assert expected["age_group"] in shown and expected["gender"] in shown
    # The photo carries each face's box and "31 (25-38), female", as the report's gallery draws them.
    [drawn] = json.loads(page.get_attribute("#canvas", "data-labels"))
    age, low, high, gender = re.match(r"^(\d+) \((\d+)-(\d+)\), (male|female)$", drawn).groups()
    for text, name in zip((age, low, high), ("age", "age_low", "age_high"), strict=True):
        assert abs(int(text) - expected[name]) <= 0.51
    assert gender == expected["gender"]
    x1, y1, x2, y2 = expected["box"]
    edge = page.evaluate(
        f"() => [...document.getElementById('canvas').getContext('2d').getImageData({x1}, {(y1 + y2) / 2}, 1, 1).data]"
    )
    assert edge[:3] == [0, 224, 138]  # the box's stroke colour on its left edge
    band = page.evaluate(
        f"() => [...document.getElementById('canvas').getContext('2d').getImageData({x1}, {y1 + 1}, 1, 1).data]"
    )
    assert max(band[:3]) < 100  # the label's dark band, inside the top of a box that fills the photo


def test_a_call_is_made_again_when_its_replica_died_and_a_503_when_every_attempt_did():
    calls = []

    async def dies_twice() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise ActorDiedError()
        return "answer"

    assert asyncio.run(call_with_retries(dies_twice, attempts=3, wait_s=0.001)) == "answer" and len(calls) == 3
    calls.clear()
    with pytest.raises(ReplicaLost):
        asyncio.run(call_with_retries(dies_twice, attempts=2, wait_s=0.001))
    assert len(calls) == 2

    async def bad_input() -> str:
        calls.append(1)
        raise RequestError(422, "corrupt", "corrupt image")

    calls.clear()
    with pytest.raises(RequestError):  # the client's fault: answered at once, not sent again
        asyncio.run(call_with_retries(bad_input, attempts=3, wait_s=0.001))
    assert len(calls) == 1
    response = asyncio.run(replica_lost_response(None, ReplicaLost("3 replicas died")))
    assert response.status_code == 503 and response.headers["retry-after"] == str(RETRY_AFTER_S)
    assert json.loads(response.body)["detail"]


def test_a_killed_model_replica_costs_the_clients_under_load_nothing(server, face_paths):
    """SIGKILL the faces app's only model replica while 8 clients post faces: every request is answered
    (retried on the replica Serve starts in its place), none with a 5xx, and the new replica answers."""
    before = requests.get(server.url + "healthz", timeout=TIMEOUT_S).json()
    images = [path.read_bytes() for path in face_paths]
    answers: list[tuple[float, int, str | None]] = []
    done = threading.Event()

    def client(index: int) -> None:
        with requests.Session() as session:
            while not done.is_set():
                response = session.post(
                    server.url + "predict",
                    data=images[index % len(images)],
                    headers={"Content-Type": "image/jpeg"},
                    timeout=TIMEOUT_S,
                )
                answers.append((time.monotonic(), response.status_code, response.headers.get("retry-after")))

    with ThreadPoolExecutor(8) as pool:
        clients = [pool.submit(client, index) for index in range(8)]
        time.sleep(1)
        killed_at = time.monotonic()
        os.kill(before["pid"], signal.SIGKILL)
        after = requests.get(server.url + "healthz", timeout=TIMEOUT_S).json()
        time.sleep(1)
        done.set()
        [future.result() for future in clients]
    server.replica = after["replica"]  # for the tests after this one
    assert after["replica"] != before["replica"] and after["pid"] != before["pid"]
    statuses = Counter(status for _, status, _ in answers)
    assert not [a for a in answers if a[1] >= 500 and not (a[1] == 503 and a[2])], statuses
    assert statuses[200] >= len(answers) - REPLICA_ATTEMPTS, statuses
    assert sum(1 for at, status, _ in answers if at > killed_at and status == 200) >= 8, statuses

"""The crop job on local Ray: real files, real Parquet, a real S3 API server."""

from __future__ import annotations

import io
import os
import shutil
import socket
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from helpers import BAD_INPUT_ERRORS, bad_input_folder, kill_when_files_appear, run_cli
from PIL import Image

from agepipe.batch import plan_detection_pool
from agepipe.config import CropJobSettings, CropSettings, LabelSettings
from agepipe.crop import run_crop
from agepipe.detectors import DETECTORS

CONTRACT_COLUMNS = {"path", "face_index", "x1", "y1", "x2", "y2", "image", "age", "gender", "error"}


@pytest.fixture(scope="module")
def utk_sample(utkface_dir, tmp_path_factory) -> Path:
    """300 UTKFace images, including a real name without the race field."""
    folder = tmp_path_factory.mktemp("utk")
    names = sorted(os.listdir(utkface_dir))[::71][:299] + ["39_1_20170116174525125.jpg.chip.jpg"]
    for name in names:
        shutil.copy(utkface_dir / name, folder / name)
    return folder


def test_crop_utkface_on_local_ray(ray_local, utk_sample, yunet_weights, tmp_path) -> None:
    output = tmp_path / "faces"
    settings = CropJobSettings(
        input=str(utk_sample),
        output=str(output),
        crop=CropSettings(detector="yunet", detector_weights=yunet_weights, size=128),
        labels=LabelSettings(kind="utkface"),
    )
    summary = run_crop(settings)
    frame = pq.read_table(output).to_pandas()
    assert set(frame.columns) >= CONTRACT_COLUMNS
    assert set(frame["path"]) == {str(p) for p in utk_sample.iterdir()}
    assert summary.images_processed == 300 and summary.faces_written >= 285
    faces = frame[frame["error"].isna()]
    first = np.asarray(Image.open(io.BytesIO(faces["image"].iloc[0])))
    assert first.dtype == np.uint8 and first.shape == (128, 128, 3)
    brightness = [np.asarray(Image.open(io.BytesIO(b))).mean() for b in faces["image"].head(50)]
    assert min(brightness) > 25, "saved crops are near-black"
    no_race = frame[frame["path"].str.endswith("39_1_20170116174525125.jpg.chip.jpg")].iloc[0]
    assert no_race["age"] == 39 and no_race["gender"] == "female" and pd.isna(no_race["race"])
    assert set(faces["age_group"].dropna()) <= {"Child", "Youth", "Adult", "Middle Age", "Senior"}

    # Re-running resumes: images already done are skipped, nothing is duplicated.
    (utk_sample / "extra").mkdir()
    shutil.copy(next(utk_sample.glob("*.jpg")), utk_sample / "extra" / "copy.JPG")
    again = run_crop(settings)
    assert again.images_skipped_done == 300 and again.images_processed == 1
    frame = pq.read_table(output).to_pandas()
    assert not frame.duplicated(["path", "face_index"]).any()
    assert len(set(frame["path"])) == 301

    # Crop settings are recorded; adding with other settings is refused.
    settings.crop.margin = 0.4
    with pytest.raises(ValueError, match="other settings"):
        run_crop(settings)


def test_whole_image_detector_with_labels_from_a_table(ray_local, utk_sample, tmp_path) -> None:
    images = tmp_path / "in"  # its own folder: other tests add files to utk_sample
    images.mkdir()
    names = sorted(p.name for p in utk_sample.glob("*.jpg"))[:60]
    for name in names:
        shutil.copy(utk_sample / name, images / name)
    table = tmp_path / "labels.csv"
    ages = {name: 20 + i % 50 for i, name in enumerate(names)}
    pd.DataFrame({"path": names, "age": [ages[n] for n in names], "gender": "male"}).to_csv(table, index=False)
    output = tmp_path / "faces"
    settings = CropJobSettings(
        input=str(images),
        output=str(output),
        crop=CropSettings(detector="none", size=64, encoding="png"),
        labels=LabelSettings(kind=str(table)),
    )
    summary = run_crop(settings)
    frame = pq.read_table(output).to_pandas()
    assert summary.faces_written == len(names) and frame["error"].isna().all()
    assert all(age == ages[Path(path).name] for path, age in zip(frame["path"], frame["age"], strict=True))
    crop = np.asarray(Image.open(io.BytesIO(frame["image"].iloc[0])))
    assert crop.shape == (64, 64, 3) and crop.mean() > 25
    assert run_crop(settings).images_skipped_done == len(names)


def test_bad_input_folder_runs_to_exit_zero_with_a_row_per_image(tmp_path) -> None:
    images_dir = tmp_path / "in"
    images_dir.mkdir()
    expected = bad_input_folder(images_dir)
    result = run_cli("crop", "--input", str(images_dir), "--output", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr[-3000:]
    frame = pq.read_table(tmp_path / "out").to_pandas()
    assert set(frame["path"]) == expected
    assert frame.groupby("path").size().max() == 1
    errors = {
        Path(p).name: e if isinstance(e, str) else None for p, e in zip(frame["path"], frame["error"], strict=True)
    }
    for name, reason in BAD_INPUT_ERRORS.items():
        assert errors.pop(name) == reason, name
    assert all(error is None for error in errors.values()), errors
    assert "2 non-image files skipped" in result.stdout
    assert "errors: corrupt=1, empty=1, not_image=1, too_large=1, truncated=1" in result.stdout


def test_killed_driver_then_rerun_gives_every_image_once(utk_sample, tmp_path) -> None:
    images = tmp_path / "in"
    images.mkdir()
    for path in sorted(utk_sample.glob("*.jpg"))[:120]:
        shutil.copy(path, images / path.name)
    output = tmp_path / "faces"
    args = ["crop", "--input", str(images), "--output", str(output), "--detector", "none", "--batch-size", "6"]
    kill_when_files_appear(args, output, files=4)
    done_before = len(pq.read_table(output, columns=["path"]))
    assert 0 < done_before < 120

    again = run_cli(*args)
    assert again.returncode == 0, again.stderr[-3000:]
    frame = pq.read_table(output, columns=["path", "face_index"]).to_pandas()
    assert not frame.duplicated(["path", "face_index"]).any(), "rows doubled by the rerun"
    assert set(frame["path"]) == {str(p) for p in images.iterdir()}, "images lost"
    assert not list(output.glob("_tmp-*")), "a temporary file was left behind"
    # The summary counts this run's rows as they are in the output.
    assert f"{done_before} already done" in again.stdout
    assert f"{120 - done_before} faces written" in again.stdout


def test_job_that_cannot_run_exits_nonzero_with_a_message(tmp_path) -> None:
    result = run_cli("crop", "--input", str(tmp_path / "missing"), "--output", str(tmp_path / "o"))
    assert result.returncode != 0 and "does not exist" in result.stderr
    result = run_cli("crop", "--input", str(tmp_path), "--output", str(tmp_path / "o"), "--detector", "yunet")
    assert result.returncode != 0 and "detector-weights" in result.stderr


def test_a_dead_head_left_recorded_is_reported_at_once(tmp_path) -> None:
    """A head killed without `ray stop` leaves its address recorded; the job says what to do, not hang."""
    ray_tmp = tmp_path / "ray-tmp"
    (ray_tmp / "ray").mkdir(parents=True)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{sock.getsockname()[1]}"
    (ray_tmp / "ray" / "ray_current_cluster").write_text(dead)
    (tmp_path / "in").mkdir()
    Image.new("RGB", (64, 64)).save(tmp_path / "in" / "a.jpg")
    result = run_cli("crop", "--input", str(tmp_path / "in"), "--output", str(tmp_path / "o"), "--detector", "none",
                     env={"RAY_TMPDIR": str(ray_tmp)}, timeout=60)  # fmt: skip
    assert result.returncode != 0
    assert f"no Ray cluster answers at {dead}" in result.stderr and "ray stop" in result.stderr, result.stderr[-2000:]


def test_s3_input_and_output(s3_server, utk_sample, yunet_weights) -> None:
    import boto3

    client = boto3.client(
        "s3",
        endpoint_url=s3_server["AWS_ENDPOINT_URL"],
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    client.create_bucket(Bucket="photos")
    names = sorted(p.name for p in utk_sample.glob("*.jpg"))[:20]
    for name in names:
        client.upload_file(str(utk_sample / name), "photos", f"raw/batch1/{name}")
    client.put_object(Bucket="photos", Key="raw/README.md", Body=b"not an image")
    result = run_cli(
        "crop",
        "--input",
        "s3://photos/raw/",
        "--output",
        "s3://photos/faces/",
        "--labels",
        "utkface",
        "--detector",
        "yunet",
        "--detector-weights",
        yunet_weights,
        env=s3_server,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    keys = [o["Key"] for o in client.list_objects_v2(Bucket="photos", Prefix="faces/")["Contents"]]
    parquet_keys = [k for k in keys if k.endswith(".parquet")]
    assert parquet_keys
    frames = [
        pd.read_parquet(io.BytesIO(client.get_object(Bucket="photos", Key=k)["Body"].read())) for k in parquet_keys
    ]
    frame = pd.concat(frames)
    assert set(frame["path"]) == {f"s3://photos/raw/batch1/{n}" for n in names}
    assert frame["error"].isna().sum() >= 19 and frame["age"].notna().all()
    assert "1 non-image files skipped" in result.stdout


def test_detection_actors_take_a_gpu_share_only_for_gpu_detectors_on_gpu_clusters() -> None:
    assert DETECTORS["yolo"].uses_gpu and not DETECTORS["yunet"].uses_gpu
    assert plan_detection_pool(16, uses_gpu=True, cluster_gpus=0, gpu_fraction=0.25) == (16, 0.0)
    assert plan_detection_pool(16, uses_gpu=False, cluster_gpus=1, gpu_fraction=0.25) == (16, 0.0)
    # Ray hides the GPU from actors that ask for none: YOLO asks for a share, no more actors than fit.
    assert plan_detection_pool(16, uses_gpu=True, cluster_gpus=1, gpu_fraction=0.25) == (4, 0.25)
    assert plan_detection_pool(2, uses_gpu=True, cluster_gpus=2, gpu_fraction=0.25) == (2, 0.25)
    assert plan_detection_pool(16, uses_gpu=True, cluster_gpus=1, gpu_fraction=0.0) == (16, 0.0)
    # Scoring lets detection hold half of one GPU; its model actors take the other half.
    assert plan_detection_pool(16, uses_gpu=True, cluster_gpus=0.5, gpu_fraction=0.25) == (2, 0.25)

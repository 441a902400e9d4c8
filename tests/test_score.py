"""The scoring job on local Ray: the model card's MAE, scenes, bad inputs, S3, resume."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from helpers import BAD_INPUT_ERRORS, bad_input_folder, kill_when_files_appear, run_cli
from PIL import Image

from agepipe.config import LabelSettings, ScoreSettings
from agepipe.images import decode
from agepipe.metrics import interval_summary
from agepipe.model import DEFAULT_MODEL
from agepipe.predict import Predictor
from agepipe.scenes import compose_scene
from agepipe.score import CropStageWorker, ModelStageWorker, ScoreWorker, cropped_rows, run_score, score_rows

CONTRACT = {"path", "face_index", "x1", "y1", "x2", "y2", "age", "age_low", "age_high", "age_group", "gender", "error"}
CARD_METRICS = DEFAULT_MODEL.with_name(f"{DEFAULT_MODEL.stem}_metrics.json")
CARD_SPLIT = DEFAULT_MODEL.with_name("default_split.parquet")


def _link(files: list[Path], folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for file in files:
        (folder / file.name).symlink_to(file)
    return folder


def _text(value: object) -> str | None:
    return value if isinstance(value, str) else None


def test_scoring_the_test_split_reproduces_the_model_cards_mae(ray_local, utkface_dir, yunet_weights, tmp_path):
    card = json.loads(CARD_METRICS.read_text())
    split = pd.read_parquet(CARD_SPLIT)
    names = split.loc[split["split"] == "test", "name"]
    images = _link([utkface_dir / n for n in names], tmp_path / "test-split")
    output = tmp_path / "scores"
    summary = run_score(
        ScoreSettings(
            input=str(images),
            output=str(output),
            crop_overrides={"detector_weights": yunet_weights, "all_faces": False},  # the labelled face, as the card
            labels=LabelSettings(kind="utkface"),
        )
    )
    frame = pq.read_table(output).to_pandas()
    assert set(frame.columns) >= CONTRACT and summary.images_processed == len(names)
    faces = frame[frame["face_index"].notna()]
    mae = float((faces["age"] - faces["label_age"]).abs().mean())
    assert abs(mae - card["test"]["age"]["mae"]) <= 0.3, (mae, card["test"]["age"]["mae"])
    assert set(faces["gender"]) <= {"male", "female"}
    assert set(faces["age_group"]) <= {"Child", "Youth", "Adult", "Middle Age", "Senior"}
    # The calibrated 90% intervals hold what the card says, overall and for every age group, gender and race.
    assert ((faces["age_low"] <= faces["age"]) & (faces["age"] <= faces["age_high"])).all()
    intervals = interval_summary(faces)
    card_intervals = card["intervals"]["aligned"]["overall"]
    assert 0.87 <= intervals["overall"]["coverage"] <= 0.93
    assert abs(intervals["overall"]["coverage"] - card_intervals["coverage"]) <= 0.01
    assert abs(intervals["overall"]["mean_width"] - card_intervals["mean_width"]) <= 0.5
    for grouping in ("by_age_group", "by_gender", "by_race"):
        assert min(row["coverage"] for row in intervals[grouping]) >= 0.85, intervals[grouping]
    widths = faces["age_high"] - faces["age_low"]
    assert widths[faces["age"] < 12].mean() * 2 < widths[faces["age"] > 60].mean()  # not one band for all


def test_score_finds_every_face_of_a_photo_by_default(ray_local, utkface_dir, yunet_weights, tmp_path):
    rng = np.random.default_rng(11)
    files = sorted(utkface_dir.iterdir())
    folder = tmp_path / "scenes"
    folder.mkdir()
    pasted = {}
    for index in range(12):
        faces = [decode(files[i].read_bytes()) for i in rng.choice(len(files), 3, replace=False)]
        scene, boxes = compose_scene(faces, (600, 800), rng, min_side=90)
        path = folder / f"scene{index}.png"
        Image.fromarray(scene).save(path)
        pasted[str(path)] = boxes
    output = tmp_path / "scores"
    overrides = {"detector": "yunet", "detector_weights": yunet_weights}  # no all_faces: the default
    run_score(ScoreSettings(input=str(folder), output=str(output), crop_overrides=overrides))
    frame = pq.read_table(output).to_pandas()
    largest = tmp_path / "largest"
    largest_only = {**overrides, "all_faces": False}
    run_score(ScoreSettings(input=str(folder), output=str(largest), crop_overrides=largest_only))
    assert pq.read_table(largest).to_pandas().groupby("path").size().max() == 1
    matched = total = 0
    for path, boxes in pasted.items():
        rows = frame[(frame["path"] == path) & frame["face_index"].notna()]
        assert sorted(rows["face_index"].astype(int)) == list(range(len(rows)))
        for x1, y1, x2, y2 in boxes:
            total += 1
            center_x, center_y = (rows["x1"] + rows["x2"]) / 2, (rows["y1"] + rows["y2"]) / 2
            inside = center_x.between(x1, x2) & center_y.between(y1, y2)
            matched += bool(inside.any())
        assert len(rows) <= len(boxes) + 1, "far more faces than were pasted"
    assert matched / total >= 0.95, f"{matched} of {total} pasted faces scored where they were pasted"
    assert frame["age"].dropna().between(0, 100).all()


def test_bad_input_folder_runs_to_exit_zero_with_a_row_per_image(model_path, tmp_path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    expected = bad_input_folder(folder)
    result = run_cli(
        "score", "--input", str(folder), "--output", str(tmp_path / "out"), "--model", model_path, "--detector", "dlib"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    frame = pq.read_table(tmp_path / "out").to_pandas()
    # Every face is scored (dlib finds the patch on the astronaut's suit too), each (path, face) once.
    assert set(frame["path"]) == expected and not frame[["path", "face_index"]].duplicated().any()
    frame = frame[frame["face_index"].fillna(0) == 0]
    errors = {Path(p).name: _text(e) for p, e in zip(frame["path"], frame["error"], strict=True)}
    for name, reason in BAD_INPUT_ERRORS.items():
        assert errors.pop(name) == reason, name
    assert all(error is None for error in errors.values()), errors
    assert frame.loc[frame["error"].isna(), "age"].notna().all()
    recorded = json.loads((tmp_path / "out" / "_agepipe_score.json").read_text())
    assert recorded["model"] == str(Path(model_path).resolve()) and recorded["input"] == str(folder)
    assert recorded["crop"]["detector"] == "dlib" and recorded["crop"]["all_faces"] is True
    assert recorded["labels"]["kind"] == "none" and recorded["flip_tta"] is False and recorded["runtime"] is None


def test_s3_input_and_output(s3_server, utkface_dir, model_path) -> None:
    import boto3

    client = boto3.client("s3")
    client.create_bucket(Bucket="bucket")
    names = sorted(os.listdir(utkface_dir))[::500][:30]
    for name in names:
        client.upload_file(str(utkface_dir / name), "bucket", f"new/{name}")
    result = run_cli(
        "score",
        "--input",
        "s3://bucket/new/",
        "--output",
        "s3://bucket/scores/",
        "--model",
        model_path,
        "--detector",
        "none",
        "--labels",
        "utkface",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    keys = [o["Key"] for o in client.list_objects_v2(Bucket="bucket", Prefix="scores/")["Contents"]]
    frame = pd.concat(
        pd.read_parquet(io.BytesIO(client.get_object(Bucket="bucket", Key=k)["Body"].read()))
        for k in keys
        if k.endswith(".parquet")
    )
    assert sorted(frame["path"]) == sorted(f"s3://bucket/new/{n}" for n in names)
    assert frame["age"].notna().all() and frame["label_age"].notna().all()


def test_the_gpu_paths_two_stages_write_the_cpu_actors_rows_and_a_retried_batch_replaces_its_file(
    model_path, utkface_dir, tmp_path
) -> None:
    """The workers without Ray (the GPU path's run here on the CPU): crops cross as bytes to the model stage,
    which writes the rows the one CPU actor writes, one file per batch; a batch run twice leaves one file."""
    images = _link(sorted(utkface_dir.iterdir())[:6], tmp_path / "in")
    batch = {"path": np.array(sorted(map(str, images.iterdir())))}
    settings = ScoreSettings(
        input=str(images), output=str(tmp_path / "cpu"), model=model_path, crop_overrides={"detector": "none"}
    )
    predictor = Predictor.from_settings(settings, device="cpu")
    cpu_actor = ScoreWorker(settings, threads=1, predictor=predictor)
    assert cpu_actor(batch)["rows"].tolist() == [6]
    cpu_actor(batch)  # Ray Data's retry of the same batch
    assert len(list((tmp_path / "cpu").glob("*.parquet"))) == 1

    crops = CropStageWorker(predictor)(batch)
    model_stage = ModelStageWorker(dataclasses.replace(settings, output=str(tmp_path / "gpu")))
    for part in (crops.slice(0, 4), crops.slice(4)):
        model_stage(part)
    assert len(list((tmp_path / "gpu").glob("*.parquet"))) == 2
    cpu, gpu = (pq.read_table(tmp_path / name).to_pandas().sort_values("path") for name in ("cpu", "gpu"))
    assert cpu["path"].tolist() == gpu["path"].tolist() == batch["path"].tolist()
    assert np.allclose(cpu["age"], gpu["age"], atol=1e-3) and (cpu["gender"].values == gpu["gender"].values).all()


def test_interrupted_run_resumed_gives_the_same_rows(model_path, utkface_dir, tmp_path) -> None:
    images = _link(sorted(utkface_dir.iterdir())[::150][:120], tmp_path / "in")
    config = tmp_path / "small_files.yaml"
    config.write_text("batch_size: 8\n")  # a file every 8 images
    output = tmp_path / "resumed"
    args = ["score", "--config", str(config), "--input", str(images), "--model", model_path, "--detector", "none",
            "--output", str(output)]  # fmt: skip
    kill_when_files_appear(args, output, files=2, timeout=600)
    partial = len(list(output.glob("*.parquet")))
    again = run_cli(*args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "already done" in again.stdout and partial < 12

    actual = pq.read_table(output).to_pandas()[["path", "face_index", "age", "gender", "age_group"]]
    assert len(actual) == 120 and not actual.duplicated(["path", "face_index"]).any()
    # The same rows as the job's own functions give the images in one pass, without Ray.
    predictor = Predictor.from_settings(ScoreSettings(model=model_path, crop_overrides={"detector": "none"}))
    rows = cropped_rows({"path": sorted(map(str, images.iterdir()))}, predictor)
    expected = pd.DataFrame(score_rows(rows, predictor))
    expected, actual = (f.sort_values("path").reset_index(drop=True) for f in (expected[actual.columns], actual))
    pd.testing.assert_frame_equal(expected.drop(columns="age"), actual.drop(columns="age"), check_dtype=False)
    assert np.allclose(expected["age"], actual["age"], atol=1e-3)


@pytest.mark.parametrize("bad_model", ["missing.pt", "not_a_checkpoint.pt"])
def test_a_bad_model_stops_the_job_with_a_message(bad_model, tmp_path) -> None:
    (tmp_path / "not_a_checkpoint.pt").write_bytes(b"nope")
    result = run_cli(
        "score", "--input", str(tmp_path), "--output", str(tmp_path / "o"), "--model", str(tmp_path / bad_model)
    )
    assert result.returncode != 0 and "error" in result.stderr


def test_gpu_path_plumbing_on_a_cluster_declaring_a_gpu(ray_local, utkface_dir, yunet_weights, tmp_path) -> None:
    # Ray's GPU is a logical resource: a cluster that declares one runs the two-stage GPU path (crop actors,
    # model actors holding GPU shares) here on the CPU, so its plumbing is checked without a GPU.
    images = _link(sorted(utkface_dir.iterdir())[:40], tmp_path / "images")
    overrides = {"detector_weights": yunet_weights}
    script = (
        "import ray, sys\n"
        "ray.init(num_cpus=2, num_gpus=1)\n"
        "from agepipe.config import ScoreSettings\n"
        "from agepipe.score import run_score\n"
        f"run_score(ScoreSettings(input={str(images)!r}, output=sys.argv[1], crop_overrides={overrides!r}))\n"
    )
    gpu_output = tmp_path / "gpu-path"
    command = [sys.executable, "-c", script, str(gpu_output)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    cpu_output = tmp_path / "cpu-path"
    run_score(ScoreSettings(input=str(images), output=str(cpu_output), crop_overrides=overrides))
    gpu = pq.read_table(gpu_output).to_pandas().sort_values("path").reset_index(drop=True)
    cpu = pq.read_table(cpu_output).to_pandas().sort_values("path").reset_index(drop=True)
    assert len(gpu) == len(cpu) == 40 and list(gpu["path"]) == list(cpu["path"])
    assert np.abs(gpu["age"] - cpu["age"]).max() < 1e-3
    assert list(gpu["gender"]) == list(cpu["gender"])

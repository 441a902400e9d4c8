"""Storage faults, pinned: crop, score and evaluate over s3:// with 5% of requests answered 503 SlowDown
(a fault-injecting proxy in front of the moto server), an outage in the middle of a scoring job, and
a missing bucket, denied access and a dead endpoint. Each runs `agepipe` as a user does."""

from __future__ import annotations

import io
import json
import os
import pickle
import re
import signal
import socket
import subprocess
import sys
import time

import boto3
import pandas as pd
import pytest
from botocore.exceptions import EndpointConnectionError
from faultproxy import FaultProxy
from helpers import run_cli

from agepipe import storage
from agepipe.batch import completed_paths, read_payloads
from agepipe.cli import failure_line, main
from agepipe.model import BUNDLED_MODELS

FAIL_FAST_S = 30
OUTAGE_S = 20
RETRIES = re.compile(r"; (\d+) storage retries$", re.MULTILINE)


def upload_faces(client, utkface_dir, bucket: str, prefix: str, count: int) -> list[str]:
    """`count` UTKFace images (every 300th) under s3://bucket/prefix/; their URIs."""
    names = sorted(os.listdir(utkface_dir))[::300][:count]
    for name in names:
        client.upload_file(str(utkface_dir / name), bucket, f"{prefix}/{name}")
    return [f"s3://{bucket}/{prefix}/{name}" for name in names]


def list_parquet(client, bucket: str = "photos", prefix: str = "scores") -> list[str]:
    return [
        o["Key"]
        for o in client.list_objects_v2(Bucket=bucket, Prefix=prefix + "/").get("Contents", [])
        if o["Key"].endswith(".parquet")
    ]


def read_dataset(client, bucket: str, prefix: str) -> pd.DataFrame:
    """Every Parquet file under s3://bucket/prefix/, read past the proxy."""
    parts = [client.get_object(Bucket=bucket, Key=key)["Body"].read() for key in list_parquet(client, bucket, prefix)]
    return pd.concat([pd.read_parquet(io.BytesIO(part)) for part in parts], ignore_index=True)


def assert_exactly_once(frame: pd.DataFrame, inputs: list[str]) -> None:
    assert sorted(set(frame["path"])) == sorted(inputs)
    keys = list(zip(frame["path"], frame["face_index"].fillna(-1), strict=True))
    assert len(keys) == len(set(keys)), "a (path, face_index) appears twice"


@pytest.fixture()
def faulty_s3(s3_server, monkeypatch, tmp_path):
    """The moto server behind a proxy that answers a seeded 5% of requests 503 SlowDown; `agepipe` and
    every process it starts talk to the proxy, `client` to moto itself (set-up and checks)."""
    client = boto3.client("s3", endpoint_url=s3_server["AWS_ENDPOINT_URL"])
    with FaultProxy(s3_server["AWS_ENDPOINT_URL"], fail_share=0.05, seed=36) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        monkeypatch.setenv("AGEPIPE_CACHE", str(tmp_path / "cache"))  # the model is downloaded, not cached
        proxy.client = client
        yield proxy


def run_counted(proxy: FaultProxy, *args: str) -> tuple[subprocess.CompletedProcess, int]:
    """`agepipe ARGS` and the SlowDowns the proxy answered while it ran."""
    before = proxy.policy.counts["slowdown"]
    result = run_cli(*args)
    return result, proxy.policy.counts["slowdown"] - before


def test_crop_score_and_evaluate_over_s3_through_slowdowns_and_an_outage(
    faulty_s3, utkface_dir, yunet_weights, tmp_path
):
    """One flow, as an operator meets it: crop, score (model and detector weights from s3://) with the
    store refusing everything for 20 s in the middle, the same score command again, then evaluate."""
    client = faulty_s3.client
    client.create_bucket(Bucket="photos")
    client.create_bucket(Bucket="models")
    client.upload_file(str(BUNDLED_MODELS["fast"]), "models", "fast.pt")
    client.upload_file(yunet_weights, "models", "yunet.onnx")
    inputs = upload_faces(client, utkface_dir, "photos", "raw", 24)

    crop_args = ["crop", "--input", "s3://photos/raw", "--output", "s3://photos/faces", "--detector", "none"]
    crop, slowdowns = run_counted(faulty_s3, *crop_args)
    assert crop.returncode == 0, crop.stderr[-3000:]
    assert_exactly_once(read_dataset(client, "photos", "faces"), inputs)
    # Every SlowDown was retried, by the driver or a worker, and the summary counts each retry.
    assert slowdowns > 0 and RETRIES.search(crop.stdout)[1] == str(slowdowns), (slowdowns, crop.stdout)

    # One actor, small batches and files: the job reads, scores and writes a few images at a time, and
    # the store goes down after the first third of the images was read.
    config = tmp_path / "small_files.yaml"
    config.write_text("batch_size: 4\nconcurrency: 1\n")
    faulty_s3.policy.outage_after("/photos/raw/", reads=len(inputs) // 3, seconds=OUTAGE_S)
    score_args = ["score", "--config", str(config), "--input", "s3://photos/raw", "--output", "s3://photos/scores",
                  "--model", "s3://models/fast.pt", "--detector", "yunet", "--detector-weights",
                  "s3://models/yunet.onnx"]  # fmt: skip
    process = subprocess.Popen(
        [sys.executable, "-m", "agepipe.cli", *score_args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        _, stderr = process.communicate(timeout=240)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 3, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    [line] = [line for line in stderr.splitlines() if line.startswith("agepipe score:")]
    assert line.startswith(f"agepipe score: storage unavailable: S3 at {faulty_s3.url} did not answer for s3://photos/")
    assert line.endswith("Nothing written is lost: run the same command again to resume once the store answers")

    while faulty_s3.policy.in_outage():
        time.sleep(0.2)
    written = set(read_dataset(client, "photos", "scores")["path"]) if list_parquet(client) else set()
    score, slowdowns = run_counted(faulty_s3, *score_args)
    assert score.returncode == 0, score.stderr[-3000:]
    assert f"{len(inputs)} images found, {len(written)} already done" in score.stdout, (written, score.stdout)
    assert RETRIES.search(score.stdout)[1] == str(slowdowns), (slowdowns, score.stdout)
    scores = read_dataset(client, "photos", "scores")
    assert_exactly_once(scores, inputs)
    assert len(written) < len(inputs) and scores["age"].notna().sum() >= len(inputs) - 2

    # In this process (evaluate starts no Ray): the environment points it at the proxy too.
    status = main(["evaluate", "--predictions", "s3://photos/scores", "--output", "s3://photos/report",
                   "--labels", "utkface", "--gradcam-faces", "0"])  # fmt: skip
    assert status == 0
    metrics = json.loads(client.get_object(Bucket="photos", Key="report/metrics.json")["Body"].read())
    assert metrics["metrics"]["age"]["faces"] == int(scores["age"].notna().sum())


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("fault", ["missing bucket", "denied", "dead endpoint"])
def test_missing_bucket_denied_access_and_dead_endpoint_fail_fast_naming_the_uri(faulty_s3, fault, tmp_path):
    faulty_s3.client.create_bucket(Bucket="photos")
    env = {}
    if fault == "denied":
        faulty_s3.policy.denied_buckets.add("photos")
    if fault == "dead endpoint":
        env["AWS_ENDPOINT_URL"] = f"http://127.0.0.1:{free_port()}"
    source = "s3://nowhere/raw" if fault == "missing bucket" else "s3://photos/raw"
    started = time.monotonic()
    result = run_cli(
        "crop", "--input", source, "--output", str(tmp_path / "faces"), "--detector", "none", env=env, timeout=120
    )
    assert time.monotonic() - started < FAIL_FAST_S
    assert result.returncode in (2, 3) and "Traceback" not in result.stderr, result.stderr[-3000:]
    [line] = [line for line in result.stderr.splitlines() if line.startswith("agepipe crop:")]
    assert source in line
    expected = {"missing bucket": "does not exist", "denied": "access denied", "dead endpoint": "did not answer"}
    assert expected[fault] in line


def test_an_output_bucket_that_does_not_exist_fails_fast_and_is_not_created(faulty_s3, utkface_dir):
    faulty_s3.client.create_bucket(Bucket="photos")
    upload_faces(faulty_s3.client, utkface_dir, "photos", "raw", 1)
    started = time.monotonic()
    result = run_cli("crop", "--input", "s3://photos/raw", "--output", "s3://typo/faces", "--detector", "none")
    assert time.monotonic() - started < FAIL_FAST_S
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    [line] = [line for line in result.stderr.splitlines() if line.startswith("agepipe crop:")]
    assert "s3://typo/faces" in line and "does not exist" in line
    assert "typo" not in {bucket["Name"] for bucket in faulty_s3.client.list_buckets()["Buckets"]}


def test_an_object_the_store_refuses_is_recorded_as_denied(faulty_s3, utkface_dir):
    faulty_s3.client.create_bucket(Bucket="photos")
    allowed, refused = upload_faces(faulty_s3.client, utkface_dir, "photos", "raw", 2)
    faulty_s3.policy.denied_paths.add(refused.removeprefix("s3:/"))
    payloads = read_payloads([allowed, refused, "s3://photos/raw/gone.jpg"])
    assert payloads[0] == (utkface_dir / allowed.rsplit("/", 1)[1]).read_bytes()
    assert payloads[1:] == ["denied", "unreadable"]


def test_resuming_deletes_a_torn_output_file_but_keeps_one_the_store_would_not_serve(faulty_s3):
    """A rerun reads what is done. A torn file's images are done again; a file the store fails to serve
    (retries run out) stops the plan, and is still there for the rerun once the store answers."""
    client = faulty_s3.client
    client.create_bucket(Bucket="photos")
    done = io.BytesIO()
    pd.DataFrame({"path": ["s3://photos/raw/a.jpg"]}).to_parquet(done)
    client.put_object(Bucket="photos", Key="scores/part-a.parquet", Body=done.getvalue())
    client.put_object(Bucket="photos", Key="scores/part-torn.parquet", Body=done.getvalue()[:40])
    assert completed_paths("s3://photos/scores") == {"s3://photos/raw/a.jpg"}
    assert list_parquet(client) == ["scores/part-a.parquet"]

    faulty_s3.policy.outage_after("/photos/scores/part-a", reads=1, seconds=OUTAGE_S)
    with pytest.raises(storage.StorageUnavailable, match="did not answer for s3://photos/scores"):
        completed_paths("s3://photos/scores")
    assert list_parquet(client) == ["scores/part-a.parquet"]


def test_an_outage_is_found_behind_the_errors_that_wrap_it():
    refused = EndpointConnectionError(endpoint_url="http://127.0.0.1:9/photos")
    try:
        try:
            raise storage.StorageUnavailable("s3://photos/a.jpg", "503 Service Unavailable") from refused
        except storage.StorageUnavailable as inner:
            raise RuntimeError("UDF failed to process a data block") from inner
    except RuntimeError as wrapped:
        outer = wrapped
    found = storage.outage_in(outer)
    assert isinstance(found, storage.StorageUnavailable) and found.uri == "s3://photos/a.jpg"
    status, line = failure_line("score", outer, ["s3://photos/"])
    # It comes back whole from the Ray worker that raised it.
    assert str(pickle.loads(pickle.dumps(found))) == str(found)
    assert status == 3 and "s3://photos/a.jpg" in line and "run the same command again" in line
    # A raw 503 from the store, as Ray Data's writers raise it, names the command's URIs instead.
    assert failure_line("score", RuntimeError("write failed"), []) == (1, None)
    wrapped = RuntimeError("write failed")
    wrapped.__cause__ = OSError(16, "Service Unavailable")
    status, line = failure_line("score", wrapped, ["s3://in/", "s3://out/"])
    assert status == 3 and "s3://in/, s3://out/" in line and "Service Unavailable" in line
    # Errors of one object are not outages.
    assert storage.outage_in(FileNotFoundError(2, "no such key")) is None
    assert storage.outage_in(PermissionError(13, "Access Denied")) is None
    assert failure_line("score", PermissionError(13, "Access Denied"), [])[0] == 2


def test_debug_gives_the_traceback_instead_of_the_line(tmp_path, capsys):
    args = ["evaluate", "--predictions", str(tmp_path / "none"), "--output", str(tmp_path / "report")]
    assert main(args) == 2 and capsys.readouterr().err.startswith("agepipe evaluate: error: ")
    with pytest.raises(FileNotFoundError):
        main([*args, "--debug"])

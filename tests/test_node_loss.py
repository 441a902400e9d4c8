"""Exactly once on a cluster that loses a node: crop and score on a simulated three-node cluster
(`ray.cluster_utils.Cluster`, one CPU each) with a worker node killed mid-job, early, in the middle and
while the last files are written. Every input must be in the output, no (path, face_index) twice."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from agepipe.cluster import recorded_address_file

pytestmark = pytest.mark.slow
IMAGES = 240
BATCH = 12  # 20 batches, so a kill lands among several in flight


@pytest.fixture(scope="module")
def images(utkface_dir, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("node-loss-input")
    for name in sorted(os.listdir(utkface_dir))[::89][:IMAGES]:
        shutil.copy(utkface_dir / name, folder / name)
    return folder


@pytest.fixture()
def cluster():
    """A head and two worker nodes of one CPU each, on this machine; torn down by the test."""
    from ray.cluster_utils import Cluster

    address_file = recorded_address_file()
    before = address_file.read_text() if address_file.is_file() else None
    cluster = Cluster(initialize_head=True, connect=False, head_node_args={"num_cpus": 1, "include_dashboard": False})
    workers = [cluster.add_node(num_cpus=1) for _ in range(2)]
    cluster.wait_for_nodes()
    yield cluster, workers
    cluster.shutdown()
    # A simulated head must not stay recorded as the machine's cluster once it is gone.
    if address_file.is_file() and address_file.read_text() != before and cluster.address in address_file.read_text():
        address_file.unlink()


def parquet_files(folder: Path) -> int:
    return len(list(folder.glob("*.parquet"))) if folder.is_dir() else 0


def run_with_a_node_killed(cluster, workers, command: list[str], output: Path, kill_after_files: int) -> int:
    """Run `agepipe COMMAND` against the cluster; kill a worker node once the output holds
    `kill_after_files` Parquet files (0: as soon as the job has started its actors)."""
    cluster_handle, _ = cluster, workers
    env = {**os.environ, "RAY_ADDRESS": cluster_handle.address}
    process = subprocess.Popen(
        [sys.executable, "-m", "agepipe.cli", *command],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 300
    started = time.monotonic()
    while time.monotonic() < deadline and process.poll() is None:
        ready = parquet_files(output) >= kill_after_files if kill_after_files else time.monotonic() - started > 8
        if ready:
            cluster_handle.remove_node(workers[0], allow_graceful=False)
            break
        time.sleep(0.05)
    out, _ = process.communicate(timeout=600)
    assert process.returncode == 0, out[-3000:]
    return process.returncode


def assert_exactly_once(output: Path, images: Path) -> pd.DataFrame:
    frame = pq.read_table(output, columns=["path", "face_index", "error"]).to_pandas()
    keys = frame.assign(face_index=frame["face_index"].fillna(-1))
    duplicated = keys[keys.duplicated(["path", "face_index"], keep=False)]
    assert duplicated.empty, f"{len(duplicated)} rows doubled, e.g. {duplicated.head(3).to_dict('records')}"
    assert set(frame["path"].map(lambda p: Path(p).name)) == set(os.listdir(images))
    return frame


@pytest.mark.parametrize("kill_after_files", [0, IMAGES // BATCH // 2, IMAGES // BATCH - 3])
def test_crop_is_exactly_once_when_a_worker_node_dies(cluster, images, yunet_weights, tmp_path, kill_after_files):
    output = tmp_path / "faces"
    cluster_handle, workers = cluster
    command = ["crop", "--input", str(images), "--output", str(output), "--labels", "utkface",
               "--detector", "yunet", "--detector-weights", yunet_weights, "--batch-size", str(BATCH)]  # fmt: skip
    run_with_a_node_killed(cluster_handle, workers, command, output, kill_after_files)
    frame = assert_exactly_once(output, images)
    assert len(frame) >= IMAGES
    assert not list(output.glob("_tmp-*")), "a temporary file was left behind"


@pytest.mark.parametrize("kill_after_seconds", [0])
def test_score_is_exactly_once_when_a_worker_node_dies(cluster, images, model_path, tmp_path, kill_after_seconds):
    output = tmp_path / "scores"
    cluster_handle, workers = cluster
    command = ["score", "--input", str(images), "--output", str(output), "--model", model_path,
               "--detector", "none", "--batch-size", str(BATCH)]  # fmt: skip
    run_with_a_node_killed(cluster_handle, workers, command, output, kill_after_seconds)
    assert_exactly_once(output, images)

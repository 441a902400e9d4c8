"""A cluster that loses a node, simulated on this machine (`ray.cluster_utils.Cluster`, real node kills).

Crop and score: one run each that loses a worker node early, another in the middle and a third while
the last files are written; every input must be in the output and no (path, face_index) twice. Train
and Tune: the node holding the training worker killed after the first checkpoint; the run must finish
from that checkpoint with every epoch once, and Tune's ASHA must still stop the trial that is behind."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import psutil
import pyarrow.parquet as pq
import pytest
import torch
from helpers import TINY_RUN, registered_checkpoints

from agepipe.cluster import recorded_address_file
from agepipe.model import load_checkpoint

pytestmark = pytest.mark.slow
IMAGES = 120
BATCH = 12  # 10 batches, so a kill lands among several in flight


@pytest.fixture(scope="module")
def images(utkface_dir, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("node-loss-input")
    for name in sorted(os.listdir(utkface_dir))[::89][:IMAGES]:
        shutil.copy(utkface_dir / name, folder / name)
    return folder


# Ray's defaults take about 15 s (five failed checks, 3 s apart) to declare a killed node dead; the
# tests' kills are certain, so the head declares them after two checks 0.5 s apart.
FAST_NODE_DEATH = {"health_check_period_ms": 500, "health_check_failure_threshold": 2}
WORKER_CPUS = 2  # a training worker of 1.5 CPUs fits on either worker node, not on the one-CPU head


@pytest.fixture(scope="module")
def module_cluster():
    """One simulated cluster for the module: a one-CPU head and two worker nodes, on this machine. Each
    test kills a worker node; `cluster` replaces it afterwards."""
    from ray.cluster_utils import Cluster

    address_file = recorded_address_file()
    before = address_file.read_text() if address_file.is_file() else None
    head_args = {"num_cpus": 1, "include_dashboard": False, "_system_config": FAST_NODE_DEATH}
    cluster = Cluster(initialize_head=True, connect=False, head_node_args=head_args)
    # Cluster records its head as the machine's cluster; the tests name it in RAY_ADDRESS instead, so that
    # other jobs meanwhile (a session fixture's crop run) start a Ray of their own, as they would elsewhere.
    if address_file.is_file() and address_file.read_text() != before:
        address_file.unlink()
    workers = [cluster.add_node(num_cpus=WORKER_CPUS) for _ in range(2)]
    cluster.wait_for_nodes()
    yield cluster, workers
    cluster.shutdown()


@pytest.fixture()
def cluster(module_cluster):
    cluster_handle, workers = module_cluster
    yield cluster_handle, workers
    for index, node in enumerate(workers):
        if node not in cluster_handle.worker_nodes:
            workers[index] = cluster_handle.add_node(num_cpus=WORKER_CPUS)
    cluster_handle.wait_for_nodes()


def parquet_files(folder: Path) -> int:
    return len(list(folder.glob("*.parquet"))) if folder.is_dir() else 0


def run_with_nodes_killed(cluster, workers, command: list[str], output: Path, kill_points: tuple[int, ...]) -> None:
    """Run `agepipe COMMAND` against the cluster and kill a worker node each time the output holds the next
    of `kill_points` Parquet files (0: once the job has started its actors). The nodes to kill are added
    before the job starts, so no node start delays a kill while the job runs on; `workers[1]` survives, so
    the job always keeps a worker node (the `cluster` fixture replaces `workers[0]` afterwards)."""
    victims = [cluster.add_node(num_cpus=WORKER_CPUS) for _ in kill_points[1:]] + [workers[0]]
    cluster.wait_for_nodes()
    env = {**os.environ, "RAY_ADDRESS": cluster.address}
    process = subprocess.Popen(
        [sys.executable, "-m", "agepipe.cli", *command],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 300
    started = time.monotonic()
    pending = list(zip(kill_points, victims, strict=True))
    while pending and time.monotonic() < deadline and process.poll() is None:
        point, victim = pending[0]
        if parquet_files(output) >= point if point else time.monotonic() - started > 8:
            cluster.remove_node(victim, allow_graceful=False)
            pending = pending[1:]
        time.sleep(0.05)
    out, _ = process.communicate(timeout=600)
    assert process.returncode == 0, out[-3000:]
    assert not pending, f"the job ended before its node kills at {[point for point, _ in pending]} files"


def assert_exactly_once(output: Path, images: Path) -> pd.DataFrame:
    frame = pq.read_table(output, columns=["path", "face_index", "error"]).to_pandas()
    keys = frame.assign(face_index=frame["face_index"].fillna(-1))
    duplicated = keys[keys.duplicated(["path", "face_index"], keep=False)]
    assert duplicated.empty, f"{len(duplicated)} rows doubled, e.g. {duplicated.head(3).to_dict('records')}"
    assert set(frame["path"].map(lambda p: Path(p).name)) == set(os.listdir(images))
    return frame


# Early (actors starting), in the middle, and while the last files are written: one run, three nodes lost.
KILL_POINTS = (0, IMAGES // BATCH // 2, IMAGES // BATCH - 3)


def test_crop_is_exactly_once_when_worker_nodes_die(cluster, images, yunet_weights, tmp_path):
    output = tmp_path / "faces"
    cluster_handle, workers = cluster
    command = ["crop", "--input", str(images), "--output", str(output), "--labels", "utkface",
               "--detector", "yunet", "--detector-weights", yunet_weights, "--batch-size", str(BATCH)]  # fmt: skip
    run_with_nodes_killed(cluster_handle, workers, command, output, KILL_POINTS)
    frame = assert_exactly_once(output, images)
    assert len(frame) >= IMAGES
    assert not list(output.glob("_tmp-*")), "a temporary file was left behind"


def test_score_is_exactly_once_when_worker_nodes_die(cluster, images, model_path, tmp_path):
    output = tmp_path / "scores"
    cluster_handle, workers = cluster
    command = ["score", "--input", str(images), "--output", str(output), "--model", model_path,
               "--detector", "none", "--batch-size", str(BATCH)]  # fmt: skip
    run_with_nodes_killed(cluster_handle, workers, command, output, KILL_POINTS)
    frame = assert_exactly_once(output, images)
    assert len(frame) == IMAGES and frame["error"].isna().all()
    assert not list(output.glob("_tmp-*")), "a temporary file was left behind"


def node_running(nodes: list, process_marker: str):
    """The node among `nodes` one of whose processes has `process_marker` in its command line."""
    for node in nodes:
        raylet = psutil.Process(node.all_processes["raylet"][0].process.pid)
        for child in raylet.children(recursive=True):
            try:
                if process_marker in " ".join(child.cmdline()):
                    return node
            except (psutil.NoSuchProcess, psutil.ZombieProcess):
                continue
    return None


def kill_training_node_after_first_checkpoint(
    cluster, workers, command: list[str], runs: Path, timeout: float = 420, cwd: Path | None = None
) -> list[dict]:
    """Run `agepipe COMMAND`; once a Ray Train run under `runs` has registered a checkpoint, kill the
    worker node that holds its training worker. Returns the metrics history that checkpoint holds: a run
    that resumes from it keeps those rows as they were measured, one that started over measures them anew."""
    env = {**os.environ, "RAY_ADDRESS": cluster.address}
    process = subprocess.Popen([sys.executable, "-m", "agepipe.cli", *command], env=env, cwd=cwd,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    deadline = time.monotonic() + timeout
    killed = None
    while killed is None:
        assert process.poll() is None, f"ended before a checkpoint: {process.communicate()[0][-3000:]}"
        assert time.monotonic() < deadline, "no checkpoint in time"
        registered = [run / name for run in runs.glob("**/ray_train") for name in registered_checkpoints(run)]
        if registered:
            killed = node_running(workers, "RayTrainWorker")
        time.sleep(0.2)
    cluster.remove_node(killed, allow_graceful=False)
    saved = torch.load(registered[0] / "state.pt", map_location="cpu", weights_only=True)
    out, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, out[-3000:]
    assert saved["epoch"] == 0 and [row["epoch"] for row in saved["history"]] == [0]
    return saved["history"]


# One training worker of 1.5 CPUs, more than the head has: it runs on a worker node, and after that node
# is lost it fits on the other beside a Tune trial's own sliver. Two epochs, each a checkpoint: the node
# dies after the first, and the second runs on the node left.
NODE_LOSS_RUN = (*TINY_RUN, "--num-workers", "1", "--cpus-per-worker", "1.5", "--phase1-epochs", "1",
                 "--phase2-epochs", "1", "--patience", "10")  # fmt: skip


def test_training_finishes_from_its_checkpoint_when_the_training_node_dies(cluster, small_faces, tmp_path):
    cluster_handle, workers = cluster
    output = tmp_path / "run"
    command = ["train", "--data", str(small_faces), "--output", str(output), *NODE_LOSS_RUN]
    history = kill_training_node_after_first_checkpoint(cluster_handle, workers, command, output)
    metrics = pd.read_csv(output / "metrics.csv")
    assert metrics.iloc[0].to_dict() == pytest.approx(history[0], rel=1e-9), "the run started over"
    assert list(metrics["epoch"]) == [0, 1], "epochs were lost or repeated"
    assert (output / "model.pt").is_file()


def test_tune_trial_resumes_after_its_node_dies_and_asha_stops_the_trial_behind(cluster, small_faces, tmp_path):
    # Two trials, one after another: a sane phase-1 rate, whose node dies after its first checkpoint, then
    # one far too high, which is behind at ASHA's first rung (grace period 1, reduction factor 3) and is
    # stopped there. Relative paths as a user types them: every trial runs in a directory of its own.
    cluster_handle, workers = cluster
    (tmp_path / "space.yaml").write_text(
        "search_space:\n  phase1_lr: {grid: [0.003, 3.0]}\n  dropout: {uniform: [0.1, 0.5]}\n"
    )
    output = tmp_path / "tune"
    command = ["tune", "--config", "space.yaml", "--data", os.path.relpath(small_faces, tmp_path), "--output", "tune",
               *NODE_LOSS_RUN, "--num-samples", "1", "--max-concurrent-trials", "1"]  # fmt: skip
    history = kill_training_node_after_first_checkpoint(cluster_handle, workers, command, output, cwd=tmp_path)
    best = json.loads((output / "best_config.json").read_text())
    assert set(best["config"]) == {"phase1_lr", "dropout"} and best["config"]["phase1_lr"] == 0.003
    trials = pd.read_csv(output / "trials.csv")
    assert len(trials) == 2 and best["val_mae"] == pytest.approx(trials["val_mae"].min())
    iterations = dict(zip(trials["config/searched/phase1_lr"], trials["iterations_run"], strict=True))
    assert iterations == {0.003: 2, 3.0: 1}, "the resumed trial lost an epoch, or ASHA did not stop the one behind"
    metrics = pd.read_csv(output / "metrics.csv")  # the best trial's: the one whose node died, resumed
    assert list(metrics["epoch"]) == [0, 1], "epochs were lost or repeated"
    assert metrics.iloc[0].to_dict() == pytest.approx(history[0], rel=1e-9), "the trial started over"
    model, _, checkpoint = load_checkpoint(str(output / "model.pt"))
    assert model.config.dropout == pytest.approx(best["config"]["dropout"])
    assert checkpoint["val_mae"] == pytest.approx(best["val_mae"])

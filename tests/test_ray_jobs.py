"""Ray Jobs end to end: a head started with `ray start --head` on ports of its own, then crop, a short
training run and scoring submitted with `ray job submit --working-dir .`, as the README shows."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd
import psutil
import pytest

from agepipe.cluster import recorded_address_file
from agepipe.labels import parse_utkface

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


@pytest.fixture()
def head(tmp_path):
    """A Ray head on its own ports, its `python` the one agepipe is installed in (first on PATH); stopped
    by process id (not `ray stop`, which would stop every Ray on the machine), its cluster file removed."""
    gcs, dashboard, agent, agent_grpc, runtime_env, metrics, client, node_manager, object_manager = free_ports(9)
    ray_temp = Path(tempfile.mkdtemp(prefix="rj", dir="/tmp"))  # Ray's socket paths must stay under 108 bytes
    address_file = recorded_address_file()
    before = address_file.read_text() if address_file.is_file() else None
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "RAY_AUTH_MODE": "token"}
    env.pop("RAY_ADDRESS", None)
    started = subprocess.run(
        [
            str(BIN / "ray"),
            "start",
            "--head",
            f"--port={gcs}",
            f"--dashboard-port={dashboard}",
            "--include-dashboard=true",
            f"--dashboard-agent-listen-port={agent}",
            f"--dashboard-agent-grpc-port={agent_grpc}",
            f"--runtime-env-agent-port={runtime_env}",
            f"--metrics-export-port={metrics}",
            f"--ray-client-server-port={client}",
            f"--node-manager-port={node_manager}",
            f"--object-manager-port={object_manager}",
            "--min-worker-port=21000",
            "--max-worker-port=21999",
            "--num-cpus=2",
            "--disable-usage-stats",
            f"--temp-dir={ray_temp}",
        ],  # fmt: skip
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert started.returncode == 0, started.stderr[-3000:]
    head_processes = [
        p for p in psutil.process_iter(["cmdline"]) if f"--gcs_server_port={gcs}" in " ".join(p.info["cmdline"] or [])
    ]
    api = f"http://127.0.0.1:{dashboard}"
    yield {**env, "RAY_API_SERVER_ADDRESS": api, "RAY_ADDRESS": api}, tmp_path
    for process in psutil.process_iter(["cmdline"]):
        with_ours = str(ray_temp) in " ".join(process.info["cmdline"] or []) or process in head_processes
        if with_ours:
            with contextlib.suppress(psutil.Error):
                process.send_signal(signal.SIGKILL)
    if address_file.is_file() and address_file.read_text() != before and str(gcs) in address_file.read_text():
        address_file.unlink()
    shutil.rmtree(ray_temp, ignore_errors=True)


def submit(env: dict, *job: str) -> str:
    """`ray job submit --working-dir . -- python jobs/...`; waits for the job and returns its logs."""
    result = subprocess.run(
        [str(BIN / "ray"), "job", "submit", "--working-dir", ".", "--", "python", *job],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0 and "succeeded" in result.stdout, (result.stdout[-3000:], result.stderr[-3000:])
    return result.stdout


def test_crop_train_and_score_as_ray_jobs(head, utkface_dir, yunet_weights) -> None:
    env, tmp_path = head
    images = tmp_path / "images"
    images.mkdir()
    for name in sorted(os.listdir(utkface_dir))[::97][:200]:
        shutil.copy(utkface_dir / name, images / name)
    faces, run, scores = tmp_path / "faces", tmp_path / "run", tmp_path / "scores"
    submit(env, "jobs/crop_faces.py", "--input", str(images), "--output", str(faces), "--labels", "utkface",
           "--detector", "yunet", "--detector-weights", yunet_weights)  # fmt: skip
    assert len(pd.read_parquet(faces, columns=["path"])["path"].unique()) == 200
    # Fine-tuning the bundled single network at a rate too small to move it: the scores below are then a
    # trained network's, which shows its weights went through the job (one epoch from ImageNet scores far worse).
    submit(env, "jobs/train.py", "--data", str(faces), "--output", str(run), "--initial-checkpoint", "fast",
           "--phase1-epochs", "1", "--phase1-lr", "1e-9", "--phase2-epochs", "0", "--num-workers", "1",
           "--min-per-age", "1", "--precision", "bf16")  # fmt: skip
    assert (run / "model.pt").is_file()
    submit(env, "jobs/score.py", "--input", str(images), "--output", str(scores), "--model", str(run / "model.pt"))
    scored = pd.read_parquet(scores)
    assert set(scored["path"].map(lambda p: Path(p).name)) == set(os.listdir(images))
    assert scored["age"].dropna().between(0, 100).all() and scored["age"].notna().sum() >= 190
    labelled = scored.dropna(subset=["age"]).assign(true_age=lambda f: f["path"].map(lambda p: parse_utkface(p)["age"]))
    assert (labelled["age"] - labelled["true_age"]).abs().mean() < 7

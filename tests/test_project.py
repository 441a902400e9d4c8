"""The project's shape: the two README commands, CI, jobs/ entry points, the cluster config."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent


def test_readme_gives_the_two_commands_and_ci_runs_the_test_one() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "make demo" in readme and "make test" in readme
    assert "make test" in (ROOT / ".ci" / "run").read_text()


README_MAX_LINES = 200  # what a newcomer reads in five minutes; the rest belongs in docs/
MARKDOWN_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def test_readme_is_short_and_its_relative_links_point_at_files() -> None:
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= README_MAX_LINES
    targets = [link.split("#")[0] for link in MARKDOWN_LINK.findall(readme) if not re.match(r"[a-z]+:|#", link)]
    assert "docs/getting-started.md" in targets
    missing = [target for target in targets if not (ROOT / target).is_file()]
    assert not missing, f"README.md links to files that do not exist: {missing}"


@pytest.mark.parametrize("job", ["crop_faces", "train", "tune", "score", "evaluate", "serve", "calibrate"])
def test_job_entry_points_take_the_cli_options(job: str) -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "jobs" / f"{job}.py"), "--help"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "--output" in result.stdout or "--port" in result.stdout


def test_cluster_config_is_valid_for_the_ray_launcher() -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    validate_config(prepare_config(config))  # prepare_config fills the launcher's defaults, as `ray up` does
    assert any("GPU" in node["resources"] for node in config["available_node_types"].values())

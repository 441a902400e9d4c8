"""Connecting a job to Ray: the running cluster when there is one, else a new local Ray."""

from __future__ import annotations

import logging
import os
import re
import socket
from pathlib import Path
from typing import Any

PROBE_SECONDS = 3.0  # a live head answers at once; Ray itself retries a dead address for minutes


class ClusterUnreachable(ConnectionError):
    """A Ray address was given or recorded, and nothing answers there."""


def recorded_address_file() -> Path:
    """Where `ray start --head` records its address for later `ray.init()` calls on this machine
    (under RAY_TMPDIR, else TMPDIR, else /tmp: Ray's own lookup)."""
    from ray._common.utils import get_ray_address_file

    return Path(get_ray_address_file(None))


def cluster_address() -> tuple[str | None, str]:
    """The address `ray.init()` will connect to and where it comes from; None when it starts a local Ray."""
    if os.environ.get("RAY_ADDRESS"):
        return os.environ["RAY_ADDRESS"], "RAY_ADDRESS"
    recorded = recorded_address_file()
    address = recorded.read_text().strip() if recorded.is_file() else ""
    return (address, str(recorded)) if address else (None, "")


def answers(address: str, timeout: float = PROBE_SECONDS) -> bool:
    """Whether a `host:port` address accepts a TCP connection (other forms are left to Ray)."""
    match = re.fullmatch(r"(?:ray://)?\[?([^\]]+?)\]?:(\d+)", address)
    if not match:
        return True
    try:
        with socket.create_connection((match.group(1), int(match.group(2))), timeout=timeout):
            return True
    except OSError:
        return False


def init_ray(**kwargs: Any) -> None:
    """`ray.init` for a job: RAY_ADDRESS, else the cluster `ray start` recorded, else a new local Ray.

    A dead address (most often a head killed without `ray stop`, whose address stays recorded) is
    reported at once with what to do about it; Ray alone would retry it for minutes."""
    import ray

    if ray.is_initialized():
        return
    address, source = cluster_address()
    if address is not None and not answers(address):
        if source == "RAY_ADDRESS":
            fix = "start that cluster, or unset RAY_ADDRESS to run on a local Ray"
        else:
            fix = (
                f"a head started with `ray start` recorded it there and is gone: run `ray stop` (or delete "
                f"{source}) to run on a local Ray, or start the cluster again"
            )
        raise ClusterUnreachable(f"no Ray cluster answers at {address} (from {source}): {fix}")
    ray.init(ignore_reinit_error=True, **kwargs)


class _BelowError(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < logging.ERROR


def quiet_ray_data_failures() -> None:
    """Keep Ray Data's own report of a failed job (error lines and tracebacks) off the console: the
    command reports a failure in one line, and Ray Data's log file in the session folder keeps them.
    A failed map raises its own error, not Ray Data's wrapper, so that the driver can tell which."""
    import ray.data  # its import sets up the "ray.data" logger's handlers

    ray.data.DataContext.get_current().raise_original_map_exception = True
    for handler in logging.getLogger("ray.data").handlers:
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
            handler.addFilter(_BelowError())

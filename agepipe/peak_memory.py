"""Peak memory and CPU time of a process and all its descendants (a Ray job: the driver and its workers)."""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable

import psutil


class PeakMemory:
    """Peak summed RSS and PSS of a process and all its descendants: RSS and CPU times sampled every
    `interval` seconds, PSS every `pss_interval`.

    RSS counts shared pages (Ray's object store) once per process that maps them, so the
    figure is an upper bound; it is the same measure on both sides of a comparison. PSS counts
    each shared page once over the processes that share it: the memory the job holds. Reading it
    walks every process's page tables (about 90 ms of CPU for a 4 GB Ray job), so it is read seldom:
    read twice a second, it took a sixth of a core from the job being measured.
    """

    def __init__(self, pid: int | None = None, interval: float = 0.2, pss_interval: float = 2.0) -> None:
        self.root = psutil.Process(pid or os.getpid())
        self.interval = interval
        self.pss_every = max(1, round(pss_interval / interval))
        self.peak = 0
        self.peak_pss = 0
        # CPU seconds per process of the tree, first and last seen: what the job's processes did, whatever
        # else the machine was doing (the wall clock counts other people's work too).
        self._cpu_first: dict[int, float] = {}
        self._cpu_last: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _tree(self, measure: Callable[[psutil.Process], int]) -> int:
        total = 0
        for process in [self.root, *self.root.children(recursive=True)]:
            try:
                total += measure(process)
            except psutil.Error:
                continue
        return total

    def _cpu(self, process: psutil.Process) -> int:
        times = process.cpu_times()
        seconds = times.user + times.system
        self._cpu_first.setdefault(process.pid, seconds)
        self._cpu_last[process.pid] = seconds
        return 0

    @property
    def cpu_seconds(self) -> float:
        """CPU seconds the process tree spent while sampled, less the sampling's own (a process that lived
        under one interval is missed)."""
        return sum(last - self._cpu_first[pid] for pid, last in self._cpu_last.items()) - self._sampling_cpu

    def _run(self) -> None:
        samples = 0
        self._sampling_cpu = 0.0
        while not self._stop.is_set():
            self._sampling_cpu = time.thread_time()
            with contextlib.suppress(psutil.Error):
                self._tree(self._cpu)
                self.peak = max(self.peak, self._tree(lambda p: p.memory_info().rss))
                if samples % self.pss_every == 0:
                    self.peak_pss = max(self.peak_pss, self._tree(lambda p: p.memory_full_info().pss))
            samples += 1
            time.sleep(self.interval)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        # A last CPU reading; a watched process that has ended and been reaped has none to give.
        with contextlib.suppress(psutil.Error):
            self._tree(self._cpu)

    @property
    def peak_mib(self) -> float:
        return self.peak / 2**20

    @property
    def peak_pss_mib(self) -> float:
        return self.peak_pss / 2**20

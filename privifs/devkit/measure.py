"""Measuring helpers shared by tests and scripts: the peak resident memory of processes (needs psutil)."""

from __future__ import annotations

import threading
import time

import psutil


class PeakRss:
    """Peak RSS of processes while the block runs, sampled every 50 ms: ``peak[name]`` in bytes;
    ``idle[name]`` is the first sample."""

    def __init__(self, pids: dict[str, int] | int):
        pids = {"process": pids} if isinstance(pids, int) else pids
        self.procs = {name: psutil.Process(pid) for name, pid in pids.items()}
        self.peak = {name: 0 for name in pids}
        self.idle = {name: self._rss(p) for name, p in self.procs.items()}
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def _rss(p: psutil.Process) -> int:
        try:
            return p.memory_info().rss
        except psutil.Error:
            return 0

    def _run(self) -> None:
        while not self._stop.is_set():
            for name, p in self.procs.items():
                self.peak[name] = max(self.peak[name], self._rss(p))
            time.sleep(0.05)

    def __enter__(self) -> PeakRss:
        self._t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._t.join()

"""Find or start the embedded engine: ``privifs engine`` as its own process on free loopback
ports, its data under the user's data directory.

A running engine holds an exclusive lock on ``<data-dir>/lock`` and publishes its URLs in
``<data-dir>/urls.json``; callers reuse it. An engine started here dies with the process that
started it (``PR_SET_PDEATHSIG``), so a killed mount leaves no orphan; its data is durable.
"""
from __future__ import annotations

import ctypes
import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from privifs import paths
from privifs.errors import ServerUnreachable

START_TIMEOUT = 30.0


def _die_with_parent() -> None:
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class EmbeddedEngine:
    def __init__(self, data_dir: Path | None = None):
        self.data_dir = data_dir or paths.embedded_engine_dir()
        self.proc: subprocess.Popen | None = None

    def _locked_by_other(self) -> bool:
        lock = self.data_dir / "lock"
        if not lock.exists():
            return False
        with open(lock, "a+") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(f, fcntl.LOCK_UN)
            return False

    def running_urls(self) -> dict[str, str] | None:
        urls_file = self.data_dir / "urls.json"
        deadline = time.monotonic() + 5
        while self._locked_by_other():
            try:
                urls = json.loads(urls_file.read_text())
                if httpx.get(urls["api"] + "/health", timeout=3).status_code == 200:
                    return urls
            except (OSError, ValueError, KeyError, httpx.HTTPError):
                pass
            if time.monotonic() > deadline:
                return None
            time.sleep(0.1)
        return None

    def ensure(self) -> dict[str, str]:
        """URLs of the engine for this data dir, starting one (owned by this process) if none runs."""
        urls = self.running_urls()
        return urls if urls is not None else self.start()

    def start(self) -> dict[str, str]:
        paths.private_dir(self.data_dir)
        urls_file = self.data_dir / "urls.json"
        urls_file.unlink(missing_ok=True)
        log = open(self.data_dir / "engine.log", "ab")
        cmd = [sys.executable, "-m", "privifs", "engine", "--data-dir", str(self.data_dir), "--api-port", "0",
               "--ws-port", "0", "--upstream-port", "0", "--downstream-port", "0"]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                     preexec_fn=_die_with_parent, start_new_session=True)
        log.close()
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServerUnreachable(f"the embedded engine exited at start (code {self.proc.returncode}); "
                                        f"see {self.data_dir / 'engine.log'}")
            try:
                return json.loads(urls_file.read_text())
            except (OSError, ValueError):
                time.sleep(0.05)
        self.stop()
        raise ServerUnreachable(f"the embedded engine did not start within {START_TIMEOUT:.0f}s; "
                                f"see {self.data_dir / 'engine.log'}")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=15)

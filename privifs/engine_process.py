"""Start and stop ``privifs engine`` as a child process: the one engine starter, used by the
embedded engine (:mod:`privifs.embedded`) and by the tests and scripts (:mod:`privifs.devkit`).

:meth:`EngineProcess.start` runs ``python -m privifs engine`` on the given loopback ports (0: any
free port) in its own session, its output appended to a log file, and waits for the URLs file the
engine writes once all its servers listen; the ports it got are kept, so a restart reuses them.
:meth:`EngineProcess.stop` sends SIGTERM and, past a timeout, SIGKILL to its process group.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from privifs import paths
from privifs.errors import ServerUnreachable

START_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0
SERVERS = ("api", "ws", "upstream", "downstream")


class EngineStartFailed(ServerUnreachable):
    """The engine exited at start or did not start in time; ``log_tail`` holds the end of its log."""

    def __init__(self, message: str, log_tail: str = ""):
        super().__init__(message)
        self.log_tail = log_tail


def die_with_parent() -> None:
    """In the child, before exec: receive SIGTERM when the parent (thread) that started it ends."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class EngineProcess:
    """One ``privifs engine`` child process on ``data_dir``.

    ``urls_file`` and ``log_path`` default to ``urls.json`` and ``engine.log`` in the data
    directory; ``settings`` are engine options passed as ``--set name=value``; with
    ``die_with_parent`` the engine gets SIGTERM when the thread that started it ends."""

    def __init__(
        self,
        data_dir: Path,
        *,
        ports: dict[str, int] | None = None,
        settings: dict[str, Any] | None = None,
        urls_file: Path | None = None,
        log_path: Path | None = None,
        die_with_parent: bool = False,
        what: str = "the engine",
        start_timeout: float = START_TIMEOUT,
    ):
        self.data_dir = data_dir = Path(data_dir).absolute()  # the engine runs in CHILD_CWD
        self.ports = dict(ports) if ports else {name: 0 for name in SERVERS}
        self.settings = settings or {}
        self.urls_file = Path(urls_file).absolute() if urls_file else data_dir / "urls.json"
        self.log_path = Path(log_path).absolute() if log_path else data_dir / "engine.log"
        self.die_with_parent = die_with_parent
        self.what = what
        self.start_timeout = start_timeout
        self.proc: subprocess.Popen | None = None
        self.urls: dict[str, str] = {}

    def command(self) -> list[str]:
        p = self.ports
        cmd = paths.child_command(
            "engine",
            "--data-dir",
            str(self.data_dir),
            "--api-port",
            str(p["api"]),
            "--ws-port",
            str(p["ws"]),
            "--upstream-port",
            str(p["upstream"]),
            "--downstream-port",
            str(p["downstream"]),
        )
        if self.urls_file != self.data_dir / "urls.json":  # the engine always writes that one
            cmd += ["--urls-file", str(self.urls_file)]
        for k, v in self.settings.items():
            cmd += ["--set", f"{k}={v}"]
        return cmd

    def start(self) -> EngineProcess:
        """Start the engine and wait until it serves; its URLs are then in :attr:`urls`."""
        self.urls_file.unlink(missing_ok=True)
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=die_with_parent if self.die_with_parent else None,
                cwd=paths.CHILD_CWD,
            )
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = self.log()[-2000:]
                lines = [ln.strip() for ln in tail.splitlines() if ln.strip()]
                why = lines[-1].removeprefix("privifs: error: ")[:300] if lines else ""
                raise EngineStartFailed(
                    f"{self.what} exited at start (code {self.proc.returncode})"
                    + (f": {why}" if why else "")
                    + f"; see {self.log_path}",
                    tail,
                )
            try:
                self.urls = json.loads(self.urls_file.read_text())
            except (OSError, ValueError):
                time.sleep(0.05)
                continue
            self.ports = {name: int(self.urls[name].rsplit(":", 1)[1]) for name in SERVERS}
            return self
        self.stop()
        raise EngineStartFailed(
            f"{self.what} did not start within {self.start_timeout:.0f}s; see {self.log_path}", self.log()[-2000:]
        )

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = STOP_TIMEOUT) -> int | None:
        """SIGTERM, then SIGKILL to the process group after ``timeout``; the exit code if it exited
        by itself (None if it had to be killed or never ran)."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(signal.SIGTERM)
        # a stopped engine (SIGSTOP) acts on the SIGTERM only once continued: without this it was
        # killed after the whole timeout, and `privifs umount` waited for it
        self.proc.send_signal(signal.SIGCONT)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return None

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=STOP_TIMEOUT)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

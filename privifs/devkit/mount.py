"""For tests and scripts: real mounts. Each :class:`Mount` is a user with their own XDG directories,
a profile on a real engine, and a ``privifs mount`` daemon serving a real FUSE mount.

Every wait has a timeout; teardown always leaves nothing mounted or running (lazy unmount and
SIGKILL as the last resort).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from privifs.paths import pid_alive

CMD_TIMEOUT = 180


def isolated_env(root: Path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PRIVICORE_", "XDG_", "PRIVIFS_"))}
    env.update(
        {
            "HOME": str(root / "home"),
            "XDG_CONFIG_HOME": str(root / "config"),
            "XDG_DATA_HOME": str(root / "data"),
            "XDG_STATE_HOME": str(root / "state"),
            "XDG_CACHE_HOME": str(root / "cache"),
            "XDG_RUNTIME_DIR": str(root / "run"),
        }
    )
    env.update(extra)
    return env


def privifs(
    env: dict, *args: str, check: bool = True, timeout: float = CMD_TIMEOUT, input_text: str | None = None
) -> subprocess.CompletedProcess:
    """Run the privifs command line as a user would (a subprocess), failing loudly unless asked."""
    proc = subprocess.run(
        [sys.executable, "-m", "privifs", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        input=input_text,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"privifs {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def is_mounted(path: Path) -> bool:
    with open("/proc/mounts", errors="surrogateescape") as f:
        return any(line.split()[1] == str(path) for line in f)


class Mount:
    def __init__(
        self,
        root: Path,
        engine_urls: dict | None,
        *,
        username: str | None = None,
        password: str = "correct-horse-battery",
        register: bool = True,
        mount_args: tuple = (),
        key_file: Path | None = None,
    ):
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.dir = root / "mnt"
        self.dir.mkdir(exist_ok=True)
        self.username = username or f"fs-{uuid.uuid4().hex[:10]}@example.com"
        extra = {}
        if engine_urls is not None:
            extra = {
                "PRIVICORE_API_URL": engine_urls["api"],
                "PRIVICORE_WS_URL": engine_urls["ws"],
                "PRIVICORE_UPSTREAM_URL": engine_urls["upstream"],
                "PRIVICORE_DOWNSTREAM_URL": engine_urls["downstream"],
                "PRIVICORE_USERNAME": self.username,
                "PRIVICORE_PASSWORD": password,
            }
        self.env = isolated_env(root, **extra)
        self.mount_args = tuple(mount_args)
        if engine_urls is not None:
            privifs(
                self.env,
                "init",
                *(("--register",) if register else ()),
                *(("--key-file", str(key_file)) if key_file else ()),
            )

    @property
    def key_file(self) -> Path:
        return self.root / "config" / "privifs" / "aes.key"

    # -- lifecycle ---------------------------------------------------------------------------
    def mount(self, *extra: str, check: bool = True) -> subprocess.CompletedProcess:
        args = ("mount", str(self.dir), "--refresh-interval", "1", *self.mount_args, *extra)
        return privifs(self.env, *args, check=check)

    def registry(self) -> dict | None:
        for f in (self.root / "run" / "privifs" / "mounts").glob("*.json"):
            try:  # a daemon that is exiting removes its entry between the glob and the read
                entry = json.loads(f.read_text())
            except (FileNotFoundError, ValueError):
                continue
            if entry.get("mountpoint") == str(self.dir):
                return entry
        return None

    @property
    def pid(self) -> int:
        return self.registry()["pid"]

    def umount(self, *extra: str, check: bool = True) -> subprocess.CompletedProcess:
        return privifs(self.env, "umount", str(self.dir), *extra, check=check)

    def kill9(self) -> None:
        entry = self.registry()
        if entry is not None:
            try:
                os.kill(entry["pid"], signal.SIGKILL)
            except ProcessLookupError:
                pass
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and pid_alive(entry["pid"]):
                time.sleep(0.05)
        if is_mounted(self.dir):
            subprocess.run(["fusermount3", "-u", "-z", str(self.dir)], timeout=30, check=False)

    @contextlib.contextmanager
    def mounted(self, *extra: str) -> Iterator[Mount]:
        """Mount, hand the mount to the with-block, and clean up after it, whatever happened."""
        try:
            self.mount(*extra)
            yield self
        finally:
            self.cleanup()

    def cleanup(self) -> None:
        """Unmount whatever is left, politely first, by force if needed."""
        if self.registry() is not None and is_mounted(self.dir):
            try:
                privifs(self.env, "umount", str(self.dir), "--timeout", "30", timeout=90, check=False)
            except subprocess.TimeoutExpired:
                pass
        self.kill9()
        # an embedded engine started by a daemon dies with it; anything else of ours is killed here
        subprocess.run(["pkill", "-9", "-f", f"data-dir {self.root}/"], check=False)

    # -- control -----------------------------------------------------------------------------
    def control(self, request: dict, timeout: float = 120) -> list[dict]:
        from privifs.fs.registry import control_request

        return list(control_request(self.registry(), request, timeout=timeout))

    def status(self) -> dict:
        return json.loads(privifs(self.env, "status", str(self.dir), "--json").stdout)

    def refresh(self) -> None:
        answer = self.control({"cmd": "refresh"})
        assert answer[-1].get("done"), answer

    def wait_idle(self, timeout: float = 120) -> None:
        answer = self.control({"cmd": "flush", "timeout": timeout}, timeout=timeout + 30)
        assert answer[-1].get("done"), answer[-1]

    def wait_online(self, timeout: float = 150) -> None:
        """Wait until the daemon reports its server answering again (it retries on its own)."""
        deadline = time.monotonic() + timeout
        while not self.status()["connection"]["online"]:
            assert time.monotonic() < deadline, self.log()[-3000:]
            time.sleep(0.5)

    def log(self) -> str:
        logs = list((self.root / "state").glob("privifs/vaults/*/mount.log"))
        return "\n".join(p.read_text(errors="replace") for p in logs)

    def token(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return privifs(self.env, "token", *args, check=check)

    def tokens(self) -> list[dict]:
        return [json.loads(line) for line in self.token("ls", "--json").stdout.splitlines()]

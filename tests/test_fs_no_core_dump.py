"""A privifs process that crashes leaves no core file: the AES key and the plaintext it held
stay off the disk even where core dumps are allowed (``ulimit -c unlimited``)."""

from __future__ import annotations

import os
import resource
import signal
import time
from pathlib import Path

import pytest

from privifs.paths import pid_alive
from tests.mountkit import Mount

CORE_PATTERN = Path("/proc/sys/kernel/core_pattern")


def core_files(where: Path) -> set[str]:
    return {p.name for p in where.iterdir() if p.name.startswith("core")}


def test_a_daemon_that_crashes_writes_no_core_file_holding_the_key_or_plaintext(engine, tmp_path):
    """With core dumps allowed, a daemon killed by SIGSEGV wrote its whole memory (the AES key,
    the account's password, file contents) to /core: its working directory."""
    pattern = CORE_PATTERN.read_text().strip()
    if pattern.startswith("|") or "/" in pattern:
        pytest.skip(f"core_pattern is {pattern!r}: cores go to a program or a directory this test does not watch")
    soft, hard = resource.getrlimit(resource.RLIMIT_CORE)
    if hard != resource.RLIM_INFINITY:
        pytest.skip(f"the hard core size limit is {hard}: a core may be cut short or not written")
    resource.setrlimit(resource.RLIMIT_CORE, (hard, hard))  # 'ulimit -c unlimited': the mount inherits it
    try:
        with Mount(tmp_path, engine.urls).mounted() as m:
            (m.dir / "secret.txt").write_text("plaintext that must never reach a disk unencrypted")
            assert (m.dir / "secret.txt").read_text().startswith("plaintext")
            pid = m.pid
            cwd = Path(os.readlink(f"/proc/{pid}/cwd"))
            before = core_files(cwd)
            os.kill(pid, signal.SIGSEGV)
            deadline = time.monotonic() + 60
            while pid_alive(pid):
                assert time.monotonic() < deadline, "the daemon outlived SIGSEGV"
                time.sleep(0.05)
            written = core_files(cwd) - before
            for name in written:  # never left behind, whatever the outcome
                (cwd / name).unlink()
            assert not written, f"the crashed daemon wrote {sorted(written)} in {cwd}"
    finally:
        resource.setrlimit(resource.RLIMIT_CORE, (soft, hard))

"""Measure what another client's churn costs a mount: while mount B untars many small files, how
many full listings mount A reads (each acknowledgement of B's commands is a foreign change) and
what CPU that costs A and the engine.

Starts a local engine, mounts one vault twice (A, and B restored from the same key and
credentials) with the default settings. Phase 1: B untars ``--files`` files of ``--size`` bytes
and waits until the vault has them all, while A stays mounted; then waits until A shows them
all. Phase 2 (the baseline): A unmounted, B untars as many again. Prints, per phase, the time,
A's listings (count and per second), and the CPU seconds of A, B and the engine (psutil). A
measurement, not a test. Usage:
``.venv/bin/python scripts/measure_churn.py [--files 5000] [--size 100]``
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import subprocess
import tarfile
import tempfile
import time
from pathlib import Path

import psutil

from privifs.devkit.engine import EngineProcess
from privifs.devkit.mount import Mount

DEFAULTS = ("--refresh-interval", "30")


def make_tar(path: Path, files: int, size: int) -> None:
    with tarfile.open(path, "w") as tar:
        for i in range(files):
            data = (f"{i:08d}" * (size // 8 + 1)).encode()[:size]
            info = tarfile.TarInfo(f"d{i // 500:03d}/f{i:05d}.txt")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def cpu(pid: int) -> float:
    t = psutil.Process(pid).cpu_times()
    return t.user + t.system


def count_files(root: Path) -> int:
    return sum(len(files) for _, _, files in os.walk(root))


def phase(label: str, b: Mount, a: Mount | None, engine_pid: int, tar: Path, target: str, files: int) -> None:
    pids = {"B": b.pid, "engine": engine_pid} | ({"A": a.pid} if a else {})
    before = {k: cpu(p) for k, p in pids.items()}
    listings0 = a.status()["listings"] if a else 0
    t0 = time.perf_counter()
    (b.dir / target).mkdir()
    subprocess.run(["tar", "-xf", str(tar), "-C", str(b.dir / target)], check=True)
    untarred = time.perf_counter() - t0
    b.wait_idle(timeout=3600)
    stored = time.perf_counter() - t0
    listings1 = a.status()["listings"] if a else 0
    shown = None
    if a is not None:
        while count_files(a.dir / target) < files:
            time.sleep(0.1)
        shown = time.perf_counter() - t0
    after = {k: cpu(p) for k, p in pids.items()}
    n = listings1 - listings0
    print(
        f"{label}: untar {untarred:.1f} s, all {files} stored in the vault after {stored:.1f} s"
        + (f", all shown on A after {shown:.1f} s" if shown else "")
    )
    if a is not None:
        print(f"  A's full listings while B stored: {n} ({n / stored:.2f}/s)")
    print("  CPU seconds: " + ", ".join(f"{k} {after[k] - before[k]:.1f}" for k in pids) + f" (wall {stored:.1f} s)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=5000)
    ap.add_argument("--size", type=int, default=100)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="privifs-churn-", dir=os.environ.get("BENCH_DIR", "/var/tmp")))
    engine = EngineProcess(work / "engine").start()
    a = b = None
    try:
        tar = work / "files.tar"
        make_tar(tar, args.files, args.size)
        a = Mount(work / "a", engine.urls, mount_args=DEFAULTS)
        b = Mount(
            work / "b", engine.urls, username=a.username, register=False, key_file=a.key_file, mount_args=DEFAULTS
        )
        a.mount()
        b.mount()
        phase("with A mounted", b, a, engine.proc.pid, tar, "one", args.files)
        a.umount()
        phase("baseline, A unmounted", b, None, engine.proc.pid, tar, "two", args.files)
    finally:
        for m in (a, b):
            if m is not None:
                m.cleanup()
        engine.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Measure big files stored as parts through a real mount on a fresh engine: the first byte and
1 MiB from the middle of a cold file stored with ``privifs token put`` (never read by the mount,
so its read cache is empty; the engine's blob files may be in the kernel's page cache), and small
commits per second of SQLite (rollback journal, synchronous=FULL) on a database of N MiB, where
every commit's fsync waits until the vault has it. A measurement, not a test.

    .venv/bin/python scripts/measure_parts_mount.py [--file-mib 2048] [--db-mib 100] [--commits 30]
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.enginekit import EngineProcess
from tests.mountkit import Mount

MiB = 1024 * 1024


def cold_reads(m: Mount, tmp: Path, mib: int) -> None:
    src = tmp / "big.bin"
    block = os.urandom(MiB)
    with open(src, "wb") as f:
        for _ in range(mib):
            f.write(block)
    t0 = time.perf_counter()
    m.token("put", str(src), "--name", "big.bin", "--context", "/")
    put_s = time.perf_counter() - t0
    src.unlink()
    m.refresh()
    path = m.dir / "big.bin"
    t0 = time.perf_counter()
    with open(path, "rb") as f:
        first = f.read(1)
    first_s = time.perf_counter() - t0
    m.umount()
    m.mount()  # a fresh mount: the kernel's page cache of the mount is gone, the part cache stays
    os.listdir(m.dir)
    t0 = time.perf_counter()
    with open(path, "rb") as f:
        middle = os.pread(f.fileno(), MiB, (mib // 2) * MiB + 12345)
    middle_s = time.perf_counter() - t0
    assert len(first) == 1 and len(middle) == MiB
    print(f"token put of {mib} MiB (parts)       {put_s:8.2f} s  ({mib * MiB / put_s / 1e6:.0f} MB/s)")
    print(f"first byte, cold {mib} MiB file       {first_s * 1e3:8.1f} ms")
    print(f"1 MiB from the middle, cold         {middle_s * 1e3:8.1f} ms")


def sqlite_commits(m: Mount, mib: int, commits: int) -> None:
    db = sqlite3.connect(m.dir / "test.db", isolation_level=None)
    db.execute("PRAGMA journal_mode=DELETE")
    db.execute("PRAGMA synchronous=FULL")
    db.execute("CREATE TABLE filler (b BLOB)")
    db.execute("CREATE TABLE t (k INTEGER PRIMARY KEY, v TEXT)")
    db.execute("BEGIN")
    for _ in range(mib * 4):
        db.execute("INSERT INTO filler VALUES (?)", (os.urandom(250 * 1024),))
    db.execute("COMMIT")
    m.wait_idle()
    times = []
    for i in range(commits):
        t0 = time.perf_counter()
        db.execute("INSERT INTO t (v) VALUES (?)", (f"row {i}",))
        times.append(time.perf_counter() - t0)
    db.close()
    size = (m.dir / "test.db").stat().st_size
    print(
        f"SQLite db of {size / MiB:.0f} MiB, {commits} small commits: median {statistics.median(times) * 1e3:.0f} ms"
        f" per commit = {1 / statistics.median(times):.1f} commits/s (total {commits / sum(times):.1f}/s)"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--file-mib", type=int, default=2048)
    ap.add_argument("--db-mib", type=int, default=100)
    ap.add_argument("--commits", type=int, default=30)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
        tmp = Path(tmp)
        eng = EngineProcess(tmp / "engine").start()
        m = Mount(tmp / "user", eng.urls)
        try:
            with m.mounted():
                if args.file_mib:
                    cold_reads(m, tmp, args.file_mib)
                if args.db_mib:
                    sqlite_commits(m, args.db_mib, args.commits)
        finally:
            m.cleanup()
            eng.stop()


if __name__ == "__main__":
    main()

"""Measure how long a change made on one mount takes to show on another mount of the same vault.

Starts a local engine, mounts one vault twice (A, and B restored from the same key and
credentials) with the default settings (refresh interval 30 s, write-back delay 1 s), then for
each kind of change — create, modify, rename, delete — makes it on A ``--changes`` times, one at
a time, and polls B every 10 ms until B shows it (a directory listing for names, the content for
a modification). The clock starts when A's call returns (``close`` for create and modify, so the
write-back delay is part of the figure) and stops when B shows the change. Prints the median,
the 90th percentile and the maximum per kind. A measurement, not a test. Usage:
``.venv/bin/python scripts/measure_propagation.py [--changes 20] [--timeout 60]``
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from privifs.devkit.engine import EngineProcess
from privifs.devkit.mount import Mount

DEFAULTS = ("--refresh-interval", "30")  # mountkit's own default is 1 s; this is privifs's


def wait_until(check, timeout: float) -> float:
    """Seconds until ``check()`` is true, polling every 10 ms (``inf`` at the timeout)."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        try:
            if check():
                return time.perf_counter() - t0
        except OSError:
            pass
        time.sleep(0.01)
    return float("inf")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--changes", type=int, default=20)
    ap.add_argument("--timeout", type=float, default=60.0)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="privifs-propagation-", dir=os.environ.get("BENCH_DIR", "/var/tmp")))
    engine = EngineProcess(work / "engine").start()
    a = b = None
    try:
        a = Mount(work / "a", engine.urls, mount_args=DEFAULTS)
        b = Mount(
            work / "b", engine.urls, username=a.username, register=False, key_file=a.key_file, mount_args=DEFAULTS
        )
        a.mount()
        b.mount()
        (a.dir / "p").mkdir()
        a.wait_idle()
        b.refresh()
        results: dict[str, list[float]] = {"create": [], "modify": [], "rename": [], "delete": []}
        for i in range(args.changes):
            name, data = f"f{i}.txt", f"created {i}\n".encode()
            (a.dir / "p" / name).write_bytes(data)
            results["create"].append(wait_until(lambda: (b.dir / "p" / name).read_bytes() == data, args.timeout))
        for i in range(args.changes):
            name, data = f"f{i}.txt", f"modified {i}\n".encode()
            (a.dir / "p" / name).write_bytes(data)
            results["modify"].append(wait_until(lambda: (b.dir / "p" / name).read_bytes() == data, args.timeout))
        for i in range(args.changes):
            old, new = f"f{i}.txt", f"r{i}.txt"
            os.rename(a.dir / "p" / old, a.dir / "p" / new)
            results["rename"].append(
                wait_until(lambda: new in (names := os.listdir(b.dir / "p")) and old not in names, args.timeout)
            )
        for i in range(args.changes):
            name = f"r{i}.txt"
            os.unlink(a.dir / "p" / name)
            results["delete"].append(wait_until(lambda: name not in os.listdir(b.dir / "p"), args.timeout))
        print(f"{'change':8} {'median':>8} {'p90':>8} {'max':>8}   ({args.changes} changes each, seconds)")
        for kind, xs in results.items():
            xs = sorted(xs)
            p90 = xs[min(len(xs) - 1, int(round(0.9 * (len(xs) - 1))))]
            print(f"{kind:8} {statistics.median(xs):8.2f} {p90:8.2f} {xs[-1]:8.2f}")
    finally:
        for m in (a, b):
            if m is not None:
                m.cleanup()
        engine.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

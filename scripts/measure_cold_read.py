"""Measure a cold read of a 1 GiB file on privifs in its two phases, the first byte (request,
download, verify, seal into the cache) and the rest (served from the sealed cache through FUSE),
and what "cold" takes: with ``--variants`` each run prepares the read one of three ways:

* ``honest``: privifs's content cache emptied (remount), sync and drop the kernel's page cache,
  so the engine reads its blob from disk (what ``scripts/bench`` does before every cold read);
* ``no-drop``: content cache emptied, page cache kept: the engine's blob is still in memory;
* ``keep-cache``: page cache dropped but privifs's content cache kept (only remounted): the file
  is served from the local sealed copy that writing it left, nothing is downloaded.

Each line shows what was resident before the read (the engine's blobs in the page cache, via
``fincore``; the content cache's size), what the engine read during it (``/proc/PID/io``), the
CPU seconds the daemon and the engine spent, and the machine's load average. Mounts privifs on
the embedded engine in a temporary directory (as ``scripts/bench`` does). A measurement, not a
test; needs root for ``drop_caches``. Usage:
``.venv/bin/python scripts/measure_cold_read.py [--mib 1024] [--runs 3] [--variants honest,no-drop,keep-cache]``
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench

VARIANTS = ("honest", "no-drop", "keep-cache")


def cpu_seconds(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            t = psutil.Process(pid).cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


def prepare(c: bench.Privifs, variant: str) -> None:
    if variant == "keep-cache":
        c.stop()
        c.start()
    else:
        c.clear_cache()
    if variant != "no-drop":
        bench.drop_caches()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=1024)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--variants", default="honest", help=f"comma-separated, of: {', '.join(VARIANTS)}")
    args = ap.parse_args()
    variants = [v for v in args.variants.split(",") if v]
    if set(variants) - set(VARIANTS):
        sys.exit(f"unknown variant; known: {', '.join(VARIANTS)}")
    work = Path(tempfile.mkdtemp(prefix="privifs-bench-", dir=os.environ.get("BENCH_DIR", "/var/tmp")))
    c = bench.Privifs(work)
    c.start()
    try:
        target = c.mnt / "big.bin"
        bench.write_big(target, args.mib, os.urandom(bench.MiB), False)
        c.settle()
        engine_data = [Path(c.env["XDG_DATA_HOME"])]
        print(f"written and settled: content cache {bench.dir_bytes(c.cache_dir) / bench.MiB:.0f} MiB", flush=True)
        for _ in range(args.runs):
            for variant in variants:
                prepare(c, variant)
                blobs = [p for p in bench.backing_files(c) if any(str(p).startswith(str(d)) for d in engine_data)]
                resident = bench.resident_bytes(blobs) / bench.MiB
                cached = bench.dir_bytes(c.cache_dir) / bench.MiB
                pids = c.pids()
                read0, cpu0 = bench.proc_rchar(pids.get("engine")), cpu_seconds(list(pids.values()))
                t0 = time.perf_counter()
                with open(target, "rb", buffering=0) as f:
                    n = len(f.read(1))
                    t1 = time.perf_counter()
                    while chunk := f.read(bench.MiB):
                        n += len(chunk)
                t2 = time.perf_counter()
                served = (bench.proc_rchar(pids.get("engine")) - read0) / bench.MiB
                cpu = cpu_seconds(list(pids.values())) - cpu0
                print(
                    f"{variant:10s} before: blobs in page cache {resident:5.0f} MiB, content cache {cached:5.0f} MiB"
                    f" | first byte {t1 - t0:5.2f} s, rest {t2 - t1:5.2f} s, total {t2 - t0:5.2f} s,"
                    f" {n / (t2 - t0) / 1e6:4.0f} MB/s | engine read {served:5.0f} MiB"
                    f" | daemon+engine CPU {cpu:5.2f} s | load {os.getloadavg()[0]:.2f}",
                    flush=True,
                )
    finally:
        c.stop()  # unmounts, by force if need be
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

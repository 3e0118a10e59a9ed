"""Measure a cold read of a 1 GiB file on privifs in its two phases: the first byte (request,
download, verify, seal into the cache) and the rest (served from the sealed cache through FUSE).

Mounts privifs on the embedded engine in a temporary directory (as ``scripts/bench`` does),
writes the file, then per run empties privifs's cache and the kernel's caches and reads the file.
A measurement, not a test; needs root for ``drop_caches``. Usage:
``.venv/bin/python scripts/measure_cold_read.py [--mib 1024] [--runs 3]``
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=1024)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="privifs-bench-", dir=os.environ.get("BENCH_DIR", "/var/tmp")))
    c = bench.Privifs(work)
    c.start()
    try:
        target = c.mnt / "big.bin"
        bench.write_big(target, args.mib, os.urandom(bench.MiB), False)
        c.settle()
        for _ in range(args.runs):
            c.clear_cache()
            bench.drop_caches()
            t0 = time.perf_counter()
            with open(target, "rb", buffering=0) as f:
                n = len(f.read(1))
                t1 = time.perf_counter()
                while chunk := f.read(bench.MiB):
                    n += len(chunk)
            t2 = time.perf_counter()
            print(f"first byte {t1 - t0:5.2f} s   rest {t2 - t1:5.2f} s   total {t2 - t0:5.2f} s"
                  f"   {n / (t2 - t0) / 1e6:4.0f} MB/s", flush=True)
    finally:
        c.stop()  # unmounts, by force if need be
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

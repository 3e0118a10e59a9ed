"""Measure how fast many small files drain to the vault: N files of 4 KiB are created on a
mount of the embedded engine (as ``scripts/bench`` does), then the time until the write-back
has uploaded every one (a control-socket flush) gives the drain rate in files/s. The CPU time the
daemon and the engine spent while draining, per file, is printed too: it does not depend on what
else runs on the machine, the rate does. A measurement, not a test.
Usage: ``.venv/bin/python scripts/measure_drain.py [--files 5000] [--runs 1] [--mount-arg=--upload-workers=8]``
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
import bench
import psutil


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=5000)
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--mount-arg", action="append", default=[], help="extra argument for privifs mount")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="privifs-bench-", dir=os.environ.get("BENCH_DIR", "/var/tmp")))
    c = bench.Privifs(work)
    bench.sh(*c.cmd, "mount", c.mnt, *args.mount_arg, env=c.env)
    try:
        for run in range(args.runs):
            root = c.mnt / f"run{run}"
            root.mkdir()
            t0 = time.perf_counter()
            bench.small_files(root, args.files, 50)
            created = time.perf_counter() - t0
            procs = {name: psutil.Process(pid) for name, pid in c.pids().items()}
            cpu0 = {name: sum(p.cpu_times()[:2]) for name, p in procs.items()}
            t1 = time.perf_counter()
            c.settle()
            drained = time.perf_counter() - t1
            spent = {name: sum(p.cpu_times()[:2]) - cpu0[name] for name, p in procs.items()}
            cpu = ", ".join(f"{name} {s:.1f} s ({s / args.files * 1000:.2f} ms/file)" for name, s in spent.items())
            print(
                f"run {run + 1}: created {args.files} files in {created:.2f} s "
                f"({args.files / created:.0f}/s); drained in a further {drained:.2f} s "
                f"({args.files / drained:.0f} files/s); create→all in the vault "
                f"{args.files / (created + drained):.0f} files/s; CPU while draining: {cpu}; "
                f"both {sum(spent.values()) / args.files * 1000:.2f} ms/file",
                flush=True,
            )
    finally:
        c.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

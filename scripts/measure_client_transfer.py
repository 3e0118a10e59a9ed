#!/usr/bin/env python3
"""Measure ``privifs token put`` and ``get`` of an N MiB file (default 1024) through a fresh
engine: throughput, and the client's peak RSS against its idle size (the peak RSS of
``privifs token ls``, which imports, connects and lists but transfers nothing). A measurement,
not a test.

    .venv/bin/python scripts/measure_client_transfer.py [--mib 1024]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from privifs.devkit.engine import EngineProcess

CHUNK = 1024 * 1024


def run_measured(env: dict, args: list[str]) -> tuple[float, int, str]:
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "privifs", *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    ps = psutil.Process(proc.pid)
    peak = 0
    while proc.poll() is None:
        try:
            peak = max(peak, ps.memory_info().rss)
        except psutil.Error:
            break
        time.sleep(0.02)
    out, err = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"privifs {' '.join(args)} failed: {err}")
    return time.perf_counter() - t0, peak, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=1024)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
        tmp = Path(tmp)
        eng = EngineProcess(tmp / "engine").start()
        try:
            env = {k: v for k, v in os.environ.items() if not k.startswith(("PRIVICORE_", "XDG_"))}
            env.update(
                XDG_CONFIG_HOME=str(tmp / "cfg"),
                XDG_STATE_HOME=str(tmp / "state"),
                XDG_CACHE_HOME=str(tmp / "cache"),
                XDG_DATA_HOME=str(tmp / "data"),
                PRIVICORE_API_URL=eng.urls["api"],
                PRIVICORE_WS_URL=eng.urls["ws"],
                PRIVICORE_UPSTREAM_URL=eng.urls["upstream"],
                PRIVICORE_DOWNSTREAM_URL=eng.urls["downstream"],
                PRIVICORE_USERNAME="bench@example.com",
                PRIVICORE_PASSWORD="correct-horse-battery",
            )
            subprocess.run(
                [sys.executable, "-m", "privifs", "init", "--register"],
                env=env,
                check=True,
                capture_output=True,
                timeout=120,
            )
            src = tmp / "src.bin"
            block = os.urandom(CHUNK)
            digest = hashlib.sha256()
            with open(src, "wb") as f:
                for _ in range(args.mib):
                    f.write(block)
                    digest.update(block)
            _, idle, _ = run_measured(env, ["token", "ls"])
            put_s, put_peak, out = run_measured(env, ["token", "put", str(src)])
            token = out.strip()
            dst = tmp / "dst.bin"
            get_s, get_peak, _ = run_measured(env, ["token", "get", token, str(dst)])
            back = hashlib.sha256()
            with open(dst, "rb") as f:
                while chunk := f.read(CHUNK):
                    back.update(chunk)
            assert back.digest() == digest.digest(), "the file came back different"
            mib = args.mib
            print(f"payload              {mib} MiB")
            print(
                f"privifs token put    {put_s:6.2f} s  {mib / put_s:7.1f} MiB/s  peak RSS {put_peak / 2**20:6.1f} MiB"
                f"  (+{(put_peak - idle) / 2**20:.1f} MiB over idle)"
            )
            print(
                f"privifs token get    {get_s:6.2f} s  {mib / get_s:7.1f} MiB/s  peak RSS {get_peak / 2**20:6.1f} MiB"
                f"  (+{(get_peak - idle) / 2**20:.1f} MiB over idle)"
            )
            print(f"client idle RSS      {idle / 2**20:6.1f} MiB (privifs token ls)")
            print("checksum             identical")
        finally:
            eng.stop()


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Measure what chooses the part size of big files (docs/format.md, "Why these sizes"): for each
part size, over loopback to a fresh engine, the time to store one part and to fetch and verify
one part (median of N), and the manifest size of a 4 GiB file. A measurement, not a test.

    .venv/bin/python scripts/measure_parts.py [--sizes 256K,1M,4M,16M] [--n 7]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from privifs.client.connect import connect
from privifs.client.provision import new_identity, register_profile
from privifs.client.session import PasswordCredentials
from privifs.client.transport import Endpoints
from privifs.parts import format as fmt
from privifs.parts.store import PartStore
from tests.enginekit import EngineProcess

KiB, MiB, GiB = 1024, 1024 * 1024, 1024**3


def size_of(text: str) -> int:
    unit = {"K": KiB, "M": MiB}[text[-1].upper()]
    return int(text[:-1]) * unit


async def measure(urls: dict, sizes: list[int], n: int) -> None:
    endpoints = Endpoints.from_dict(urls)
    user = f"parts-{uuid.uuid4().hex[:8]}@example.com"
    _, public = new_identity()
    await register_profile(endpoints, user, "correct-horse-battery", public)
    async with connect(endpoints, PasswordCredentials(user, "correct-horse-battery")) as client:
        key = os.urandom(32)
        print(
            f"{'part size':>10} {'store ms':>9} {'fetch+verify ms':>16} {'MB/s fetch':>10} "
            f"{'4 GiB manifest':>15} {'parts of 4 GiB':>15}"
        )
        for size in sizes:
            store = PartStore(client.vault(key), part_size=size)
            data = os.urandom(size)
            puts, gets = [], []
            for i in range(n):
                t0 = time.perf_counter()
                part = await store.put_part(f"m{i}", 0, data)
                puts.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                await store.get_part(fmt.Manifest(size, size, (part,)), 0)
                gets.append(time.perf_counter() - t0)
            count = fmt.parts_needed(4 * GiB, size)
            manifest = fmt.HEADER.size + count * (
                1 + len(part.token) + fmt.ENTRY_TAIL.size
            )  # tokens as the engine gives
            put_ms, get_ms = statistics.median(puts) * 1e3, statistics.median(gets) * 1e3
            print(
                f"{size // KiB:>8}Ki {put_ms:>9.1f} {get_ms:>16.1f} {size / statistics.median(gets) / 1e6:>10.0f} "
                f"{manifest / KiB:>12.0f}KiB {count:>15}"
            )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="256K,1M,2M,4M,8M,16M")
    ap.add_argument("--n", type=int, default=7)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
        eng = EngineProcess(Path(tmp) / "engine").start()
        try:
            trio.run(measure, eng.urls, [size_of(s) for s in args.sizes.split(",")], args.n)
        finally:
            eng.stop()


if __name__ == "__main__":
    main()

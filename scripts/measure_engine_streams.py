#!/usr/bin/env python3
"""Measure the engine's stream servers: upload and download N MiB (default 1024) through the
upstream and downstream servers of a freshly started engine, and report throughput and the
engine's peak RSS (sampled every 50 ms). A measurement, not a test.

    .venv/bin/python scripts/measure_engine_streams.py [--mib 1024]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import tempfile
import time
from pathlib import Path

import httpx
import trio

from privifs.devkit.engine import EngineProcess, Wire, command_id
from privifs.devkit.measure import PeakRss

CHUNK = 1024 * 1024


async def measure(mib: int) -> None:
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
        eng = EngineProcess(Path(tmp) / "data").start()
        try:
            wire = Wire(eng.urls)
            await wire.provision()
            block = os.urandom(CHUNK)
            digest = hashlib.sha256()
            with PeakRss(eng.proc.pid) as rss:
                async with wire.channel() as ch:
                    r = await wire.post("/data-token/reserve-token-space", {"context": "bench"})
                    cid = command_id(r)
                    await ch.wait_for("X-DPT-CAB-ID", cid)
                    body = (await wire.get(f"/data-token/retrieve-temporary-data-token/{cid}")).json()

                    async def payload():
                        for _ in range(mib):
                            digest.update(block)
                            yield block

                    t0 = time.perf_counter()
                    async with httpx.AsyncClient(timeout=None) as c:
                        r = await c.post(f"{eng.urls['upstream']}/?{body['stream']}", content=payload())
                    up_s = time.perf_counter() - t0
                    assert r.status_code == 200, r.text
                    r = await wire.post(
                        "/data-token/configure-file-meta",
                        {
                            "token": body["token"],
                            "fileName": "big.bin",
                            "context": "bench",
                            "size": str(mib * CHUNK - 28),
                        },
                    )
                    token = r.json()["token"]
                    r = await wire.post("/data-token/request-data", {"token": token})
                    d = await ch.wait_for("X-DPT-CAB-REQUEST-ID", r.headers["x-dpt-cab-request-id"], timeout=60)
                    t0 = time.perf_counter()
                    down = hashlib.sha256()
                    n = 0
                    async with httpx.AsyncClient(timeout=None) as c:
                        async with c.stream("GET", f"{eng.urls['downstream']}/", params={"auth": d["body"]}) as resp:
                            async for chunk in resp.aiter_raw(CHUNK):
                                down.update(chunk)
                                n += len(chunk)
                    down_s = time.perf_counter() - t0
            await wire.aclose()
            assert down.digest() == digest.digest() and n == mib * CHUNK, "downloaded bytes differ"
            print(f"payload            {mib} MiB")
            print(f"upload             {up_s:6.2f} s   {mib / up_s:7.1f} MiB/s")
            print(f"download           {down_s:6.2f} s   {mib / down_s:7.1f} MiB/s")
            print(f"engine RSS idle    {rss.idle['process'] / 2**20:6.1f} MiB")
            print(f"engine RSS peak    {rss.peak['process'] / 2**20:6.1f} MiB  (limit 150 MiB)")
            print("checksum           identical")
        finally:
            eng.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=1024)
    args = ap.parse_args()
    trio.run(measure, args.mib)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Measure small-file stores at the client, without FUSE: ``--files`` stores of ``--size`` bytes
through one connection to a fresh engine, ``--in-flight`` at a time (the write-back's shape), and
the CPU each costs the client and the engine; then ``--lookups`` listing lookups of one token
(``filters[token]``, what each store's confirmation asks) against as many bare ``GET /health``.
A measurement, not a test.

    .venv/bin/python scripts/measure_stores.py [--files 1200] [--size 4096] [--in-flight 8]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path

import psutil
import trio

from privifs.client.connect import connect
from privifs.client.datatokens import FileMeta, find
from privifs.client.provision import new_identity, register_profile
from privifs.client.session import PasswordCredentials
from privifs.client.transport import Endpoints
from privifs.devkit.engine import EngineProcess

PASSWORD = "correct-horse-battery"


def cpu(process: psutil.Process) -> float:
    times = process.cpu_times()
    return times.user + times.system


async def measure(eng: EngineProcess, args: argparse.Namespace) -> None:
    endpoints = Endpoints.from_dict(eng.urls)
    user = f"measure-{uuid.uuid4().hex[:8]}@example.com"
    await register_profile(endpoints, user, PASSWORD, new_identity()[1])
    engine, me = psutil.Process(eng.proc.pid), psutil.Process()
    async with connect(endpoints, PasswordCredentials(user, PASSWORD)) as client:
        vault = client.vault(os.urandom(32))
        data = os.urandom(args.size)
        limit = trio.CapacityLimiter(args.in_flight)
        tokens: list[str] = []

        async def store(i: int) -> None:
            async with limit:
                tokens.append(await vault.put_bytes(data, FileMeta(f"f{i}", "", "/m", args.size, f"/m/f{i}")))

        e0, c0, t0 = cpu(engine), cpu(me), time.perf_counter()
        async with trio.open_nursery() as nursery:
            for i in range(args.files):
                nursery.start_soon(store, i)
        took = time.perf_counter() - t0
        print(
            f"{args.files} stores of {args.size} bytes, {args.in_flight} in flight: {args.files / took:.0f} files/s; "
            f"CPU per file: client {(cpu(me) - c0) / args.files * 1e3:.2f} ms, "
            f"engine {(cpu(engine) - e0) / args.files * 1e3:.2f} ms"
        )
        for what, call in (
            ("lookup by token", lambda: find(client.tokens, tokens[0])),
            ("GET /health", lambda: client.transport.call("GET", "/health", auth=False, idempotent=True)),
        ):
            e0, t0 = cpu(engine), time.perf_counter()
            for _ in range(args.lookups):
                await call()
            print(
                f"{what}: {(time.perf_counter() - t0) / args.lookups * 1e3:.2f} ms each, "
                f"engine CPU {(cpu(engine) - e0) / args.lookups * 1e3:.3f} ms"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=1200)
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--in-flight", type=int, default=8)
    parser.add_argument("--lookups", type=int, default=1000)
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="privifs-measure-"))
    eng = EngineProcess(scratch / "engine").start()
    try:
        trio.run(measure, eng, args)
    finally:
        eng.stop()
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()

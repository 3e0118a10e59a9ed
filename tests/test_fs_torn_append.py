"""A kill -9 that tears the pwrite of an append's first chunk (the file's
last, partial chunk) must not cost the whole staged file at the next start."""

from __future__ import annotations

import os

from privifs.crypto.sealed import CHUNK, HEADER, SLOT
from tests.fskit import inprocess_fs


async def test_a_torn_last_chunk_costs_that_chunk_not_the_whole_staged_file(account, tmp_path):
    key = os.urandom(32)
    data = os.urandom(20 * CHUNK + 5000)
    async with inprocess_fs(tmp_path, *account, key=key) as t:
        t.hold_write_back()  # never uploaded
        await t.write_file("big.bin", data)
        path = t.node("big.bin").staged.path
    # the append's rewrite of chunk 20 was stopped by the kill after two pages (Linux checks for
    # a fatal signal between the pages of a buffered write); its header was never rewritten
    fd = os.open(path, os.O_WRONLY)
    os.pwrite(fd, os.urandom(8192), HEADER + 20 * SLOT)
    os.close(fd)
    async with inprocess_fs(tmp_path, *account, key=key) as t:
        names = [name for name, _ in await t.readdir("")]
        assert names == ["big.bin"], names  # the 20 chunks before the torn one are still there
        sealed = t.node("big.bin").staged.sealed
        assert sealed.size == len(data) and sealed.read(0, 20 * CHUNK) == data[: 20 * CHUNK]

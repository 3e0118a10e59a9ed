"""A write that fails halfway inside a clean file (the disk refused its second chunk): what it
changed before it failed is what this mount shows, so the vault gets it too."""

from __future__ import annotations

import os

import pyfuse3
import pytest

from privifs.crypto.sealed import CHUNK
from tests.fskit import chunk_writes_refused, inprocess_fs


async def test_what_a_write_that_failed_halfway_changed_is_uploaded_too(account, tmp_path, monkeypatch):
    key = os.urandom(32)
    old = os.urandom(3 * CHUNK)
    async with inprocess_fs(tmp_path, *account, key=key) as t:
        await t.write_file("f.bin", old)
        await t.settle()
    async with inprocess_fs(tmp_path, *account, key=key) as t:  # a fresh start: nothing staged
        node = t.node("f.bin")
        assert node.staged is None and not node.content_dirty
        fh = await t.open_file("f.bin", os.O_RDWR)
        with chunk_writes_refused(monkeypatch, 2), pytest.raises(pyfuse3.FUSEError):
            await t.write(fh, 0, b"N" * (2 * CHUNK))  # chunk 0 written, chunk 1 refused
        assert await t.read(fh, 0, 10) == b"N" * 10  # this mount shows what the write changed
        assert node.content_dirty
        await t.close(fh)
        await t.settle()
        shown = await t.read_file("f.bin")
    assert shown == b"N" * CHUNK + old[CHUNK:]
    other = tmp_path / "other"
    other.mkdir()
    async with inprocess_fs(other, *account, key=key) as o:  # another client: the vault's content
        assert await o.read_file("f.bin") == shown

"""A file removed while its write-back waited for one of the big-upload slots: the worker found
its staged content gone (the kernel forgot the removed file) and failed with an AttributeError,
a traceback in the mount's log and a supervised-task failure in ``privifs status`` (found by kill
-9 cycles against an engine with fault injection, where uploads are slow and retried)."""

from __future__ import annotations

import os

import trio

from tests.fskit import inprocess_fs

KEY = bytes(range(32))


async def test_a_big_file_removed_while_waiting_for_an_upload_slot_is_just_dropped(account, tmp_path):
    async with inprocess_fs(tmp_path, *account, key=KEY, workers=2, big_uploads=1) as t:
        gate = trio.Event()
        real = t.syncer._put_whole

        async def held(node, staged, meta):
            if node.name == "a":
                await gate.wait()
            return await real(node, staged, meta)

        t.syncer._put_whole = held
        await t.write_file("/a", os.urandom(300_000))
        with trio.fail_after(10):
            while not t.node("/a").uploading:
                await trio.sleep(0.01)
        await t.write_file("/b", os.urandom(300_000))
        b = t.node("/b")
        await trio.sleep(0.3)  # b's worker waits for the one big-upload slot a holds
        await t.unlink("/b")
        t.forget(b)
        assert b.staged is None
        gate.set()
        await t.settle()
        assert t.supervisor.failing() == []
        assert await t.vault_names() == {"a": 300_000}

"""A daemon killed while an upload it no longer needs as it was is in flight: the file was
removed, renamed or written again after the upload started, the server made the token, and the
daemon died before recording it. The next start found that token in the listing, claimed by no
node, and showed it: the removed file came back, the renamed one showed twice, the rewritten one
got a conflict copy of its old content. Played in-process: the first run stops (a crash) right
after the server made the token; the second starts over the same state directory."""

from __future__ import annotations

import os

import pytest
import trio

from privifs.parts import format as fmt
from tests.fskit import inprocess_fs


async def _crash_after_the_token_is_made(t, path: str, data: bytes, change) -> str:
    """Write ``path``, let its upload make the token, apply ``change`` while the upload is still
    to be recorded, and return the token (the caller then leaves the run: the crash)."""
    made, never = trio.Event(), trio.Event()
    real = t.syncer.vault.put_stream
    token = None

    async def held(*args, **kwargs):
        nonlocal token
        token = await real(*args, **kwargs)
        made.set()
        await never.wait()  # killed before the record

    t.syncer.vault.put_stream = held
    await t.write_file(path, data)
    t.syncer.last_activity = float("-inf")
    with trio.fail_after(20):
        await made.wait()
    await change()
    return token


async def test_a_file_removed_while_its_upload_was_in_flight_stays_removed_after_a_crash(account, tmp_path):
    key = os.urandom(32)
    async with inprocess_fs(tmp_path, *account, key=key) as t:

        async def remove():
            await t.unlink("f.bin")

        await _crash_after_the_token_is_made(t, "f.bin", os.urandom(70_000), remove)
    async with inprocess_fs(tmp_path, *account, key=key) as t:
        await t.settle()
        await t.refresh()
        assert [name for name, _ in await t.readdir("")] == []
        assert await t.vault_names() == {}
        assert t.fs.index.superseded() == {} and t.fs.staging.ids() == set()  # settled, nothing left


async def test_a_file_renamed_while_its_upload_was_in_flight_shows_once_after_a_crash(account, tmp_path):
    key = os.urandom(32)
    data = os.urandom(70_000)
    async with inprocess_fs(tmp_path, *account, key=key) as t:

        async def rename():
            await t.rename("f.bin", "g.bin")

        await _crash_after_the_token_is_made(t, "f.bin", data, rename)
    async with inprocess_fs(tmp_path, *account, key=key) as t:
        await t.settle()
        await t.refresh()
        await t.settle()
        assert [name for name, _ in await t.readdir("")] == ["g.bin"]
        assert await t.read_file("g.bin") == data
        assert await t.vault_names() == {"g.bin": len(data)}


async def test_a_file_rewritten_while_its_upload_was_in_flight_has_no_conflict_copy_after_a_crash(account, tmp_path):
    key = os.urandom(32)
    async with inprocess_fs(tmp_path, *account, key=key) as t:

        async def rewrite():
            await t.write_file("f.bin", b"the second version")

        await _crash_after_the_token_is_made(t, "f.bin", os.urandom(70_000), rewrite)
    async with inprocess_fs(tmp_path, *account, key=key) as t:
        await t.settle()
        await t.refresh()
        await t.settle()
        assert [name for name, _ in await t.readdir("")] == ["f.bin"]
        assert await t.read_file("f.bin") == b"the second version"
        assert await t.vault_names() == {"f.bin": len(b"the second version")}


@pytest.mark.parametrize("written_again", [False, True])
async def test_a_big_file_cut_off_before_its_manifest_was_marked_keeps_its_name_after_a_crash(
    account, tmp_path, written_again
):
    """A file stored as parts: the daemon was killed after the server made the manifest token and
    before its risk meta marked it as one. The next start compared the staged content with the
    token's own bytes (the manifest's, not the file's), so the token was no interrupted upload but
    another client's version: older than the one the start then stored, it took the file's name and
    the file's current content showed as a conflict copy (seen on a mount: a 41 MB SQLite database
    after kill -9 cycles read its older version, and `big-delete.conflict-c5b0839f` held the commits
    made since). The unmarked manifest is now recognised and the upload adopted."""
    key = os.urandom(32)
    data = os.urandom(9 * 2**20)
    async with inprocess_fs(tmp_path, *account, key=key) as t:
        made, never = trio.Event(), trio.Event()
        tokens = t.syncer.parts.store.tokens
        real = tokens.set_risk

        async def held(token, risk):
            if fmt.MARK in risk:  # the manifest's mark: killed before it is written
                made.set()
                await never.wait()
            return await real(token, risk)

        tokens.set_risk = held
        await t.write_file("big.bin", data)
        t.syncer.last_activity = float("-inf")
        with trio.fail_after(60):
            await made.wait()
        if written_again:  # (the upload's token is then an overtaken one, for the start to delete)
            data = data[:100] + b"again" + data[105:]
            await t.write_file("big.bin", data)
    async with inprocess_fs(tmp_path, *account, key=key) as t:
        await t.settle()
        await t.refresh()
        await t.settle()
        assert [name for name, _ in await t.readdir("")] == ["big.bin"]
        assert await t.read_file("big.bin") == data
        assert await t.vault_names() == {"big.bin": len(data)}
        (listed,) = await t.listing()
        assert fmt.MARK in listed.risk  # marked: no sweep takes its parts for unnamed ones
        await t.write_file("big.bin", b"short now")  # the adopted token is a manifest like any other
        await t.settle()
        await t.refresh()
        assert await t.read_file("big.bin") == b"short now"
        assert await t.vault_names() == {"big.bin": len(b"short now")}


async def test_an_upload_cut_off_by_a_crash_is_recognised_after_another_client_moved_its_directory(account, tmp_path):
    """The daemon dies after the server made the token of ``X/f.bin``, before recording it;
    meanwhile another client, which listed that token, renames ``X`` to ``Y`` (moving the token
    along). The next start followed the rename (the node, with no token, moved along with its
    directory) but looked for the interrupted upload where the node was before that listing:
    the token showed as a second file beside it, a conflict copy on every mount (seen with three
    mounts, one killed mid-race), and the file was stored again."""
    key = os.urandom(32)
    data = os.urandom(70_000)
    async with inprocess_fs(tmp_path, *account, key=key) as t:
        await t.mkdir("X")
        await t.settle()

        async def nothing():
            pass

        await _crash_after_the_token_is_made(t, "X/f.bin", data, nothing)
        await t.remote.move_dir("X", "Y")  # another client, which listed the token
    async with inprocess_fs(tmp_path, *account, key=key) as t:
        await t.settle()
        await t.refresh()
        await t.settle()
        await t.refresh()
        assert await t.tree() == {"Y": "dir", "Y/f.bin": data}
        assert await t.vault_tree() == {"Y": "dir", "Y/f.bin": data}

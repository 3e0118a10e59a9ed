"""The write-back of big files as parts, in-process (tests/fskit.py) against the real engine: a
big file is stored as parts + a manifest, a change uploads only the parts it touched and a new
manifest, the replaced manifest's parts no longer named (and a removed file's) are deleted, and a big file that was one
token is converted when rewritten. The threshold and part size are shrunk so files stay small."""

from __future__ import annotations

import os
import tracemalloc

import pytest
import trio

from privifs.client.datatokens import FileMeta
from privifs.errors import IntegrityError, ServerError
from privifs.fs.partwrite import Unfinished
from privifs.parts import format as fmt
from privifs.parts.store import PartStore, is_part
from tests.fskit import inprocess_fs, manifest_marks_cut_off

KEY = bytes(range(32))
PART = 64 * 1024


@pytest.fixture
def small_parts(monkeypatch):
    monkeypatch.setattr("privifs.fs.sync.PARTS_THRESHOLD", 2 * PART)
    monkeypatch.setattr("privifs.parts.store.THRESHOLD", 2 * PART)
    monkeypatch.setattr("privifs.fs.partwrite.PART_SIZE", PART)


async def vault_state(t) -> tuple[list, list]:
    infos = [i async for i in t.client.tokens.list()]
    return [i for i in infos if fmt.MARK in i.risk], [i for i in infos if is_part(i)]


async def big_file(t, name: str):
    """A file of three parts, written and closed: its node."""
    fh, node = t.create_node(1, name)
    await t.fs.write(fh, 0, os.urandom(3 * PART))
    t.fs.release(fh)
    return node


async def assert_only_parts_of(t, keep) -> None:
    """The vault's parts are those of ``keep``'s manifest, and ``keep`` reads whole."""
    _, parts = await vault_state(t)
    kept = await PartStore(t.fs.vault).manifest(keep.token)
    assert sorted(i.token for i in parts) == sorted(p.token for p in kept.parts)
    assert len(await read_all(t, keep)) == 3 * PART


async def read_all(t, node) -> bytes:
    fh = await t.open_node(node, os.O_RDONLY)
    try:
        return await t.fs.read(fh, 0, node.size + 10)
    finally:
        t.fs.release(fh)


async def test_a_big_file_written_through_the_mount_is_stored_as_parts(account, tmp_path, small_parts):
    data = os.urandom(5 * PART + 17)
    async with inprocess_fs(tmp_path, *account, key=KEY) as t:
        fh, node = t.create_node(1, "big.bin")
        await t.fs.write(fh, 0, data)
        await t.fs.fsync(fh)
        t.fs.release(fh)
        await t.wait_idle()
        manifests, parts = await vault_state(t)
        assert [(i.token, i.file_name, i.size) for i in manifests] == [(node.token, "big.bin", len(data))]
        assert len(parts) == 6 and manifests[0].risk.get("privifs.type") == "file"
        store = PartStore(t.fs.vault)
        m = await store.manifest(node.token)
        assert await store.read(m, 0, len(data)) == data
        assert await read_all(t, node) == data
        # the whole content is cached once, under the manifest's token (the staged file moved
        # there); parts are not cached a second time, and reads download nothing
        assert t.fs.cache.holds(node.token) and not any(t.fs.cache.holds(p.token) for p in m.parts)
        assert t.fs.cache.downloads == 0


async def test_a_small_change_uploads_only_its_part_and_a_new_manifest(account, tmp_path, small_parts):
    data = bytearray(os.urandom(8 * PART))
    async with inprocess_fs(tmp_path, *account, key=KEY) as t:
        fh, node = t.create_node(1, "db.sqlite")
        await t.fs.write(fh, 0, bytes(data))
        await t.fs.fsync(fh)
        old_token = node.token
        old = await PartStore(t.fs.vault).manifest(old_token)
        uploaded = t.syncer.parts.parts_uploaded
        await t.fs.write(fh, 5 * PART + 100, b"commit")
        data[5 * PART + 100 : 5 * PART + 106] = b"commit"
        await t.fs.fsync(fh)
        t.fs.release(fh)
        await t.wait_idle()
        assert t.syncer.parts.parts_uploaded - uploaded == 1
        new = await PartStore(t.fs.vault).manifest(node.token)
        assert node.token != old_token
        same = [p.token == q.token for p, q in zip(old.parts, new.parts, strict=True)]
        assert same == [True] * 5 + [False] + [True] * 2
        manifests, parts = await vault_state(t)
        assert [i.token for i in manifests] == [node.token]  # the old manifest is deleted
        # its replaced part waits out a grace (another client rewriting the file may reuse it) …
        assert sorted(i.token for i in parts) == sorted({*(p.token for p in new.parts), old.parts[5].token})
        assert await t.syncer.retire_due() == 0
        assert await t.syncer.retire_due(now=float("inf")) == 1  # … then goes: no other manifest names it
        await t.wait_idle()
        manifests, parts = await vault_state(t)
        assert sorted(i.token for i in parts) == sorted(p.token for p in new.parts)
        assert await read_all(t, node) == bytes(data)


async def test_a_big_single_token_file_is_converted_to_parts_when_rewritten(account, tmp_path, small_parts):
    data = os.urandom(4 * PART)
    async with inprocess_fs(tmp_path, *account, key=KEY) as t:
        single = await t.fs.vault.put_bytes(data, FileMeta("old.bin", "bin", "/", 0, "/old.bin"))
        await t.refresher.refresh_once()
        node = t.node("/old.bin")
        assert await read_all(t, node) == data
        fh = await t.open_node(node)
        await t.fs.write(fh, len(data), b"tail")
        await t.fs.fsync(fh)
        t.fs.release(fh)
        await t.wait_idle()
        manifests, parts = await vault_state(t)
        assert [i.token for i in manifests] == [node.token] and node.token != single and len(parts) == 5
        assert single not in {i.token async for i in t.client.tokens.list()}
        assert await read_all(t, node) == data + b"tail"


async def test_a_big_file_shrunk_below_the_threshold_becomes_one_token_again(account, tmp_path, small_parts):
    async with inprocess_fs(tmp_path, *account, key=KEY) as t:
        fh, node = t.create_node(1, "f.bin")
        await t.fs.write(fh, 0, os.urandom(3 * PART))
        await t.fs.fsync(fh)
        assert fmt.MARK in node.remote_risk
        await t.truncate(fh, 100)
        await t.fs.fsync(fh)
        t.fs.release(fh)
        await t.wait_idle()
        manifests, _ = await vault_state(t)
        assert manifests == [] and len(await t.fs.vault.get_bytes(node.token)) == 100
        # the replaced manifest's parts go after the grace, as a rewrite's (they were left to the
        # hour-old sweep: seen, a 20 MiB file truncated to 1 MiB left its 5 parts, 20 MiB)
        assert await t.syncer.retire_due(now=float("inf")) == 3
        await t.wait_idle()
        assert (await vault_state(t))[1] == []


async def test_parts_of_a_deleted_big_file_are_collected_once_old_enough(account, tmp_path, small_parts):
    async with inprocess_fs(tmp_path, *account, key=KEY) as t:
        await big_file(t, "gone.bin")
        keep = await big_file(t, "kept.bin")
        await t.wait_idle()
        t.unlink_node(1, "gone.bin")
        await t.wait_idle()
        infos = [i async for i in t.client.tokens.list()]
        assert len([i for i in infos if is_part(i)]) == 6  # the deleted manifest's parts wait out a grace
        assert await t.fs.parts.sweep(infos) == 0  # too young: they may belong to a store in flight
        assert await t.fs.parts.sweep(infos, min_age=0, interval=0) == 3
        await assert_only_parts_of(t, keep)


async def test_parts_of_a_manifest_whose_mark_is_missing_are_never_collected(account, tmp_path, small_parts):
    """The sweep counted the parts of marked manifests only. A manifest whose mark never reached
    the vault (its writer killed between configure-file-meta and the risk meta write, and not
    mounted again within the hour; or another application replaced the risk meta) had its parts
    collected by any mount's sweep an hour later, and the file read as EIO for good."""
    async with inprocess_fs(tmp_path, *account, key=KEY) as t:
        tokens = t.syncer.parts.store.tokens
        real = tokens.set_risk

        async def unmarked(token, risk):
            return await real(token, {k: v for k, v in risk.items() if k != fmt.MARK})

        tokens.set_risk = unmarked
        node = await big_file(t, "kept.bin")
        await t.wait_idle()
        tokens.set_risk = real
        data = await read_all(t, node)
        infos = [i async for i in t.client.tokens.list()]
        assert [i for i in infos if fmt.MARK in i.risk] == [] and len([i for i in infos if is_part(i)]) == 3
        assert await t.fs.parts.sweep(infos, min_age=0, interval=0) == 0
        assert await t.fs.parts.sweep(infos, min_age=0, interval=0) == 0  # (decided once: not fetched again)
        _, parts = await vault_state(t)
        assert len(parts) == 3
        assert await PartStore(t.fs.vault).manifest(node.token) is not None
        assert await read_all(t, node) == data and len(data) == 3 * PART


async def test_removing_a_big_file_deletes_its_parts_after_the_grace(account, tmp_path, small_parts):
    async with inprocess_fs(tmp_path, *account, key=KEY) as t:
        node, keep = await big_file(t, "gone.bin"), await big_file(t, "kept.bin")
        await t.wait_idle()
        gone = await PartStore(t.fs.vault).manifest(node.token)
        t.unlink_node(1, "gone.bin")
        await t.wait_idle()
        manifests, parts = await vault_state(t)
        assert [i.token for i in manifests] == [keep.token]
        assert {p.token for p in gone.parts} <= {i.token for i in parts}  # another client may still read them …
        assert await t.syncer.retire_due(now=float("inf")) == 3  # … then they go, not at the hour-old sweep
        await t.wait_idle()
        await assert_only_parts_of(t, keep)


async def test_a_big_file_removed_while_its_upload_was_in_flight_leaves_no_parts(account, tmp_path, small_parts):
    async with inprocess_fs(tmp_path, *account, key=KEY) as t:
        node = await big_file(t, "brief.bin")
        t.syncer.upload_soon(node)
        while not node.uploading:  # the upload has started …
            await trio.sleep(0.001)
        t.fs.unlink(1, b"brief.bin")  # … and the file goes before it ends
        await t.wait_idle()
        manifests, _ = await vault_state(t)
        assert manifests == []
        await t.syncer.retire_due(now=float("inf"))
        await t.wait_idle()
        _, parts = await vault_state(t)
        assert parts == []


async def test_parts_no_write_reached_are_not_even_read_and_truncation_counts_as_a_change(
    account, tmp_path, small_parts
):
    data = bytearray(os.urandom(8 * PART))
    async with inprocess_fs(tmp_path, *account, key=KEY) as t:
        fh, node = t.create_node(1, "db.sqlite")
        await t.fs.write(fh, 0, bytes(data))
        await t.fs.fsync(fh)
        t.fs.release(fh)
        await t.wait_idle()
        reads = []
        fh = await t.open_node(node)
        await t.fs.write(fh, 2 * PART + 5, b"changed")
        data[2 * PART + 5 : 2 * PART + 12] = b"changed"
        staged = node.staged
        original = staged.sealed.read_view  # what the write-back reads through

        def counting(offset, length, **how):
            reads.append(offset // PART)
            return original(offset, length, **how)

        staged.sealed.read_view = counting
        kept, uploaded = t.syncer.parts.parts_kept, t.syncer.parts.parts_uploaded
        await t.fs.fsync(fh)
        # only the written part is read: for its digest, then again a piece at a time as it uploads
        assert set(reads) == {2} and t.syncer.parts.parts_uploaded - uploaded == 1
        assert t.syncer.parts.parts_kept - kept == 7
        # shrink and grow back: the parts in between are zeros now, and must be stored so
        await t.truncate(fh, 3 * PART)
        await t.truncate(fh, 8 * PART)
        data[3 * PART :] = bytes(5 * PART)
        await t.fs.fsync(fh)
        t.fs.release(fh)
        await t.wait_idle()
        assert await read_all(t, node) == bytes(data)
        assert await t.fs.vault.get_bytes(node.token) != bytes(data)  # a manifest, not the content
        store = PartStore(t.fs.vault)
        assert await store.read(await store.manifest(node.token), 0, len(data)) == bytes(data)


async def test_what_a_new_manifest_replaces_leaves_the_cache(account, tmp_path, small_parts):
    async with inprocess_fs(tmp_path, *account, key=KEY) as t:
        fh, node = t.create_node(1, "db.sqlite")
        await t.fs.write(fh, 0, os.urandom(4 * PART))
        await t.fs.fsync(fh)
        old_token = node.token
        old = await PartStore(t.fs.vault).manifest(old_token)
        assert t.fs.cache.holds(old_token)
        await t.fs.write(fh, PART + 1, b"x")
        assert not t.fs.cache.holds(old_token)  # the whole content moved into staging, not copied
        assert old_token not in t.fs.cache.cache  # and its row is gone
        assert node.staged.size == 4 * PART
        await t.fs.fsync(fh)
        t.fs.release(fh)
        assert not t.fs.cache.holds(old_token) and not t.fs.cache.holds(old.parts[1].token)
        assert t.fs.cache.holds(node.token)


def stored_elsewhere(t, data: bytes):
    """A PartStore of the vault (with the tests' part size) and a source of ``data`` for its
    put: how a test stores a big file the way the mount's own upload would have."""
    store = PartStore(t.fs.vault, part_size=PART)

    async def source():
        yield data

    return store, source


async def test_a_manifest_stored_before_a_crash_is_recognised_as_the_interrupted_upload(account, tmp_path, small_parts):
    data = os.urandom(3 * PART + 9)
    async with inprocess_fs(tmp_path, *account, key=KEY) as t:
        fh, node = t.create_node(1, "big.bin")
        await t.fs.write(fh, 0, data)  # still open for writing: not uploaded
        store, source = stored_elsewhere(t, data)

        # what a crash between storing the manifest and recording it leaves in the vault
        token = await store.put(source, len(data), FileMeta("big.bin", "bin", "/", 0, "/big.bin"))
        info = [i async for i in t.client.tokens.list() if i.token == token][0]
        assert await t.syncer.adopt_orphan(node, info)
        assert node.token == token and fmt.MARK in node.remote_risk
        t.fs.release(fh)
        await t.wait_idle()
        assert await read_all(t, node) == data
        fh = await t.open_node(node, os.O_WRONLY)  # the next write starts from the whole content
        await t.fs.write(fh, 0, b"!")
        await t.fs.fsync(fh)
        t.fs.release(fh)
        assert await read_all(t, node) == b"!" + data[1:]
        assert await store.read(await store.manifest(node.token), 0, len(data)) == b"!" + data[1:]


async def test_a_manifest_a_crash_left_without_its_risk_meta_is_recognised_as_the_interrupted_upload(
    account, tmp_path, small_parts
):
    """kill -9 of a mount between a big file's manifest's configure-file-meta and its risk meta
    write leaves a token that is not marked as a manifest, at the file's place, stating the
    file's size. The next start compared its content (the manifest's bytes) with the staged
    file, found them different, and stored the file again: every mount then showed the file
    twice, one of them as a conflict copy (seen with three mounts, one killed mid-race), and
    the unmarked one read as a manifest only through the fallback for unmarked ones."""
    data = os.urandom(3 * PART + 9)
    async with inprocess_fs(tmp_path, *account, key=KEY) as t:
        fh, node = t.create_node(1, "big.bin")
        await t.fs.write(fh, 0, data)  # still open for writing: not uploaded
        store, source = stored_elsewhere(t, data)
        with manifest_marks_cut_off(store):  # the manifest's risk meta write is what the crash cut off
            token = await store.put(source, len(data), FileMeta("big.bin", "bin", "/", 0, "/big.bin"))
        info = [i async for i in t.client.tokens.list() if i.token == token][0]
        assert not info.risk and info.size == len(data)
        assert await t.syncer.adopt_orphan(node, info)
        assert node.token == token and fmt.MARK in node.remote_risk
        t.fs.release(fh)
        await t.wait_idle()
        info = [i async for i in t.client.tokens.list() if i.token == token][0]
        assert fmt.MARK in info.risk  # marked once the adopted node's meta is written
        assert [i.token async for i in t.client.tokens.list() if i.file_name == "big.bin"] == [token]
        assert await read_all(t, node) == data


async def test_the_sweep_never_collects_the_parts_of_a_store_still_in_flight_on_this_mount(
    account, tmp_path, small_parts
):
    """An upload slower than the collection age (a multi-GiB file on a slow link) has parts older
    than it before its manifest is stored: this mount's own sweep must leave them alone."""
    import trio

    async with inprocess_fs(tmp_path, *account, key=KEY) as t:
        data = os.urandom(3 * PART + 5)
        store = t.syncer.parts.store
        real, gate, reached = store.put_manifest, trio.Event(), trio.Event()

        async def held(*args, **kwargs):
            reached.set()
            await gate.wait()
            return await real(*args, **kwargs)

        store.put_manifest = held
        fh, node = t.create_node(1, "slow.bin")
        await t.fs.write(fh, 0, data)
        t.fs.release(fh)
        t.syncer.last_activity = float("-inf")
        with trio.fail_after(20):
            await reached.wait()  # every part is stored, the manifest not yet
        infos = [i async for i in t.client.tokens.list()]  # parts, no manifest yet
        assert len([i for i in infos if is_part(i)]) == 4
        assert await t.fs.parts.sweep(infos, min_age=0, interval=0) == 0
        await trio.sleep(2.1)  # the parts are now older than the age the sweeps below use
        gate.set()
        await t.wait_idle()
        # a listing taken before the manifest was stored, handed to the sweep after it was
        assert await t.fs.parts.sweep(infos, min_age=2, interval=0) == 0
        assert await read_all(t, node) == data


async def test_uploading_parts_holds_no_whole_part_in_memory(account, tmp_path, monkeypatch):
    # each part is read, digested and encrypted a piece at a time as it uploads (about 20 MiB
    # traced here); held whole (plaintext, ciphertext, the IV-prefixed copy) it took 80 MiB
    part = 8 * 2**20
    monkeypatch.setattr("privifs.fs.partwrite.PART_SIZE", part)
    data = os.urandom(4 * part)
    async with inprocess_fs(tmp_path, *account, key=KEY) as t:
        fh, node = t.create_node(1, "big.bin")
        await t.fs.write(fh, 0, data)
        tracemalloc.start()
        try:
            await t.fs.fsync(fh)  # four parts in flight at once
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        t.fs.release(fh)
        assert t.syncer.parts.parts_uploaded == 4
        assert peak < len(data), f"{peak / 2**20:.1f} MiB held while uploading {len(data) / 2**20:.0f} MiB"
        assert await read_all(t, node) == data


async def test_a_manifest_that_cannot_be_read_does_not_keep_every_retired_part(account, tmp_path, small_parts):
    """Another application's token marked as a manifest whose content is not one (or a damaged
    manifest) named no part it could be read for; it stopped every retirement of the mount, in
    any directory, and a rewritten big file's replaced parts stayed in the vault for good."""
    async with inprocess_fs(tmp_path, *account, key=KEY) as t:
        junk = await t.fs.vault.put_bytes(
            b"not a manifest", FileMeta("junk.bin", "bin", "/other", 14, "/other/junk.bin")
        )
        await t.client.tokens.set_risk(junk, {fmt.MARK: "1"})
        fh, node = t.create_node(1, "db.sqlite")
        await t.fs.write(fh, 0, os.urandom(8 * PART))
        await t.fs.fsync(fh)
        await t.fs.write(fh, 5 * PART + 100, b"commit")
        await t.fs.fsync(fh)
        t.fs.release(fh)
        await t.wait_idle()
        assert await t.syncer.retire_due(now=float("inf")) == 1


async def test_a_manifest_with_a_stale_digest_still_keeps_the_parts_it_names(account, tmp_path, small_parts):
    """A manifest that decodes but whose risk meta states another digest (its file reads EIO until
    repaired) still names its parts: retiring them would leave nothing to repair it from."""
    async with inprocess_fs(tmp_path, *account, key=KEY) as t:
        fh, node = t.create_node(1, "db.sqlite")
        await t.fs.write(fh, 0, os.urandom(8 * PART))
        await t.fs.fsync(fh)
        plain = await t.fs.vault.get_bytes(node.token)  # the first manifest, before it is replaced
        copy = await t.fs.vault.put_bytes(plain, FileMeta("copy.bin", "bin", "/other", 8 * PART, "/other/copy.bin"))
        await t.client.tokens.set_risk(copy, {fmt.MARK: "1", "privifs.digest": "00" * 32})
        await t.fs.write(fh, 5 * PART + 100, b"commit")
        await t.fs.fsync(fh)
        t.fs.release(fh)
        await t.wait_idle()
        assert await t.syncer.retire_due(now=float("inf")) == 0  # the copy names the replaced part


async def test_a_manifest_that_does_not_verify_stops_the_sweep_naming_itself_until_it_is_removed(
    account, tmp_path, small_parts
):
    """It may name any part, so no part is collected while it is in the vault; the error names
    the manifest and the command that removes it (the sweep's log line was all a user saw)."""
    async with inprocess_fs(tmp_path, *account, key=KEY) as t:
        junk = await t.fs.vault.put_bytes(
            b"not a manifest", FileMeta("junk.bin", "bin", "/other", 14, "/other/junk.bin")
        )
        await t.client.tokens.set_risk(junk, {fmt.MARK: "1"})
        await big_file(t, "gone.bin")
        await t.wait_idle()
        t.unlink_node(1, "gone.bin")
        await t.wait_idle()
        infos = [i async for i in t.client.tokens.list()]
        with pytest.raises(IntegrityError) as caught:
            await t.fs.parts.sweep(infos, min_age=0, interval=0)
        assert f"{junk} (/other/junk.bin)" in str(caught.value)
        assert f"privifs token rm {junk}" in str(caught.value)
        assert t.fs.parts.sweep_error == str(caught.value)  # what `privifs status` shows
        await t.client.tokens.delete(junk)
        infos = [i async for i in t.client.tokens.list()]
        assert await t.fs.parts.sweep(infos, min_age=0, interval=0) == 3
        assert t.fs.parts.sweep_error is None


async def test_a_manifest_deleted_while_the_sweep_reads_it_delays_the_sweep_to_the_next_listing(
    account, tmp_path, small_parts
):
    """Another client rewrote or removed its big file between the listing and the read of its
    manifest: nothing is collected then (the replacement may name the same parts), no warning,
    and the next listing's sweep collects (it failed, logged a warning and waited its interval)."""
    async with inprocess_fs(tmp_path, *account, key=KEY) as t:
        keep = await big_file(t, "kept.bin")
        await big_file(t, "gone.bin")
        await t.wait_idle()
        t.unlink_node(1, "gone.bin")
        await t.wait_idle()
        other = PartStore(t.fs.vault, part_size=PART)  # another client's big file

        async def source():
            yield os.urandom(PART) + b"\x01"  # (a random last byte was a hole, no part, 1 run in 256)

        foreign = await other.put(source, PART + 1, FileMeta("o.bin", "bin", "/other", PART + 1, "/other/o.bin"))
        infos = [i async for i in t.client.tokens.list()]
        await t.client.tokens.delete(foreign)  # its file removed over there, after this listing
        assert await t.fs.parts.sweep(infos, min_age=0, interval=0) == 0
        assert t.fs.parts.sweep_error is None
        infos = [i async for i in t.client.tokens.list()]
        # (its default interval: the one that went through is not waited out)
        assert await t.fs.parts.sweep(infos, min_age=0) == 5  # gone.bin's 3, the foreign file's 2
        await assert_only_parts_of(t, keep)


async def test_a_store_that_failed_part_way_goes_on_where_it_stopped(account, tmp_path, small_parts, monkeypatch):
    """A full engine disk, say: the retry uploads only what the failed attempt did not (each
    retry stored every part again beside the last attempt's, which only the hourly sweep
    removed), and the file reads back whole."""
    finished, failed = part_5_fails_once(monkeypatch)
    async with inprocess_fs(tmp_path, *account, key=KEY) as t:
        node, data = await big_file_stored(t)
        assert failed and t.syncer.parts.parts_uploaded == 8  # 12 or 13 when every part went again
        manifests, parts = await vault_state(t)
        named = (await PartStore(t.fs.vault).manifest(node.token)).tokens()
        assert [i.token for i in manifests] == [node.token] and set(named) <= {i.token for i in parts}
        assert await read_all(t, node) == data
        assert not t.syncer.parts.reader.in_flight  # nothing is kept from the sweep for good


def test_a_failed_stores_parts_are_kept_from_the_sweep_only_while_young(monkeypatch):
    """Another mount's sweep takes a part no manifest names once it is an hour old: an offered
    part older than REUSE_AGE is let go (to this mount's sweep too), even if its file never
    comes back to be stored."""
    in_flight: set[str] = set()
    unfinished = Unfinished(in_flight)
    part = fmt.Part("dtk-part-1", PART, bytes(32))
    unfinished.keep("staged-1", {}, {0: part})
    assert in_flight == {"dtk-part-1"}
    unfinished.let_go_old()
    assert in_flight == {"dtk-part-1"}  # young: still offered
    monkeypatch.setattr("privifs.fs.partwrite.REUSE_AGE", -1.0)
    unfinished.let_go_old()
    assert in_flight == set() and unfinished.take("staged-1") == {}


async def test_another_applications_token_in_the_parts_context_is_no_part_and_no_sweep_deletes_it(
    account, tmp_path, small_parts
):
    async with inprocess_fs(tmp_path, *account, key=KEY) as t:
        stranger = await t.fs.vault.put_bytes(
            b"not ours", FileMeta("notes.txt", "txt", fmt.PARTS_CONTEXT, 8, f"{fmt.PARTS_CONTEXT}/notes.txt")
        )
        await big_file(t, "gone.bin")
        await t.wait_idle()
        t.unlink_node(1, "gone.bin")
        await t.wait_idle()
        infos = [i async for i in t.client.tokens.list()]
        assert await t.fs.parts.sweep(infos, min_age=0, interval=0) == 3  # the deleted file's parts only
        assert await t.fs.vault.get_bytes(stranger) == b"not ours"
        assert await PartStore(t.fs.vault).collect(min_age=0) == 0
        assert await t.fs.vault.get_bytes(stranger) == b"not ours"


async def test_a_retry_after_the_file_changed_stores_the_change_and_retires_the_failed_attempts_part(
    account, tmp_path, small_parts, monkeypatch
):
    """A new big file's store failed after 4 parts; the file was written again in one of them
    before the retry. The retry keeps the 3 unchanged parts, stores the changed one anew, the
    file reads back as last written, and the failed attempt's changed part is retired like a
    rewrite's (it was left to the hourly sweep: a new file replaces no manifest, whose going
    retires stale parts)."""
    real = PartStore.put_part_from
    finished, failed = [], []
    four_done, failed_now, go_on = trio.Event(), trio.Event(), trio.Event()

    storing = 0  # parts in the server's hands now

    async def full_disk_once(self, upload_id, index, size, read):
        nonlocal storing
        if index == 5 and not failed:
            failed.append(index)
            await four_done.wait()
            while storing:  # a part the failure cut off mid-store would be the server's, unrecorded
                await trio.sleep(0.01)
            failed_now.set()
            raise ServerError("507 Insufficient Storage: the server's disk is full")
        if failed:
            await go_on.wait()
        storing += 1
        try:
            part = await real(self, upload_id, index, size, read)
        finally:
            storing -= 1
        finished.append(index)
        if len(finished) >= 4:
            four_done.set()
        return part

    monkeypatch.setattr(PartStore, "put_part_from", full_disk_once)
    async with inprocess_fs(tmp_path, *account, key=KEY) as t:
        data = bytearray(os.urandom(8 * PART))
        fh, node = t.create_node(1, "big.bin")
        await t.fs.write(fh, 0, bytes(data))
        t.fs.release(fh)
        with trio.fail_after(30):
            await failed_now.wait()
            while node.uploading:
                await trio.sleep(0.01)
        offered = t.syncer.parts.unfinished._parts.get(node.staged.id, {})
        changed = min(offered)  # a part the failed attempt uploaded
        new = os.urandom(PART)
        fh = (await t.fs.open(node.ino, os.O_RDWR)).fh
        await t.fs.write(fh, changed * PART, new)
        t.fs.release(fh)
        data[changed * PART : (changed + 1) * PART] = new
        go_on.set()
        await t.wait_idle()
        assert t.syncer.parts.parts_kept == len(offered) - 1
        assert await t.syncer.retire_due(now=float("inf")) == 1  # the failed attempt's changed part
        await t.wait_idle()
        infos = [i async for i in t.client.tokens.list()]
        assert await t.fs.parts.sweep(infos, min_age=0, interval=0) == 0  # nothing left behind
        manifests, parts = await vault_state(t)
        named = (await PartStore(t.fs.vault).manifest(node.token)).tokens()
        assert [i.token for i in manifests] == [node.token] and set(named) == {i.token for i in parts}
        t.fs.cache.evict(node.token)
        assert await read_all(t, node) == bytes(data)
        assert not t.syncer.parts.reader.in_flight


async def test_a_part_kept_from_a_failed_store_that_another_mount_swept_is_stored_again(
    account, tmp_path, small_parts, monkeypatch
):
    """Another mount's sweep takes a part no manifest names once it is an hour old: a retry that
    came late would have named a part gone from the vault (EIO for every reader)."""

    async def swept(store) -> None:
        await store.tokens.delete(finished[0])  # another mount's sweep, an hour later

    finished, failed = part_5_fails_once(monkeypatch, before=swept)
    async with inprocess_fs(tmp_path, *account, key=KEY) as t:
        node, data = await big_file_stored(t)
        assert failed and t.syncer.parts.parts_uploaded == 9  # the swept one again
        named = (await PartStore(t.fs.vault).manifest(node.token)).tokens()
        assert finished[0] not in named
        t.fs.cache.evict(node.token)
        assert await read_all(t, node) == data


def part_5_fails_once(monkeypatch, before=None) -> tuple[list[str], list[int]]:
    """Storing part 5 fails once, as on a full engine disk, after parts 0-3 were stored (and
    after ``before(store)``, if given); returns the tokens of the parts stored and the failure."""
    real = PartStore.put_part_from
    finished: list[str] = []
    failed: list[int] = []
    four_done = trio.Event()

    async def full_disk_once(self, upload_id, index, size, read):
        if index == 5 and not failed:
            failed.append(index)
            await four_done.wait()
            if before is not None:
                await before(self)
            raise ServerError("507 Insufficient Storage: the server's disk is full")
        part = await real(self, upload_id, index, size, read)
        finished.append(part.token)
        if len(finished) >= 4:
            four_done.set()
        return part

    monkeypatch.setattr(PartStore, "put_part_from", full_disk_once)
    return finished, failed


async def big_file_stored(t):
    """An 8-part file written, closed and stored (through retries): its node and content."""
    data = os.urandom(8 * PART)
    fh, node = t.create_node(1, "big.bin")
    await t.fs.write(fh, 0, data)
    t.fs.release(fh)
    await t.wait_idle()
    return node, data


async def test_a_failed_stores_parts_go_a_minute_after_its_file_is_removed(account, tmp_path, small_parts, monkeypatch):
    """The engine's disk is full (it shares a small disk with the mount's home, say): a big
    file's store fails after four parts, and the user removes the file to make room. Those parts
    are named by no manifest and no other store will want them: they are retired like a
    rewrite's stale parts, not left for half an hour and then to the hour-old sweep (seen: 31
    parts, 124 MiB of a 300 MiB disk, kept every other upload failing with 507 meanwhile)."""
    monkeypatch.setattr("privifs.fs.sync.RETIRE_CHECK", 0.05)
    real = PartStore.put_part_from
    failed: list[int] = []
    finished: list[str] = []
    four_done = trio.Event()
    storing = 0  # parts in the server's hands now

    async def disk_full(self, upload_id, index, size, read):
        nonlocal storing
        if failed or index >= 4:
            if not failed:
                await four_done.wait()
                while storing:  # a part the failure cut off mid-store would be the server's, unrecorded
                    await trio.sleep(0.01)
                failed.append(index)
            raise ServerError("507 Insufficient Storage: the server's disk is full")
        storing += 1
        try:
            part = await real(self, upload_id, index, size, read)
        finally:
            storing -= 1
        finished.append(part.token)
        if len(finished) == 4:
            four_done.set()
        return part

    monkeypatch.setattr(PartStore, "put_part_from", disk_full)
    async with inprocess_fs(tmp_path, *account, key=KEY) as t:
        t.syncer.retire_grace = 0.1
        fh, node = t.create_node(1, "big.bin")
        await t.fs.write(fh, 0, os.urandom(8 * PART))
        t.fs.release(fh)
        with trio.fail_after(30):
            while not failed or node.uploading:
                await trio.sleep(0.01)
        _, parts = await vault_state(t)
        assert sorted(i.token for i in parts) == sorted(finished)
        t.unlink_node(1, "big.bin")
        await t.wait_idle()
        with trio.fail_after(20):
            while (await vault_state(t))[1]:
                await trio.sleep(0.05)
        assert not t.syncer.parts.reader.in_flight


async def test_a_kept_part_deleted_from_the_vault_is_stored_again_by_the_next_change(account, tmp_path, small_parts):
    """A part of a big file is deleted from the vault (by hand, by another client) while its
    manifest stays. The next small change kept that part's token (its content did not change):
    fsync returned 0 while the new manifest named a part the vault no longer had, and the file
    read EIO on every other machine, and here once the cache let it go. The listing shows the
    part gone; the store asks for it by id and uploads it again from the staged file."""
    async with inprocess_fs(tmp_path, *account, key=KEY) as t:
        data = bytearray(os.urandom(3 * PART))
        fh, node = t.create_node(1, "big.bin")
        await t.fs.write(fh, 0, bytes(data))
        await t.fs.fsync(fh)
        old = await PartStore(t.fs.vault).manifest(node.token)
        await t.client.tokens.delete(old.parts[2].token)  # part 2 deleted elsewhere
        await t.refresh()
        await t.fs.write(fh, 10, b"changed")  # part 0 changes, part 2 does not
        data[10:17] = b"changed"
        await t.fs.fsync(fh)
        t.fs.release(fh)
        await t.wait_idle()
        new = await PartStore(t.fs.vault).manifest(node.token)
        assert new.parts[1].token == old.parts[1].token  # kept: it is still there
        assert new.parts[2].token != old.parts[2].token
        t.fs.cache.evict(node.token)
        assert await read_all(t, node) == bytes(data)


async def test_parts_a_rewrite_retired_are_deleted_by_the_next_start_after_a_stop(account, tmp_path, small_parts):
    """A rewrite's stale parts wait out a minute's grace; a mount stopped before then (an
    unmount, a kill -9) forgot them, and they held the engine's disk until some mount's hourly
    sweep (seen: 10 small commits to a 20 MiB file, then 'privifs umount': 10 more parts of no
    file in 'privifs verify --data'; a SQLite database retires two parts per commit). The
    index records them; the next start deletes them once their grace is over."""
    data = bytearray(os.urandom(4 * PART))
    async with inprocess_fs(tmp_path, *account, key=KEY) as t:
        fh, node = t.create_node(1, "db.sqlite")
        await t.fs.write(fh, 0, bytes(data))
        await t.fs.fsync(fh)
        old = await PartStore(t.fs.vault).manifest(node.token)
        await t.fs.write(fh, PART + 5, b"commit")
        await t.fs.fsync(fh)
        t.fs.release(fh)
        await t.wait_idle()
        new = await PartStore(t.fs.vault).manifest(node.token)
    async with inprocess_fs(tmp_path, *account, key=KEY) as t:
        with trio.fail_after(10):
            while await t.syncer.retire_due(now=float("inf")) == 0:  # (the start loads them first)
                await trio.sleep(0.05)
        await t.wait_idle()
        _, parts = await vault_state(t)
        assert sorted(i.token for i in parts) == sorted(p.token for p in new.parts)
        assert old.parts[1].token not in {i.token for i in parts}
        assert t.fs.index.retired() == []


async def test_a_conflict_copys_manifest_whose_download_answered_404_on_its_way_still_keeps_its_parts(
    account, tmp_path, small_parts
):
    """A rewrite retires the parts its old manifest named unless another manifest names them (a
    conflict copy). When that copy's download answered 404 on its way (a proxy), the copy was
    taken for deleted, named nothing, and its parts were deleted: the copy read EIO on every
    mount. A 404 for a manifest the vault still lists makes the retirement wait for its next
    round."""
    from tests.enginekit import proxied_api

    endpoints, creds = account
    armed = {"404": 0}

    def mangle(path: str, status: int, body: bytes) -> tuple[int, bytes]:
        if armed["404"] and path.startswith("/data-token/request-data"):
            armed["404"] -= 1
            return 404, b'{"message": "not found"}'
        return status, body

    async with proxied_api(endpoints, mangle) as proxied:
        async with inprocess_fs(tmp_path, proxied, creds, key=KEY) as t:
            fh, node = t.create_node(1, "db.sqlite")
            await t.fs.write(fh, 0, os.urandom(8 * PART))
            await t.fs.fsync(fh)
            first = await t.client.tokens.list(token=node.token).__anext__()
            plain = await t.fs.vault.get_bytes(node.token)  # the first manifest: a copy of it names its parts
            copy = await t.fs.vault.put_bytes(plain, FileMeta("copy.bin", "bin", "/other", 8 * PART, "/other/copy.bin"))
            await t.client.tokens.set_risk(copy, dict(first.risk))
            await t.fs.write(fh, 5 * PART + 100, b"commit")
            await t.fs.fsync(fh)
            t.fs.release(fh)
            await t.wait_idle()
            armed["404"] = 4  # every download of both listings' manifests (the file's own and the copy)
            assert await t.syncer.retire_due(now=float("inf")) == 0
            armed["404"] = 0
            assert await t.syncer.retire_due(now=float("inf")) == 0  # the copy names the replaced part


async def test_retired_parts_whose_deletion_cannot_be_recorded_wait_for_the_next_round(kit, monkeypatch):
    """On a full disk the index could not record a retired part's deletion: the DiskFullError
    ended the 'retired parts' task as an unexpected failure (a bug in `privifs status`) and the
    round's parts left its memory. They stay retired for the next round now."""
    from privifs.errors import DiskFullError

    kit.syncer.retire_parts(fmt.PARTS_CONTEXT, ["part-a", "part-b"])
    add_tombstone = kit.syncer.index.add_tombstone

    async def listed_as_parts():  # (the vault's listing: no manifest names them; both are parts)
        return set(), {"part-a", "part-b"}

    monkeypatch.setattr(kit.syncer, "_named_in_the_vault", listed_as_parts)

    def full(token: str) -> None:
        raise DiskFullError("no space left on the device holding the index")

    monkeypatch.setattr(kit.syncer.index, "add_tombstone", full)
    assert await kit.syncer.retire_due(now=float("inf")) == 0
    assert sorted(r[2] for r in kit.syncer._retired) == ["part-a", "part-b"]
    monkeypatch.setattr(kit.syncer.index, "add_tombstone", add_tombstone)
    assert await kit.syncer.retire_due(now=float("inf")) == 2
    assert kit.syncer._retired == [] and {"part-a", "part-b"} <= set(kit.syncer.index.tombstones())


async def forged_manifest_naming(t, victim, name: str) -> str:
    """Another application with the key stores a valid manifest at ``name`` whose one part is
    the ordinary file ``victim``'s token: its file reads as ``victim``'s bytes."""
    data = await read_all(t, victim)
    part = fmt.Part(victim.token, len(data), fmt.part_digest(fmt.part_key(KEY), 0, data))
    forged = await PartStore(t.fs.vault).put_manifest(
        fmt.Manifest(len(data), len(data), (part,)), FileMeta(name, "bin", "/", 0, f"/{name}")
    )
    await t.refresher.refresh_once()
    assert await read_all(t, t.node(f"/{name}")) == data
    return forged


async def test_removing_a_file_whose_manifest_names_an_ordinary_file_keeps_that_file(account, tmp_path, small_parts):
    """A manifest can name any token: one another application wrote, naming an ordinary file as
    its part, had that file deleted from the vault a minute after its own file was removed
    (helper hAG F1). Only parts privifs stored are retired with a manifest."""
    async with inprocess_fs(tmp_path, *account, key=KEY) as t:
        await t.write_file("/precious.txt", b"years of work")
        await t.wait_idle()
        victim = t.node("/precious.txt")
        await forged_manifest_naming(t, victim, "alias.bin")
        t.unlink_node(1, "alias.bin")
        await t.wait_idle()
        assert await t.syncer.retire_due(now=float("inf")) == 0
        await t.wait_idle()
        assert victim.token in {i.token async for i in t.client.tokens.list()}
        assert await read_all(t, victim) == b"years of work"


async def test_token_rm_of_a_manifest_deletes_only_its_own_parts_no_other_manifest_names(
    account, tmp_path, small_parts
):
    """``privifs token rm`` of a manifest deleted every token it named at once: an ordinary file
    a forged one named (helper hAG F1), and the parts a copy of the manifest still named."""
    async with inprocess_fs(tmp_path, *account, key=KEY) as t:
        await t.write_file("/precious.txt", b"years of work")
        big = await big_file(t, "big.bin")
        await t.wait_idle()
        victim = t.node("/precious.txt")
        store = PartStore(t.fs.vault)
        forged = await forged_manifest_naming(t, victim, "alias.bin")
        await store.delete(forged, await store.manifest(forged))
        assert victim.token in {i.token async for i in t.client.tokens.list()}
        m = await store.manifest(big.token)
        copy = await store.put_manifest(m, FileMeta("copy.bin", "bin", "/", 0, "/copy.bin"))
        await store.delete(big.token, m)
        _, parts = await vault_state(t)
        assert {p.token for p in m.parts} == {i.token for i in parts}  # the copy still names them
        await store.delete(copy, m)
        assert await vault_state(t) == ([], [])

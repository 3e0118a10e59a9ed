"""Two clients of one vault in-process (two kernel-less filesystems over one profile and key,
each with its own state), so races between them are written step by step and run in seconds."""

from __future__ import annotations

import os
import secrets
from contextlib import asynccontextmanager

import pytest
import trio

from privifs.errors import CommandRejected, NotFoundError, TokenMissing, rejected_command
from privifs.fs.names import conflict_name
from privifs.fs.refresh import (
    EVENT_LISTING_SHARE,
    EVENT_MIN_GAP,
    FULL_LISTING_SHARE,
    ListingCost,
    event_gap,
    full_gap,
)
from privifs.fs.sync import RENAME_FETCH_LIMIT, RENAME_SEEN_AFTER
from tests.fskit import inprocess_fs, manifest_marks_cut_off


@asynccontextmanager
async def two_clients(tmp_path, account, *, xattrs: bool = False):
    key = secrets.token_bytes(32)
    (tmp_path / "a").mkdir(parents=True)
    (tmp_path / "b").mkdir(parents=True)
    async with inprocess_fs(tmp_path / "a", *account, key=key, xattrs=xattrs) as a:
        async with inprocess_fs(tmp_path / "b", *account, key=key, xattrs=xattrs) as b:
            yield a, b


async def listed(*clients) -> None:
    for c in clients:
        await c.wait_idle()
    for c in clients:
        await c.refresher.refresh_once()


async def big_file(c, size: int) -> bytes:
    """``/big`` made on ``c`` with ``size`` random bytes (stored as parts); its content."""
    data = os.urandom(size)
    fh, _ = c.create_node(1, "big")
    await c.fs.write(fh, 0, data)
    c.fs.release(fh)
    return data


async def big_file_both_see(a, b, size: int) -> bytes:
    """``/big`` made on ``a``, once both clients list it; its content."""
    data = await big_file(a, size)
    await listed(a, b)
    return data


async def edit(c, offset: int, data: bytes) -> None:
    """Write ``data`` at ``offset`` of ``/big`` on ``c``, and close it."""
    fh = await c.open_node(c.node("/big"))
    await c.fs.write(fh, offset, data)
    c.fs.release(fh)


async def test_rmdir_of_a_directory_both_clients_made_removes_it_everywhere(account, tmp_path):
    for remover in (0, 1):
        async with two_clients(tmp_path / str(remover), account) as (a, b):
            a.mkdir_node(1, "d")
            b.mkdir_node(1, "d")
            await listed(a, b)
            markers = [i async for i in a.client.tokens.list() if i.file_name == "d"]
            assert len(markers) == 2  # one marker token per mkdir
            assert "d" in a.ns.root.children and "d" in b.ns.root.children
            who = (a, b)[remover]
            who.fs.rmdir(1, b"d")
            await listed(a, b)
            await listed(a, b)
            assert "d" not in a.ns.root.children, "the directory came back on A"
            assert "d" not in b.ns.root.children, "the directory came back on B"
            assert [i async for i in a.client.tokens.list() if i.file_name == "d"] == []


async def test_rename_of_a_directory_both_clients_made_leaves_no_directory_at_the_old_name(account, tmp_path):
    async with two_clients(tmp_path, account) as (a, b):
        a.mkdir_node(1, "d")
        b.mkdir_node(1, "d")
        await listed(a, b)
        a.fs.rename(1, b"d", 1, b"e", 0)
        await listed(a, b)
        await listed(a, b)
        for who, c in (("A", a), ("B", b)):
            assert sorted(c.ns.root.children) == ["e"], f"{who} shows {sorted(c.ns.root.children)}"
        assert sorted([i.file_name async for i in a.client.tokens.list() if i.file_name in ("d", "e")]) == ["e"]


async def test_a_command_refused_because_the_token_is_gone_is_token_missing(eng, account, tmp_path):
    # what a server answers when the token went between accepting the command and applying it:
    # status 3 with the reason key data_token.not_found; the key picks the type (REFUSAL_REASONS)
    async with inprocess_fs(tmp_path, *account) as a:
        fh, f = a.create_node(1, "f")
        await a.fs.write(fh, 0, b"content")
        a.fs.release(fh)
        await a.wait_idle()
        try:
            eng.set_options(
                reject="update-data-token,configure-information-security-risk-meta",
                reject_reason="data_token.not_found",
            )
            with pytest.raises(TokenMissing) as caught:
                await a.client.tokens.update(f.token, file_name="g")
            assert isinstance(caught.value, NotFoundError) and caught.value.reason == "data_token.not_found"
            with pytest.raises(TokenMissing):
                await a.client.tokens.set_risk(f.token, {"mode": "644"})
        finally:
            eng.set_options(reject="")


def test_only_the_reason_key_decides_a_rejections_type():
    assert type(rejected_command("x", command_id="c", reason="data_token.not_found")) is TokenMissing
    assert type(rejected_command("x", command_id="c", reason="the token was not found")) is CommandRejected


@pytest.mark.parametrize("written_by", ["renamer", "other"])  # the renamer has it cached, or not
async def test_a_rename_that_lands_between_the_replacing_writers_check_and_delete_keeps_its_version(
    account, tmp_path, written_by
):
    # B replaces e.txt's content; its write-back checks that the replaced token did not move, then
    # deletes it. A's rename e.txt -> e2.txt reaches the vault exactly between the two requests
    async with two_clients(tmp_path, account) as (a, b):
        original = b"original version"
        writer = a if written_by == "renamer" else b
        fh, _ = writer.create_node(1, "e.txt")
        await writer.fs.write(fh, 0, original)
        writer.fs.release(fh)
        await listed(a, b)
        await listed(a, b)
        real_check = b.syncer._moved_elsewhere

        async def check_then_rename_elsewhere(token, seen_at, *ours):
            moved = await real_check(token, seen_at, *ours)
            a.fs.rename(1, b"e.txt", 1, b"e2.txt", 0)
            await a.wait_idle()  # A's rename is in the vault now; B goes on to delete
            return moved

        b.syncer._moved_elsewhere = check_then_rename_elsewhere
        fh = await b.open_node(b.node("e.txt"))
        await b.truncate(fh, 0)
        await b.fs.write(fh, 0, b"B's version")
        b.fs.release(fh)
        await b.wait_idle()
        for _ in range(3):
            await listed(a, b)
        for who, c in (("A", a), ("B", b)):
            assert sorted(c.ns.root.children) == ["e.txt", "e2.txt"], f"{who} shows {sorted(c.ns.root.children)}"
        assert await a.vault_names() == {"e.txt": len(b"B's version"), "e2.txt": len(original)}
        for c in (a, b):
            sealed = await c.fs.content(c.node("e2.txt"))
            try:
                assert sealed.read(0, 100) == original
            finally:
                sealed.close()


def test_listings_for_other_clients_changes_are_spaced_by_what_the_last_one_cost():
    assert event_gap(0.01) == EVENT_MIN_GAP  # a small vault: as often as twice a second
    assert event_gap(0.5) == pytest.approx(0.5 * (1 / EVENT_LISTING_SHARE - 1))
    # whatever a listing costs, listings for events take at most EVENT_LISTING_SHARE of the time
    for cost in (0.1, 0.4, 2.0, 10.0):
        assert cost / (cost + event_gap(cost)) <= EVENT_LISTING_SHARE + 1e-9


def test_the_safety_net_listing_of_a_huge_vault_is_spaced_by_what_the_last_one_cost():
    assert full_gap(30.0, 0.5) == 30.0  # the --refresh-interval, for any vault listed in 1.5 s or less
    for cost in (2.0, 12.0, 60.0):  # listing every 30 s would take 6 %, 29 %, 67 % of the time
        assert cost / (cost + full_gap(30.0, cost)) <= FULL_LISTING_SHARE + 1e-9


def test_status_says_how_often_a_huge_vault_is_really_listed_not_the_interval_asked_for():
    """On a vault of 120,000 tokens status said 'every 30s' while the safety-net listing ran
    about every 230 s (helper hAF F2)."""
    from privifs.cli.status_cmd import _refresh_every

    assert _refresh_every({"refresh_interval": 30.0, "refresh_every": 30.0, "listing_seconds": 0.4}) == "every 30s"
    assert _refresh_every({"refresh_interval": 30.0}) == "every 30s"  # (a daemon before this says no more)
    every = full_gap(30.0, 12.0)
    line = _refresh_every({"refresh_interval": 30.0, "refresh_every": every, "listing_seconds": 12.0})
    assert line.startswith(f"every {every:.0f}s (listing this vault takes 12.0s; --refresh-interval 30s;"), line


def test_a_stalled_or_failed_listing_does_not_space_the_next_ones_as_for_a_huge_vault():
    """One listing the server held for 45 s made the next safety-net listing about 14 minutes
    later (helper hM3); what listing costs is the quickest of the last few that succeeded."""
    cost = ListingCost()
    assert cost.seconds == 0.0
    for seconds in (0.2, 45.0):
        cost.listed(seconds)
    assert cost.seconds == 0.2 and full_gap(30.0, cost.seconds) == 30.0
    for seconds in (12.0, 12.5, 13.0):  # a vault that is really big is slow every time
        cost.listed(seconds)
    assert cost.seconds == 12.0 and full_gap(30.0, cost.seconds) > 30.0


async def test_an_edit_made_after_seeing_a_rename_replaces_the_renamed_version_without_a_copy(account, tmp_path):
    # A renames e.txt -> e2.txt and makes a new e.txt; B, having seen that, rewrites e2.txt:
    # its delete of the version it replaced is no race, so A keeps no copy of that version
    async with two_clients(tmp_path, account) as (a, b):
        fh, _ = a.create_node(1, "e.txt")
        await a.fs.write(fh, 0, b"first")
        a.fs.release(fh)
        await listed(a, b)
        a.fs.rename(1, b"e.txt", 1, b"e2.txt", 0)
        fh, _ = a.create_node(1, "e.txt")
        await a.fs.write(fh, 0, b"new e")
        a.fs.release(fh)
        await listed(a, b)
        fh = await b.open_node(b.node("e2.txt"))
        await b.truncate(fh, 0)
        await b.fs.write(fh, 0, b"B's edit of e2")
        b.fs.release(fh)
        for _ in range(3):
            await listed(a, b)
        for who, c in (("A", a), ("B", b)):
            assert sorted(c.ns.root.children) == ["e.txt", "e2.txt"], f"{who} shows {sorted(c.ns.root.children)}"
        assert await a.vault_names() == {"e.txt": 5, "e2.txt": len(b"B's edit of e2")}


def tree_of(c) -> dict[str, str]:
    """Every path of an in-process client's tree and its kind."""
    out: dict[str, str] = {}

    def walk(node, path: str) -> None:
        for name, ino in sorted(node.children.items()):
            child = c.ns.nodes[ino]
            out[f"{path}/{name}"] = "dir" if child.is_dir else "file"
            if child.is_dir:
                walk(child, f"{path}/{name}")

    walk(c.ns.root, "")
    return out


async def fresh_tree(tmp_path, account, key: bytes) -> dict[str, str]:
    """What a client with no local state shows (its tree comes from the listing only)."""
    (tmp_path / "fresh").mkdir(parents=True)
    async with inprocess_fs(tmp_path / "fresh", *account, key=key) as f:
        await f.refresher.refresh_once()
        return tree_of(f)


async def converged(tmp_path, account, expected: dict[str, str], *clients) -> None:
    """After two listings on every client, each shows ``expected``, as a client with no local
    state does (the first client's key reads the vault)."""
    for _ in range(2):
        await listed(*clients)
    fresh = await fresh_tree(tmp_path, account, clients[0].key)
    assert fresh == expected
    for c in clients:
        assert tree_of(c) == fresh


async def files_on_a_fresh_mount(tmp_path, account, key: bytes) -> dict[str, bytes]:
    """The root's files and their content as a fresh mount of the vault reads them."""
    (tmp_path / "fresh").mkdir()
    async with inprocess_fs(tmp_path / "fresh", *account, key=key) as f:
        await f.refresher.refresh_once()
        return {n: await f.read_file(f"/{n}") for n in sorted(f.ns.root.children)}


async def test_a_directory_renamed_over_one_another_client_filled_ends_as_on_a_fresh_mount(account, tmp_path):
    # B puts g into s2; A, not seeing it, renames s1 over its (to A) empty s2: the vault has
    # s1's marker at s2 and g inside. B placed the moved marker under a conflict name while its
    # s2 still had a marker, and kept it there after s2 lost it (two directories; A and a fresh
    # mount show one)
    async with two_clients(tmp_path, account) as (a, b):
        x = a.mkdir_node(1, "x")
        a.mkdir_node(x, "s1")
        a.mkdir_node(x, "s2")
        await listed(a, b)
        fh, _ = b.create_node(b.node("/x/s2"), "g")
        await b.fs.write(fh, 0, b"g")
        b.fs.release(fh)
        await b.wait_idle()
        a.fs.rename(x.ino, b"s1", x.ino, b"s2", 0)
        for _ in range(2):
            await listed(a, b)
        want = {"/x": "dir", "/x/s2": "dir", "/x/s2/g": "file"}
        assert tree_of(a) == want
        assert tree_of(b) == want
        assert await fresh_tree(tmp_path, account, a.key) == want


async def test_a_directory_renamed_onto_a_name_another_client_just_took_ends_as_on_a_fresh_mount(account, tmp_path):
    # A renames y → x while B makes a directory x (then, in a second round, a file x): B showed
    # the renamed directory under a conflict name for good; a fresh mount shows one directory x
    # (two markers) and, against a file, the directory under the plain name and the file aside
    for kind in ("dir", "file"):
        async with two_clients(tmp_path / kind, account) as (a, b):
            a.mkdir_node(1, "y")
            await listed(a, b)
            if kind == "dir":
                b.mkdir_node(1, "x")
            else:
                fh, _ = b.create_node(1, "x")
                await b.fs.write(fh, 0, b"file x")
                b.fs.release(fh)
            a.fs.rename(1, b"y", 1, b"x", 0)
            for _ in range(2):
                await listed(a, b)
            fresh = await fresh_tree(tmp_path / kind, account, a.key)
            assert fresh["/x"] == "dir" and len(fresh) == (1 if kind == "dir" else 2), fresh
            assert tree_of(a) == fresh
            assert tree_of(b) == fresh
            # and an rmdir on B removes the directory everywhere (both markers; a file aside
            # takes the plain name back)
            b.fs.rmdir(1, b"x")
            for _ in range(2):
                await listed(a, b)
            fresh = await fresh_tree(tmp_path / kind / "again", account, a.key)
            assert "dir" not in fresh.values() and len(fresh) == (0 if kind == "dir" else 1), fresh
            assert tree_of(a) == fresh
            assert tree_of(b) == fresh


@pytest.mark.parametrize("older", ["file", "dir"])
async def test_a_file_and_an_implicit_directory_of_one_name_show_as_on_a_fresh_mount(account, tmp_path, older):
    # B removes d and renames its file g to d; A, not seeing it, writes d/f: the vault has a
    # file d and a file f in /d with no marker. A fresh mount shows whichever claimed the name
    # first under it: the file (the directory as d.dir) or the directory (the file aside).
    # Each mount kept what its history gave: A the directory d, B the file d
    async with two_clients(tmp_path, account) as (a, b):
        a.mkdir_node(1, "d")
        await listed(a, b)
        b.fs.rmdir(1, b"d")
        made = []
        for who in ("g", "f") if older == "file" else ("f", "g"):
            if made:
                await trio.sleep(1.1)  # createdAt has whole seconds: a claim order to test
            c, parent = (b, 1) if who == "g" else (a, a.node("/d"))
            fh, _ = c.create_node(parent, who)
            await c.fs.write(fh, 0, who.encode())
            c.fs.release(fh)
            await c.wait_idle()
            made.append(who)
        b.fs.rename(1, b"g", 1, b"d", 0)
        await b.wait_idle()
        for _ in range(2):
            await listed(a, b)
        fresh = await fresh_tree(tmp_path, account, a.key)
        assert fresh["/d"] == older, fresh
        assert tree_of(a) == fresh
        assert tree_of(b) == fresh


async def test_two_clients_rewriting_different_parts_of_one_big_file_both_keep_a_readable_version(account, tmp_path):
    # A rewrites the third part of a big file, B (not seeing it) the first: each new manifest
    # reuses the old manifest's other parts. Each writer deleted the old parts its own manifest
    # no longer named, which the other's manifest still named: a closed version gave EIO. Now
    # they are deleted after a grace, and not when another client's manifest names them (and
    # the writer that finds the old manifest gone stores the parts it kept from it again: see
    # test_a_version_based_on_a_manifest_another_client_replaced_keeps_none_of_its_parts)
    mib = 1 << 20
    async with two_clients(tmp_path, account) as (a, b):
        data = await big_file_both_see(a, b, 10 * mib)
        assert await b.read_file("/big") == data
        await edit(a, 8 * mib + 5, b"A" * 1000)
        await edit(b, 5, b"B" * 1000)
        await a.wait_idle()
        await b.wait_idle()
        retired = [await c.syncer.retire_due(now=float("inf")) for c in (a, b)]
        assert sum(retired) >= 1  # the old third part, which neither manifest names now
        for _ in range(2):
            await listed(a, b)
        want = {data[:5] + b"B" * 1000 + data[1005:], data[: 8 * mib + 5] + b"A" * 1000 + data[8 * mib + 1005 :]}
        files = await files_on_a_fresh_mount(tmp_path, account, a.key)
        assert len(files) == 2, sorted(files)  # the file and its conflict copy
        assert set(files.values()) == want


async def test_a_version_stored_after_the_other_client_deleted_the_parts_it_kept_is_stored_whole(account, tmp_path):
    # B edits the first part of a big file and keeps it open; meanwhile A rewrites the third
    # part, and a minute later (no manifest naming it yet) deletes the old third part. B's
    # manifest, stored when it closes, kept that part's token: B's fsynced version was EIO on
    # every other machine. Now B sees the version it replaced was deleted, finds the part gone
    # and stores every part again
    mib = 1 << 20
    async with two_clients(tmp_path, account) as (a, b):
        data = await big_file_both_see(a, b, 10 * mib)
        fb = await b.open_node(b.node("/big"))
        await b.fs.write(fb, 5, b"B" * 1000)  # B holds the file open
        await edit(a, 8 * mib + 5, b"A" * 1000)
        await a.wait_idle()
        assert await a.syncer.retire_due(now=float("inf")) == 1  # no manifest names the old part yet
        await a.wait_idle()
        b.fs.release(fb)
        await b.wait_idle()
        for _ in range(2):
            await listed(a, b)
        want = {data[:5] + b"B" * 1000 + data[1005:], data[: 8 * mib + 5] + b"A" * 1000 + data[8 * mib + 1005 :]}
        files = await files_on_a_fresh_mount(tmp_path, account, a.key)
        assert len(files) == 2, sorted(files)  # the file and its conflict copy
        assert set(files.values()) == want


async def test_a_version_based_on_a_manifest_another_client_replaced_keeps_none_of_its_parts(account, tmp_path):
    # B edits the first part of a big file and keeps it open; A rewrites the whole file, which
    # retires every part of the manifest both had (deleted a minute later unless a manifest
    # A's listing shows then names them). B's manifest, stored when it closed, named the old
    # parts it had not changed: made between A's listing and A's deletions, it lost them
    # (helper hAP F1: fsync returned 0, then EIO on every mount). A version whose base is gone
    # now stores those parts again, so A's retirement cannot take what it names
    mib = 1 << 20
    async with two_clients(tmp_path, account) as (a, b):
        data = await big_file_both_see(a, b, 10 * mib)
        base = b.node("/big").token
        old_parts = set((await b.syncer.parts.reader.manifest(base)).tokens())
        fb = await b.open_node(b.node("/big"))
        await b.fs.write(fb, 5, b"B" * 1000)  # B holds the file open
        rewritten = os.urandom(10 * mib)
        fa = await a.open_node(a.node("/big"))
        await a.fs.write(fa, 0, rewritten)
        a.fs.release(fa)
        await a.wait_idle()
        b.fs.release(fb)
        await b.wait_idle()
        mine = b.node("/big").token
        assert mine != base
        assert not set((await b.syncer.parts.reader.manifest(mine)).tokens()) & old_parts
        assert await a.syncer.retire_due(now=float("inf")) == len(old_parts)  # none is named now
        for _ in range(2):
            await listed(a, b)
        files = await files_on_a_fresh_mount(tmp_path, account, a.key)
        assert len(files) == 2, sorted(files)  # the file and its conflict copy
        assert set(files.values()) == {data[:5] + b"B" * 1000 + data[1005:], rewritten}


async def test_a_retry_of_a_version_whose_base_another_client_replaced_uploads_each_part_once(
    account, tmp_path, monkeypatch
):
    # as above, and B's store fails once at its manifest (a full engine disk): the retry took
    # the replaced manifest's parts again before the failed attempt's copies of them, found
    # that manifest gone and uploaded every part again, each retry (hAT F5)
    from privifs.errors import ServerError
    from privifs.parts.store import PartStore

    mib = 1 << 20
    async with two_clients(tmp_path, account) as (a, b):
        data = await big_file_both_see(a, b, 10 * mib)
        old_parts = set((await b.syncer.parts.reader.manifest(b.node("/big").token)).tokens())
        fb = await b.open_node(b.node("/big"))
        await b.fs.write(fb, 5, b"B" * 1000)
        fa = await a.open_node(a.node("/big"))
        await a.fs.write(fa, 0, os.urandom(10 * mib))
        a.fs.release(fa)
        await a.wait_idle()
        real, failed = PartStore.put_manifest, []

        async def full_disk_once(self, *args, **kwargs):
            if self is b.syncer.parts.store and not failed:
                failed.append(True)
                raise ServerError("507 Insufficient Storage: the server's disk is full")
            return await real(self, *args, **kwargs)

        monkeypatch.setattr(PartStore, "put_manifest", full_disk_once)
        uploaded = b.syncer.parts.parts_uploaded
        b.fs.release(fb)
        await b.wait_idle()
        assert failed and b.syncer.parts.parts_uploaded - uploaded == len(old_parts)
        mine = set((await b.syncer.parts.reader.manifest(b.node("/big").token)).tokens())
        assert not mine & old_parts
        files = await files_on_a_fresh_mount(tmp_path, account, a.key)
        assert data[:5] + b"B" * 1000 + data[1005:] in files.values(), sorted(files)


async def test_a_manifest_left_without_its_mark_keeps_the_parts_it_names_from_another_clients_retirement(
    account, tmp_path
):
    # a writer killed between its manifest's configure-file-meta and its risk meta leaves a
    # manifest without its mark; down longer than another client's retirement grace, that
    # client deleted the parts it named, and its file read EIO on every mount for good
    # (helper hAP F2). The retirement reads such a token as the sweep does
    from privifs.client.datatokens import FileMeta

    mib = 1 << 20
    async with two_clients(tmp_path, account) as (a, b):
        await big_file_both_see(a, b, 10 * mib)
        old = await b.syncer.parts.reader.manifest(b.node("/big").token)
        with manifest_marks_cut_off(b.syncer.parts.store):  # the risk meta write the kill cut off
            unmarked = await b.syncer.parts.store.put_manifest(old, FileMeta("big", "", "/", 0, "/big"))
        fa = await a.open_node(a.node("/big"))
        await a.fs.write(fa, 0, os.urandom(10 * mib))  # every part of the old version retired
        a.fs.release(fa)
        await a.wait_idle()
        assert await a.syncer.retire_due(now=float("inf")) == 0  # the unmarked manifest names them
        gone = {t for t in old.tokens()} - {i.token async for i in a.client.tokens.list()}
        assert not gone and unmarked in {i.token async for i in a.client.tokens.list()}


async def test_a_listed_manifest_whose_download_answers_404_holds_back_the_retirement_only_a_few_rounds(
    account, tmp_path, monkeypatch
):
    # a token the server lists but whose download answers 404 (a blob a server lost, a
    # middlebox) looks like a 404 changed on its way: the retirement waited for the next round,
    # every round, and no retired part was ever deleted (hAT F9)
    from privifs.client.datatokens import FileMeta
    from privifs.errors import NotFoundError
    from privifs.fs.sync import LOST_MANIFEST_TRIES

    mib = 1 << 20
    async with two_clients(tmp_path, account) as (a, b):
        await big_file_both_see(a, b, 10 * mib)
        old = await b.syncer.parts.reader.manifest(b.node("/big").token)
        with manifest_marks_cut_off(b.syncer.parts.store):
            lost = await b.syncer.parts.store.put_manifest(old, FileMeta("big", "", "/", 0, "/big"))
        peek = a.syncer.parts.reader.unmarked_parts

        async def answers_404(info):
            if info.token == lost:
                raise NotFoundError(f"HTTP 404 for the content of {lost}")
            return await peek(info)

        monkeypatch.setattr(a.syncer.parts.reader, "unmarked_parts", answers_404)
        fa = await a.open_node(a.node("/big"))
        await a.fs.write(fa, 0, os.urandom(10 * mib))  # every part of the old version retired
        a.fs.release(fa)
        await a.wait_idle()
        rounds = [await a.syncer.retire_due(now=float("inf")) for _ in range(LOST_MANIFEST_TRIES)]
        assert rounds == [0] * (LOST_MANIFEST_TRIES - 1) + [len(set(old.tokens()))], rounds
        assert lost in {i.token async for i in a.client.tokens.list()}


async def test_an_edit_stored_after_the_other_client_removed_the_big_file_and_its_parts_is_stored_whole(
    account, tmp_path
):
    # the same with a removal: the edit wins against the delete, and its version is readable
    mib = 1 << 20
    async with two_clients(tmp_path, account) as (a, b):
        data = await big_file_both_see(a, b, 10 * mib)
        fb = await b.open_node(b.node("/big"))
        await b.fs.write(fb, 5, b"B" * 1000)
        a.unlink_node(1, "big")
        await a.wait_idle()
        assert await a.syncer.retire_due(now=float("inf")) == 3  # the removed file's parts go
        b.fs.release(fb)
        await b.wait_idle()
        for _ in range(2):
            await listed(a, b)
        files = await files_on_a_fresh_mount(tmp_path, account, a.key)
        assert sorted(files) == ["big"]
        assert files["big"] == data[:5] + b"B" * 1000 + data[1005:]


async def test_a_directory_shown_under_its_conflict_name_gives_its_marker_to_the_plain_name_it_cannot_merge(
    account, tmp_path
):
    # A made g in d9 (not written back yet) when another client renamed d9 → d3 over an implicit
    # d3 holding its own g: A showed d9's marker as d3.conflict-…, and its g went to the vault
    # there. A fresh mount shows the marker's directory d3 (the other g) and an implicit
    # d3.conflict-… (A's g); A kept the marker on the conflict-named directory and, at every
    # listing, merged into it what the implicit d3 could give: a new /d3/h showed as
    # /d3.conflict-…/h on A for good (found by a three-mount race)
    async with two_clients(tmp_path, account) as (a, b):
        await a.remote.put("/d3/g", b"theirs")
        marker = await a.remote.mkdir("/d9")
        await listed(a)
        resume = a.hold_write_back()
        fh, _ = a.create_node(a.node("/d9"), "g")
        await a.fs.write(fh, 0, b"mine")
        a.fs.release(fh)
        await a.remote.move_dir("/d9", "/d3")
        await a.refresher.refresh_once()
        aside = f"d3.conflict-{marker[-8:]}"
        assert a.ns.child(a.ns.root, aside) is not None, tree_of(a)
        resume()
        await a.wait_idle()
        await a.remote.put("/d3/h", b"h")
        await converged(
            tmp_path,
            account,
            {"/d3": "dir", "/d3/g": "file", "/d3/h": "file", f"/{aside}": "dir", f"/{aside}/g": "file"},
            a,
            b,
        )
        assert a.node("/d3").token == marker
        assert await a.read_file("/d3/g") == b"theirs" and await a.read_file(f"/{aside}/g") == b"mine"


async def test_a_rewrite_keeps_the_parts_its_own_conflict_copy_still_names(account, tmp_path):
    # A and B rewrite different parts of one big file at once: both versions stay, one as a
    # conflict copy, and both manifests reuse the old manifest's other parts. The writer whose
    # own version became the conflict copy then rewrites the plain one (the other's version):
    # a minute later it deleted the parts that version no longer named, checking only manifests
    # other clients stored, and its own conflict copy, which named them too, read EIO everywhere
    # (seen in a race of two mounts writing one big file, found by 'privifs verify --data')
    mib = 1 << 20
    async with two_clients(tmp_path, account) as (a, b):
        data = await big_file_both_see(a, b, 10 * mib)
        await edit(a, 8 * mib + 5, b"A" * 1000)
        await edit(b, 5, b"B" * 1000)
        await a.wait_idle()
        await b.wait_idle()
        for _ in range(2):
            await listed(a, b)
        # the one whose own version shows as the conflict copy rewrites the plain name's second
        # part, which all three manifests share
        x = a if a.node("/big").token not in a.syncer.stored_manifests else b
        assert x.node("/big").token not in x.syncer.stored_manifests
        await edit(x, 5 * mib, b"X" * 1000)
        await x.wait_idle()
        await x.syncer.retire_due(now=float("inf"))
        await x.wait_idle()
        got = await files_on_a_fresh_mount(tmp_path, account, a.key)  # EIO: a part of one is gone
        assert len(got) == 2, sorted(got)  # the file and its conflict copy
        assert all(len(v) == len(data) for v in got.values())


async def test_a_rewrite_keeps_the_parts_a_conflict_copy_moved_to_another_directory_names(account, tmp_path):
    # the same, with the conflict copy moved to another directory first (keeping both versions):
    # only the rewritten file's directory was listed for manifests still naming the parts, and
    # the moved copy read EIO a minute after the next rewrite of the file
    mib = 1 << 20
    async with two_clients(tmp_path, account) as (a, b):
        data = await big_file(a, 10 * mib)
        a.fs.mkdir(1, b"elsewhere", 0o755)
        await a.wait_idle()
        await listed(a, b)
        await edit(a, 8 * mib + 5, b"A" * 1000)
        await edit(b, 5, b"B" * 1000)
        await a.wait_idle()
        await b.wait_idle()
        for _ in range(2):
            await listed(a, b)
        conflict = next(n for n in a.ns.root.children if n.startswith("big.conflict"))
        a.fs.rename(1, conflict.encode(), a.node("/elsewhere").ino, b"copy", 0)
        await a.wait_idle()
        for _ in range(2):
            await listed(a, b)
        await edit(a, 5 * mib, b"X" * 1000)
        await a.wait_idle()
        for c in (a, b):
            await c.syncer.retire_due(now=float("inf"))
            await c.wait_idle()
        (tmp_path / "fresh").mkdir()
        async with inprocess_fs(tmp_path / "fresh", *account, key=a.key) as f:
            await f.refresher.refresh_once()
            assert len(await f.read_file("/elsewhere/copy")) == len(data)  # EIO: a part was gone
            assert len(await f.read_file("/big")) == len(data)


@pytest.mark.parametrize("first", ["dir rename lands first", "file rename lands first"])
async def test_a_file_renamed_inside_a_directory_another_client_renamed_keeps_both_renames(account, tmp_path, first):
    # B renames /x → /z while A, which has not listed that yet, renames /x/a.txt → /x/b.txt: the
    # only serial outcome is /z/b.txt. Each rename wrote every field of the token's place (name,
    # extension, context) as its mount last saw it, so whichever landed second undid the other
    # one's: /x/b.txt and an empty /z when A's came second, /z/a.txt (A's rename lost) when B's
    # did (seen with two mounts: five files renamed in /x on one while the other renamed /x).
    # A rename now writes only the fields it changes.
    async with two_clients(tmp_path, account) as (a, b):
        await a.mkdir("/x")
        await a.write_file("/x/a.txt", b"content")
        await listed(a, b)
        assert tree_of(b) == {"/x": "dir", "/x/a.txt": "file"}
        if first == "dir rename lands first":
            await b.rename("/x", "/z")
            await b.wait_idle()
            await a.rename("/x/a.txt", "/x/b.txt")
            await a.wait_idle()
        else:
            await a.rename("/x/a.txt", "/x/b.txt")
            await a.wait_idle()
            assert tree_of(b) == {"/x": "dir", "/x/a.txt": "file"}  # (B has not listed A's rename)
            await b.rename("/x", "/z")
            await b.wait_idle()
        await converged(tmp_path, account, {"/z": "dir", "/z/b.txt": "file"}, a, b)
        assert await a.read_file("/z/b.txt") == b"content"


async def test_a_rename_over_a_file_another_client_renamed_away_meanwhile_leaves_that_file(account, tmp_path):
    # A renames /config → /config.bak while B, which has not listed that yet, saves atomically:
    # /config.tmp renamed over /config. B's rename deleted the token it replaced, which by then was
    # A's /config.bak: the old content was gone everywhere, though no serial order of the two
    # renames removes it (seen with two mounts swapping two files by renames over each other:
    # both files' content was lost). The rename-over now deletes the token it replaced only if the
    # listing still shows it where this mount saw it.
    # (A renames content it does not have at hand, too big to fetch first: nothing to store
    # again under the new name when it finds its token gone)
    old = os.urandom(RENAME_FETCH_LIMIT + 1)
    async with two_clients(tmp_path, account) as (a, b):
        await a.remote.put("/config", old, type="file", mode="644")
        await a.write_file("/config.tmp", b"new")
        await listed(a, b)
        await a.rename("/config", "/config.bak")
        await a.wait_idle()
        assert tree_of(b) == {"/config": "file", "/config.tmp": "file"}  # (B has not listed A's rename)
        await b.rename("/config.tmp", "/config")
        await b.wait_idle()
        await converged(tmp_path, account, {"/config": "file", "/config.bak": "file"}, a, b)
        for c in (a, b):
            assert await c.read_file("/config.bak") == old
            assert await c.read_file("/config") == b"new"


async def test_two_clients_swapping_two_files_by_renames_over_each_other_keep_a_content(account, tmp_path):
    # B renames /d over /c and A, which has not seen that, renames /c over /d. Each rename
    # deleted the token it replaced, each time the other client's file: B's delete of /c's token
    # went out before its own rename was written back, A then moved that token... and B's rename,
    # when it went, found its token deleted by A's and was dropped. Both contents were gone
    # everywhere (seen with two mounts: six rounds of crossing renames lost both files twice).
    # A rename's replaced token is now deleted only after the rename itself is written back,
    # and stays when the rename is dropped.
    c0, d0 = os.urandom(RENAME_FETCH_LIMIT + 1), os.urandom(RENAME_FETCH_LIMIT + 2)  # (not fetched first)
    async with two_clients(tmp_path, account) as (a, b):
        await a.remote.put("/c", c0, type="file", mode="644")
        await a.remote.put("/d", d0, type="file", mode="644")
        await listed(a, b)
        c_token = a.node("/c").token
        resume = b.hold_write_back()
        await b.rename("/d", "/c")
        with trio.move_on_after(5):  # (its delete of /c's token went out at once)
            while any(i.token == c_token for i in await b.listing()):
                await trio.sleep(0.05)
        await a.rename("/c", "/d")
        await a.wait_idle()
        resume()
        await b.wait_idle()
        await converged(tmp_path, account, {"/d": "file"}, a, b)
        for c in (a, b):
            assert await c.read_file("/d") == c0


@pytest.mark.parametrize("case", ["moved out", "same directory renamed", "renamed inside"])
async def test_a_directory_rename_leaves_alone_an_entry_the_listing_shows_another_client_moved(account, tmp_path, case):
    # B moves /x/out.txt to /out.txt (or renames /x itself to /yb) and A, which listed that but
    # had renamed /x → /ya before, writes its rename back: it wrote every entry below /x to /ya
    # as it knew them, so B's move was undone (/ya/out.txt: no serial order of the two gives it),
    # and the one directory must not end up split between /ya and /yb. A place another client changed,
    # as a listing since this mount's last write of the token shows, now wins over a rename
    # made here before that listing (as if this mount's rename had come first and the other
    # client's after it).
    async with two_clients(tmp_path, account) as (a, b):
        await a.mkdir("/x")
        await a.write_file("/x/out.txt", b"out")
        await a.write_file("/x/stay.txt", b"stay")
        await listed(a, b)
        resume = a.hold_write_back()
        await a.rename("/x", "/ya")
        if case == "moved out":
            await b.rename("/x/out.txt", "/out.txt")
            expected = {"/ya": "dir", "/ya/stay.txt": "file", "/out.txt": "file"}
        elif case == "renamed inside":  # each changed another field: both changes stay
            await b.rename("/x/out.txt", "/x/in.txt")
            expected = {"/ya": "dir", "/ya/stay.txt": "file", "/ya/in.txt": "file"}
        else:
            await b.rename("/x", "/yb")
            expected = None  # one directory, /ya or /yb, holding both (not split between them)
        await b.wait_idle()
        await a.refresher.refresh_once()  # A lists B's change before its own rename goes
        resume()
        await a.wait_idle()
        for _ in range(2):
            await listed(a, b)
        fresh = await fresh_tree(tmp_path, account, a.key)
        if expected is None:
            assert fresh in [{d: "dir", f"{d}/stay.txt": "file", f"{d}/out.txt": "file"} for d in ("/ya", "/yb")], fresh
        else:
            assert fresh == expected
        assert tree_of(a) == fresh
        assert tree_of(b) == fresh


async def renamed_there_then_removed_here(a, b, old: str, new: str, kind: str, remove) -> None:
    """Both list ``old``; ``a`` renames it to ``new`` and writes that back; ``b``, which has not
    listed the rename, removes ``old`` (``remove``: its unlink or rmdir) and writes that back."""
    await listed(a, b)
    await a.rename(old, new)
    await a.wait_idle()
    assert tree_of(b) == {old: kind}  # (B has not listed A's rename)
    await remove(old)
    await b.wait_idle()


@pytest.mark.parametrize("size", [5, RENAME_FETCH_LIMIT + 1])
async def test_a_delete_of_a_file_another_client_renamed_meanwhile_leaves_the_renamed_file(account, tmp_path, size):
    # A renames /s → /s2 and its rename reaches the vault; B, which has not listed that yet,
    # removes /s. B's delete took the token, which by then was A's /s2: the file was gone
    # everywhere, though docs/semantics.md says a rename against a delete keeps the renamed file
    # when the renaming mount has it (seen with hM's race6.py on two mounts: 2 rounds in 9 lost
    # the renamed file). The delete now takes the token only if the listing still shows it
    # where this mount saw it, as a rename over a file does.
    data = os.urandom(size)
    async with two_clients(tmp_path, account) as (a, b):
        await a.write_file("/s", data)
        await renamed_there_then_removed_here(a, b, "/s", "/s2", "file", b.unlink)
        await converged(tmp_path, account, {"/s2": "file"}, a, b)
        for c in (a, b):
            assert await c.read_file("/s2") == data


async def two_markers_of_d(a, b) -> tuple[str, str]:
    """``/d`` made by two clients at once (two markers of one directory), listed by both; the
    markers in claim order: the first is each client's token of ``/d``, the second its other
    marker."""
    first = await a.remote.mkdir("/d")
    await a.remote.next_second()
    second = await a.remote.mkdir("/d")
    await listed(a, b)
    for c in (a, b):
        assert c.node("/d").token == first and c.node("/d").extra_markers == {second}
    return first, second


async def test_a_directorys_marker_moved_into_it_by_another_client_shows_as_on_a_fresh_mount(account, tmp_path):
    # another client, to which the two markers of /d were two directories, moved the one that is
    # /d's token here into /d (mv d0 d/sub there): this mount kept showing one /d holding the
    # moved marker, which it could never place (into itself), and no /d/sub, for good (three
    # mounts racing directory renames: one mount showed d2 where the others showed d2 and d2/d3)
    async with two_clients(tmp_path, account) as (a, b):
        first, second = await two_markers_of_d(a, b)
        await a.client.tokens.update(first, context="/d", file_name="sub")
        await converged(tmp_path, account, {"/d": "dir", "/d/sub": "dir"}, a, b)
        assert a.node("/d").token == second and a.node("/d/sub").token == first
        assert not a.node("/d").extra_markers and not a.node("/d/sub").extra_markers


async def test_a_directorys_other_marker_moved_elsewhere_is_not_deleted_with_it(account, tmp_path):
    # the same with /d's other marker moved into /d: it showed as /d/sub, but /d kept it as its
    # own other marker, so a rename of /d here deleted it (a marker left at the old place would
    # bring the old path back) and the empty /d/sub vanished on every mount
    async with two_clients(tmp_path, account) as (a, b):
        first, second = await two_markers_of_d(a, b)
        await a.client.tokens.update(second, context="/d", file_name="sub")
        await listed(a, b)
        assert tree_of(a) == {"/d": "dir", "/d/sub": "dir"}
        await a.rename("/d", "/e")
        await converged(tmp_path, account, {"/e": "dir", "/e/sub": "dir"}, a, b)


async def test_entries_another_client_wrote_under_a_directorys_conflict_name_stay_there(account, tmp_path):
    # another client showed the marker M of a directory moved onto /e2 (which had a marker of
    # its own) as e2.conflict-M, and wrote g and h there: their tokens say /e2.conflict-M, where
    # a fresh mount shows them (an implicit directory; M is one more marker of /e2). A merged
    # them into /e2 at every listing and the next listing put them back: one mount showed
    # /e2/g, the others /e2.conflict-M/g, for good (three mounts racing directory renames)
    async with two_clients(tmp_path, account) as (a, b):
        moved = await a.remote.mkdir("/x")
        await a.remote.chmod("/x", 0o750)
        await a.remote.mkdir("/e2")
        await a.remote.put("/e2/h", b"theirs")
        await listed(a, b)
        await a.client.tokens.update(moved, context="/", file_name="e2")
        aside = conflict_name("e2", moved)
        await a.remote.put(f"/{aside}/g", b"g")
        await a.remote.put(f"/{aside}/h", b"mine")
        for _ in range(2):
            await listed(a, b)
        fresh = await fresh_tree(tmp_path, account, a.key)
        ours = {f"/{aside}": "dir", f"/{aside}/g": "file", f"/{aside}/h": "file"}
        assert fresh == {"/e2": "dir", "/e2/h": "file", **ours}
        assert tree_of(a) == fresh
        assert tree_of(b) == fresh
        assert await a.read_file("/e2/h") == b"theirs" and await a.read_file(f"/{aside}/h") == b"mine"
        # the implicit directory has the mode a fresh mount gives it, not the moved marker's (a
        # mount that had shown the marker there kept 750 for good: a three-mount race)
        mode = await mode_on_a_fresh_mount(tmp_path, account, a.key, f"/{aside}")
        assert a.node(f"/{aside}").mode == b.node(f"/{aside}").mode == mode


async def test_a_directory_moved_onto_a_files_name_whose_conflict_name_is_taken_shows_as_on_a_fresh_mount(
    account, tmp_path
):
    # another client moved the directory x (marker M) onto /d3, a file here, while the implicit
    # directory d3.conflict-M (entries written under that name elsewhere) was there too: this
    # mount found both names taken and left x where it was, for good, and the file kept /d3;
    # a fresh mount shows the directory as /d3 and the file aside, as when it adds them (a mount
    # killed and mounted again during a three-mount race showed /d3 a file and /d2/e0 the
    # directory, the others /d3 a directory)
    async with two_clients(tmp_path, account) as (a, b):
        moved = await a.remote.mkdir("/x")
        await a.remote.put("/x/in", b"in x")
        file = await a.remote.put("/d3", b"a file")
        aside = conflict_name("d3", moved)
        await a.remote.put(f"/{aside}/g", b"g")
        await listed(a, b)
        await a.client.tokens.update(moved, context="/", file_name="d3")
        await a.client.tokens.update((await a.remote.token("/x/in")).token, context="/d3")
        for _ in range(2):
            await listed(a, b)
        fresh = await fresh_tree(tmp_path, account, a.key)
        file_aside = conflict_name("d3", file)
        assert fresh == {
            "/d3": "dir",
            "/d3/in": "file",
            f"/{file_aside}": "file",
            f"/{aside}": "dir",
            f"/{aside}/g": "file",
        }
        assert tree_of(a) == fresh
        assert tree_of(b) == fresh
        assert await a.read_file(f"/{file_aside}") == b"a file"


async def mode_on_a_fresh_mount(tmp_path, account, key: bytes, path: str) -> int:
    (tmp_path / "fresh-mode").mkdir(parents=True)
    async with inprocess_fs(tmp_path / "fresh-mode", *account, key=key) as f:
        await f.refresher.refresh_once()
        return f.node(path).mode


async def test_an_rmdir_of_a_directory_another_client_renamed_meanwhile_leaves_the_renamed_directory(account, tmp_path):
    # hU D2: A renames /d → /d2 and its rename reaches the vault; B, which has not listed that
    # yet, removes /d. B's delete took the marker, which by then was A's /d2: the renamed
    # directory vanished everywhere (with entries it lost its mode and times), though a rename
    # against a delete keeps the renamed entry. Files had this check; directories' markers not.
    async with two_clients(tmp_path, account) as (a, b):
        await a.mkdir("/d", 0o700)
        await renamed_there_then_removed_here(a, b, "/d", "/d2", "dir", b.rmdir)
        await converged(tmp_path, account, {"/d2": "dir"}, a, b)
        assert a.node("/d2").mode == b.node("/d2").mode == 0o700


async def test_a_directory_whose_marker_another_client_deleted_shows_the_mode_a_fresh_mount_shows(account, tmp_path):
    # hU D1: the marker of /d (mode 750) deleted elsewhere while /d holds a file: every mount
    # that knew the marker kept 750, a fresh mount (the directory known from its entry only)
    # shows the mount's directory mode
    async with two_clients(tmp_path, account) as (a, b):
        await a.mkdir("/d", 0o750)
        await a.write_file("/d/f", b"kept")
        await listed(a, b)
        assert b.node("/d").mode == 0o750
        await a.client.tokens.delete(a.node("/d").token)
        await converged(tmp_path, account, {"/d": "dir", "/d/f": "file"}, a, b)
        fresh = await mode_on_a_fresh_mount(tmp_path, account, a.key, "/d")
        assert a.node("/d").mode == b.node("/d").mode == fresh


async def test_a_directory_whose_marker_another_client_deleted_loses_its_extended_attributes(account, tmp_path):
    # hF F3: the directory known from its entry only kept the marker's extended attributes on
    # every mount that knew the marker; a fresh mount shows none (they lived in the marker)
    async with two_clients(tmp_path, account, xattrs=True) as (a, b):
        await a.mkdir("/d")
        await a.setxattr("/d", b"user.k", b"the marker's")
        await a.write_file("/d/f", b"kept")
        await listed(a, b)
        assert await b.getxattr("/d", b"user.k") == b"the marker's"
        await a.client.tokens.delete(a.node("/d").token)
        await converged(tmp_path, account, {"/d": "dir", "/d/f": "file"}, a, b)
        assert await a.listxattr("/d") == await b.listxattr("/d") == []


@pytest.mark.parametrize("clash", [False, True])
async def test_a_directory_known_from_its_entries_once_its_marker_went_merges_into_the_name_dir_directory(
    account, tmp_path, clash
):
    # hF F1: /t/X a directory (marker), a file /t/X made after it elsewhere, then y in the
    # directory and a directory /t/X.dir holding z (hH H2: holding a y too); X's marker deleted
    # elsewhere. The file claimed X before y did, so the directory shows as X.dir, where a fresh
    # mount also finds the real X.dir: one directory holding both's entries (the later y under
    # its conflict name). The mounts kept X the directory (the file aside) and X.dir apart, for
    # good; with the clash, after the first fix, X the directory holding the y
    async with two_clients(tmp_path, account) as (a, b):
        await a.mkdir("/t")
        await a.mkdir("/t/X")
        await a.wait_idle()
        await a.remote.next_second()
        await a.remote.put("/t/X", b"the file")
        await listed(a, b)
        await a.remote.next_second()
        await a.write_file("/t/X/y", b"first y")
        await a.mkdir("/t/X.dir")
        await a.wait_idle()
        await a.remote.next_second()
        await a.write_file(f"/t/X.dir/{'y' if clash else 'z'}", b"second")
        await listed(a, b)
        later = a.node(f"/t/X.dir/{'y' if clash else 'z'}").token
        await a.client.tokens.delete(a.node("/t/X").token)
        second = f"/t/X.dir/{conflict_name('y', later)}" if clash else "/t/X.dir/z"
        expected = {"/t": "dir", "/t/X": "file", "/t/X.dir": "dir", "/t/X.dir/y": "file", second: "file"}
        await converged(tmp_path, account, expected, a, b)
        assert await b.read_file("/t/X.dir/y") == b"first y" and await b.read_file(second) == b"second"


async def test_a_file_named_name_dir_stays_when_entries_arrive_under_a_name_a_file_holds(account, tmp_path):
    # hH H1: files /z/X and /z/X.dir, then another client's token in /z/X: the directory it
    # needs shows as X.dir.dir. The directory X.dir took the file X.dir's place among its
    # parent's entries: that file showed nowhere, not even on a fresh mount, and an edit of it
    # stayed pending for good ('privifs umount' never returned)
    async with two_clients(tmp_path, account) as (a, b):
        await a.mkdir("/z")
        await a.write_file("/z/X", b"the file X")
        await a.write_file("/z/X.dir", b"the file X.dir")
        await listed(a, b)
        await a.remote.next_second()  # (claiming after the file X.dir, the directory is X.dir.dir)
        await a.remote.put("/z/X/y", b"an entry")
        expected = {"/z": "dir", "/z/X": "file", "/z/X.dir": "file", "/z/X.dir.dir": "dir", "/z/X.dir.dir/y": "file"}
        await converged(tmp_path, account, expected, a, b)
        assert await b.read_file("/z/X.dir") == b"the file X.dir"
        assert not a.ns.pending() and not b.ns.pending()


@pytest.mark.parametrize("first", ["a", "b"])
async def test_two_mkdirs_of_one_name_show_the_first_claims_mode_everywhere(account, tmp_path, first):
    # hU D3: A made /d (then chmod 700) while B made /d: each mount kept its own marker's mode
    # for good; a fresh mount shows the first claim's (claim order: createdAt, then token)
    async with two_clients(tmp_path, account) as (a, b):
        early, late = (a, b) if first == "a" else (b, a)
        await early.mkdir("/d", 0o700)
        await early.wait_idle()
        await early.remote.next_second()
        await late.mkdir("/d", 0o755)
        await late.wait_idle()
        await converged(tmp_path, account, {"/d": "dir"}, a, b)
        fresh = await mode_on_a_fresh_mount(tmp_path, account, a.key, "/d")
        assert fresh == 0o700
        assert a.node("/d").mode == b.node("/d").mode == fresh


async def files_shown(c) -> dict[str, bytes]:
    """The root's files on client ``c`` and their content."""
    return {n: await c.read_file(f"/{n}") for n in sorted(c.ns.root.children)}


async def with_a_conflict_copy(a, b, *, made_on_b: bool = False) -> tuple[dict[str, bytes], str]:
    """/f.txt made on ``a`` and another client's version at the same path a second later (or
    ``b``'s, written there before it listed), both listed on ``a`` and ``b``: the files both
    show (the same) and the conflict copy's name."""
    await a.write_file("/f.txt", b"v1 from a")
    await a.wait_idle()
    await a.remote.next_second()  # (each version made in a second of its own: claim order)
    if made_on_b:
        await b.write_file("/f.txt", b"from b")
        await b.wait_idle()
    else:
        await a.remote.put("/f.txt", b"from another client", type="file", mode="644")
    await listed(a, b)
    shown = await files_shown(a)
    assert len(shown) == 2 and shown == await files_shown(b)
    (copy,) = (n for n in shown if n != "f.txt")
    return shown, copy


@pytest.mark.parametrize("save", ["rewrite", "rename over", "rename over, listed before written back"])
async def test_a_save_under_a_name_that_has_conflict_copies_stays_under_that_name(account, tmp_path, save):
    # hN F1: /f.txt had a conflict copy (another client stored a version at the same time); a
    # save of /f.txt replaced the version holding the plain name with a token newer than the
    # copy, which then came first in the claim order: within a listing the saved content moved
    # to a conflict name on every mount and the older version was back under /f.txt (a
    # program's fsynced save read back as the one before it; after a power cut, SQLite's WAL of
    # an earlier round and a database "malformed"). The copies the saving mount shows are now
    # named so in the vault before the save is stored: the saved version is alone at its path.
    async with two_clients(tmp_path, account) as (a, b):
        before, copy = await with_a_conflict_copy(a, b)
        for i, (c, other) in enumerate([(a, b), (b, a), (a, b)]):
            content = f"save {i}".encode()
            await a.remote.next_second()
            if save == "rewrite":
                await c.write_file("/f.txt", content, fsync=True)
            elif save == "rename over":
                await c.write_file("/f.tmp", content)
                await c.rename("/f.tmp", "/f.txt")
            else:  # (hP: the old holder gone and the saved file still named f.tmp in that listing)
                await c.write_file("/f.tmp", content, fsync=True)
                resume = c.hold_write_back()
                await c.rename("/f.tmp", "/f.txt")
                await c.refresher.refresh_once()
                resume()
            await c.wait_idle()
            await listed(c, other)
            await listed(c, other)
            for seen in (c, other):
                shown = await files_shown(seen)
                assert shown["f.txt"] == content, (i, save, shown)
                assert copy in shown and shown[copy] == before[copy]
        expected = {"/f.txt": "file", f"/{copy}": "file"}
        await converged(tmp_path, account, expected, a, b)
        (tmp_path / "again").mkdir()
        assert (await files_on_a_fresh_mount(tmp_path / "again", account, a.key))["f.txt"] == b"save 2"


@pytest.mark.parametrize("listed_first", [False, True])
async def test_a_rename_whose_token_another_client_deleted_before_a_listing_showed_it_renamed_keeps_the_file(
    account, tmp_path, listed_first
):
    # hM F1: A renames /f → /g while B removes /f. B checked that the token was still where it
    # saw it, then deleted it; the server applied A's acknowledged rename in between, and the
    # delete took the renamed file: /g was gone everywhere, without a word (10 of 19 races). A
    # now stores its cached content again under /g when the token goes before any listing of
    # A's showed it renamed; after one has, a delete is taken as meant (listed_first).
    async with two_clients(tmp_path, account) as (a, b):
        await a.write_file("/f", b"the content")
        await listed(a, b)
        token = a.node("/f").token
        await a.rename("/f", "/g")
        await a.wait_idle()
        if listed_first:
            # A's rename asked its refresher for a listing a second later (without it, the next
            # one came at the refresh interval, and a delete B made after seeing the rename
            # brought the file back: hP, 2 of 3); that listing (its loop does not run here):
            assert a.refresher._due and min(a.refresher._due) <= trio.current_time() + RENAME_SEEN_AFTER
            await a.refresher.refresh_once()
            assert token in a.syncer.renames_listed
        await b.client.tokens.delete(token)  # (B's check saw the token at /f)
        if listed_first:
            await converged(tmp_path, account, {}, a, b)
        else:
            await converged(tmp_path, account, {"/g": "file"}, a, b)
            for c in (a, b):
                assert await c.read_file("/g") == b"the content"


@pytest.mark.parametrize("first", ["the edit", "the save", "the save, listed here"])
async def test_a_conflict_copy_edited_while_another_mount_saves_the_plain_file_keeps_its_name(account, tmp_path, first):
    # hP P4: B edited /f.conflict-X.txt while A saved /f.txt, which stored A's copy of it under
    # that conflict name first; B's edit, stored at the token's plain name, was then a copy of
    # a copy (f.conflict-X.conflict-Y.txt) and B's name showed the old content. A conflict copy
    # saved in place is stored under the name it shows. hQ Q1: the same when A's save reached
    # the vault before B's edit and B listed in between (5 of 5): the listing showed the copy's
    # token at the conflict name B already showed it under, and B did not take that place as
    # the token's, so its save took A's rename for another client's and kept the old content.
    async with two_clients(tmp_path, account) as (a, b):
        _, copy = await with_a_conflict_copy(a, b, made_on_b=first == "the save, listed here")
        resume = b.hold_write_back() if first == "the edit" else lambda: None
        if first == "the edit":
            await b.write_file(f"/{copy}", b"the copy edited on b")
        await a.remote.next_second()
        await a.write_file("/f.txt", b"saved on a", fsync=True)
        await a.wait_idle()
        if first != "the edit":
            if first == "the save, listed here":
                await b.refresher.refresh_once()  # (it showed the copy under the plain name: hP P5)
                assert await files_shown(b) == {"f.txt": b"saved on a", copy: b"from b"}
            await b.write_file(f"/{copy}", b"the copy edited on b", fsync=True)
        resume()
        await b.wait_idle()
        await converged(tmp_path, account, {"/f.txt": "file", f"/{copy}": "file"}, a, b)
        for c in (a, b):
            assert await files_shown(c) == {"f.txt": b"saved on a", copy: b"the copy edited on b"}


async def test_a_file_removed_here_leaves_its_conflict_copies_under_their_names(account, tmp_path):
    # hP P0: a conflict copy took the plain name once the file holding it was removed: SQLite
    # deletes its -wal at the last close, and a WAL a power cut had left in the vault as a copy
    # came back as the -wal, whose old frames SQLite then read (87 committed rows lost). The
    # copies the removing mount shows are stored under their conflict names.
    async with two_clients(tmp_path, account) as (a, b):
        shown, copy = await with_a_conflict_copy(a, b)
        await a.unlink("/f.txt")
        await a.wait_idle()
        await converged(tmp_path, account, {f"/{copy}": "file"}, a, b)
        for c in (a, b):
            assert await files_shown(c) == {copy: shown[copy]}


@pytest.mark.parametrize("change", ["removed", "replaced by a rename"])
@pytest.mark.parametrize("listed_first", [True, False])
async def test_a_conflict_copy_changed_on_one_mount_after_another_saved_the_file_stays_changed(
    account, tmp_path, change, listed_first
):
    # hT T1: B's save of /f.txt names its conflict copy so in the vault (_alone_at); that was
    # kept for a rename's rescue, and A's removal of the copy (or its editor-style save over
    # it) within a minute had B store the old copy again: the copy back (5 of 5), an edit a
    # copy of a copy. T2: A, not having listed since, took its copy's token at the conflict
    # name A showed it under for another client's rename and kept it.
    async with two_clients(tmp_path, account) as (a, b):
        _, copy = await with_a_conflict_copy(a, b)
        await a.remote.next_second()
        await b.write_file("/f.txt", b"saved on b", fsync=True)
        await b.wait_idle()
        if listed_first:
            await a.refresher.refresh_once()
        if change == "removed":
            await a.unlink(f"/{copy}")
            expected = {"f.txt": b"saved on b"}
        else:
            await a.write_file("/copy.tmp", b"the copy edited on a", fsync=True)
            await a.rename("/copy.tmp", f"/{copy}")
            expected = {"f.txt": b"saved on b", copy: b"the copy edited on a"}
        await a.wait_idle()
        await converged(tmp_path, account, {f"/{n}": "file" for n in expected}, a, b)
        for c in (a, b):
            assert await files_shown(c) == expected


async def test_a_file_deleted_after_its_rename_was_listed_stays_deleted_when_an_older_copy_holds_its_old_name(
    account, tmp_path
):
    """A shows ``f`` and a conflict copy of it, renames ``f`` to ``g`` (the copy takes the plain
    name ``f``); B, having listed the rename, deletes ``g``. A took the copy at ``f`` for a writer's
    replacement that missed its rename and stored ``g`` again: a file deleted on purpose came back
    on every mount (helper hAV F2; also after an ``rm -rf`` of the directory, as the copy is deleted
    after ``g``)."""
    async with two_clients(tmp_path, account) as (a, b):
        for c, data in ((a, b"A's f"), (b, b"B's f")):
            fh, _ = c.create_node(1, "f")
            await c.fs.write(fh, 0, data)
            c.fs.release(fh)
            await c.wait_idle()
            await a.remote.next_second()
        await listed(a, b)
        assert len(a.ns.root.children) == 2, sorted(a.ns.root.children)  # f and its conflict copy
        a.fs.rename(1, b"f", 1, b"g", 0)
        await listed(a, b)
        await listed(a, b)
        assert sorted(b.ns.root.children) == ["f", "g"], sorted(b.ns.root.children)
        b.fs.unlink(1, b"g")
        for _ in range(3):
            await listed(a, b)
        for who, c in (("A", a), ("B", b)):
            assert sorted(c.ns.root.children) == ["f"], f"{who} shows {sorted(c.ns.root.children)}"

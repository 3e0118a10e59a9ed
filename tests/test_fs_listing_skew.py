"""A listing read page by page while another client deletes tokens: the service pages by number
(``page``/``perPage``), so a deletion of a token an earlier page already showed moves every later
token one place up, and the first token of the next page is never listed (the engine pages
``ORDER BY seq`` as the live service is documented to page: by offset). A token missing from one
listing is not a deleted token: the refresher asks for it by id before taking its file away, the
parts collection does not delete the parts of a manifest one listing skipped, and ``privifs
verify`` does not report its file missing.

Found by a mount under a heavy rename/write/unlink workload (helper hD): files vanished for a
refresh interval and came back as new entries at the place their token had, not where the
directories they were in had been renamed to since."""

from __future__ import annotations

import argparse
import os
from types import SimpleNamespace

from privifs.cli.verify_cmd import verify
from privifs.client.datatokens import FileMeta
from privifs.parts.store import PartStore
from tests.fskit import inprocess_fs

KEY = bytes(range(32))
PAGE = 4


class DeletedWhileListed:
    """The tokens API of ``tokens``, but a listing (whole or of one context) goes ``PAGE`` tokens
    a page, and after the first page of the first one another client deletes the first token
    that page showed."""

    def __init__(self, tokens, remote_tokens, page: int = PAGE):
        self._tokens = tokens
        self._remote = remote_tokens
        self.page = page
        self.victim: str | None = None

    def __getattr__(self, name):
        return getattr(self._tokens, name)

    async def list(self, **kwargs):
        if set(kwargs) - {"context"}:  # asked for by id: one token, no pages
            async for info in self._tokens.list(**kwargs):
                yield info
            return
        seen = []
        async for info in self._tokens.list(per_page=self.page, **kwargs):
            yield info
            seen.append(info.token)
            if len(seen) == self.page and self.victim is None:
                self.victim = seen[0]
                await self._remote.delete(self.victim)


async def in_order(t) -> list[str]:
    return [i.token async for i in t.client.tokens.list()]


async def test_a_file_a_listing_skipped_is_not_taken_away(account, tmp_path):
    async with inprocess_fs(tmp_path, *account, key=KEY, workers=1) as t:
        for n in range(3 * PAGE):
            await t.write_file(f"/f{n:02d}", b"content %d" % n)
            await t.settle()
        order = await in_order(t)
        assert len(order) == 3 * PAGE
        skipped = order[PAGE]  # the first token of page 2 moves onto page 1 once order[0] goes
        by_token = {t.node(f"/f{n:02d}").token: f"/f{n:02d}" for n in range(3 * PAGE)}
        listing = DeletedWhileListed(t.refresher.tokens, t.client.tokens)
        t.refresher.tokens = listing
        await t.refresh()
        assert listing.victim == order[0]
        path = by_token[skipped]
        assert await t.exists(path), f"{path} vanished: its token was only skipped by the listing"
        assert await t.read_file(path) == b"content %d" % int(path[2:])
        t.refresher.tokens = listing._tokens
        await t.refresh()  # the file deleted elsewhere goes at the next listing that lacks it
        assert not await t.exists(by_token[order[0]])
        assert await t.exists(path)


async def test_the_parts_of_a_manifest_a_listing_skipped_are_kept(account, tmp_path):
    part = 64 * 1024
    data = os.urandom(2 * part + 5)
    async with inprocess_fs(tmp_path, *account, key=KEY, workers=1) as t:
        await t.write_file("/first", b"stored before the big file")
        await t.settle()
        store = PartStore(t.fs.vault, part_size=part)

        async def source():
            yield data

        manifest = await store.put(source, len(data), FileMeta("big", "bin", "/", 0, "/big.bin"))
        order = await in_order(t)
        assert order[PAGE] == manifest  # first, then the 3 parts, then the manifest
        listing = DeletedWhileListed(t.client.tokens, t.client.tokens)
        infos = [i async for i in listing.list()]
        assert manifest not in {i.token for i in infos}
        await t.refresher.apply(infos, 0.0)
        await t.syncer.parts.reader.sweep(infos, min_age=0, interval=0)
        listed = {i.token async for i in t.client.tokens.list()}
        m = await store.manifest(manifest)
        assert {p.token for p in m.parts if p.token} <= listed, "the parts of a stored file were collected"
        assert await store.read(m, 0, len(data)) == data


async def test_verify_does_not_report_a_file_a_listing_skipped_as_missing(account, tmp_path, capsys):
    async with inprocess_fs(tmp_path, *account, key=KEY, workers=1) as t:
        for n in range(3 * PAGE):
            await t.write_file(f"/f{n:02d}", b"content %d" % n)
            await t.settle()
        order = await in_order(t)
        by_token = {t.node(f"/f{n:02d}").token: f"/f{n:02d}" for n in range(3 * PAGE)}
        client = SimpleNamespace(tokens=DeletedWhileListed(t.client.tokens, t.client.tokens))
        args = argparse.Namespace(data=True, repair=False)
        report = await verify(args, client, t.fs.vault, KEY, tmp_path, tmp_path / "cache")
        # the token another client deleted while the listing was read is missing; the one the
        # listing skipped is not
        assert report.missing == [by_token[order[0]]], report.missing
        assert report.damaged == []


async def test_a_rewrite_keeps_the_parts_another_clients_manifest_a_listing_skipped_names(account, tmp_path):
    part = 64 * 1024
    data = os.urandom(2 * part + 5)
    async with inprocess_fs(tmp_path, *account, key=KEY, workers=1) as t:
        for n in range(PAGE):
            await t.write_file(f"/s{n}", b"small %d" % n)
            await t.settle()
        store = PartStore(t.fs.vault, part_size=part)

        async def source():
            yield data

        theirs = await store.put(source, len(data), FileMeta("big", "bin", "/", 0, "/big.bin"))
        everything = [i.token async for i in t.client.tokens.list()]
        # the manifest comes first on the second page: the small files and its parts before it
        page = everything.index(theirs)
        parts = list((await store.manifest(theirs)).tokens())
        # this mount's rewrite of the file stopped naming those parts (it had reused them too)
        t.syncer.tokens = DeletedWhileListed(t.syncer.tokens, t.client.tokens, page=page)
        t.syncer.retire_parts("/", parts)
        await t.syncer.retire_due(now=float("inf"))
        assert not set(parts) & set(t.fs.ns.index.tombstones()), "parts another client's manifest names were deleted"


async def test_a_rename_of_ours_that_landed_unrecorded_is_not_taken_for_another_clients(account, tmp_path):
    """Not a listing's skew, but the same lesson (a server's state is not what one answer said):
    this mount's own rename whose update was applied though the mount never recorded it (its
    answer lost, or the mount killed right after sending it) was taken for another client's
    rename when the file was written again, and the old content stayed as a conflict copy."""
    async with inprocess_fs(tmp_path, *account, key=KEY, workers=1) as t:
        await t.mkdir("/d")
        await t.write_file("/d/f", b"old content")
        await t.settle()
        old = t.node("/d/f").token
        resume = t.hold_write_back()
        await t.rename("/d", "/e")
        await t.client.tokens.update(old, context="/e", file_name="f", extension="")  # landed, unrecorded
        await t.write_file("/e/f", b"new content")
        resume()
        await t.settle()
        await t.refresh()
        assert await t.vault_tree() == {"e": "dir", "e/f": b"new content"}
        assert await t.tree() == {"e": "dir", "e/f": b"new content"}
        assert [p for p in (await t.vault_names()) if "conflict" in p] == []

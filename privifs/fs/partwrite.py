"""The write-back of big files as parts: a staged file above the threshold is stored as parts
plus a new manifest, uploading only the parts whose content changed.

Which parts changed: a part the filesystem saw no write or truncation reach since the staged
file was copied from the manifest it replaces (:class:`privifs.fs.parts.Changes`) keeps its
token unread; every other part is read and its keyed digest compared with the digest of the same
part in that manifest, and an equal part keeps its token too (after a restart, or for a staged
file made another way, every part is compared). So a small change to a big file uploads one or two
parts and a new manifest, and a file that was one token (or a manifest with another part size)
is converted by uploading every part. A part the staged file never wrote (a sparse file's hole,
found with ``SEEK_DATA`` in one pass, :meth:`~privifs.crypto.sealed.SealedFile.written_chunks`)
is a hole in the manifest: nothing is read or uploaded for it. Parts go before the manifest that names them; the
parts of the old manifest it no longer names are returned for deletion once the new manifest is
recorded (a crash in between leaves them to :meth:`privifs.fs.parts.PartReader.sweep`). A store
that fails part-way (a full engine disk, the server gone) offers the parts it uploaded to the
next store of the same staged file, which keeps those whose digest still matches
(:class:`Unfinished`): a retry goes on where the last attempt stopped. The
uploaded parts are not cached one by one: the syncer moves the whole staged file into the cache
under the manifest's token, as for any upload, and reads and the next write use that entry
(the file is held once, and no part is encrypted a second time for the cache).

Memory: no part is held whole. A part is read from the staged file 1 MiB at a time on a worker
thread, digested and encrypted there into a reused buffer that goes to the upload as it is
(:meth:`privifs.parts.store.PartStore.put_part_from`), so each part in flight costs about 1 MiB;
a part compared with the old manifest is read once for its digest and, if it differs, again as
it uploads.
"""

from __future__ import annotations

import hmac
import logging
import secrets
import time
from collections.abc import Callable

import trio

from privifs.client.datatokens import FileMeta, find_each
from privifs.client.vault import PIECE
from privifs.crypto.sealed import CHUNK
from privifs.errors import PrivifsError, single_error
from privifs.fs.parts import PartReader, manifest_key
from privifs.fs.staging import StagedFile
from privifs.parts import format as fmt
from privifs.parts.store import COLLECT_MIN_AGE, IN_FLIGHT, PART_SIZE

log = logging.getLogger("privifs.fs.parts")

REUSE_AGE = COLLECT_MIN_AGE / 2  # a failed store's part is offered again while younger than this


def written_parts(staged: StagedFile, part_size: int) -> set[int]:
    """The parts of ``staged`` that may hold data (see :meth:`SealedFile.written_chunks`); the
    others were never written (a sparse file's holes) and read as zeros."""
    size, out = staged.size, set()
    for first, end in staged.sealed.written_chunks():
        lo, hi = first * CHUNK, min(end * CHUNK, size)
        if lo < hi:
            out.update(range(lo // part_size, (hi - 1) // part_size + 1))
    return out


def _same_part(copy: fmt.Part | None, part: fmt.Part) -> fmt.Part:
    """``copy`` (a failed store's upload of part ``i``) when it holds what ``part`` holds (the
    digest is keyed with the part's index and covers its content), else ``part``."""
    if copy is None or part.is_hole or copy.size != part.size:
        return part
    return copy if hmac.compare_digest(copy.digest, part.digest) else part


class PartWriter:
    def __init__(self, reader: PartReader, *, part_size: int | None = None, in_flight: int = IN_FLIGHT):
        self.reader = reader
        self.store = reader.store
        self.cache = reader.cache
        self.part_size = part_size or PART_SIZE
        self.in_flight = in_flight
        self.parts_uploaded = 0  # for tests and measurements
        self.parts_kept = 0
        self.holes = 0
        self.unfinished = Unfinished(reader.in_flight)

    async def old_manifest(self, token: str | None, is_manifest: bool, path: str) -> fmt.Manifest | None:
        if token is None or not is_manifest:
            return None
        try:
            return await self.reader.manifest(token)
        except PrivifsError as exc:  # every part is uploaded again: nothing is lost
            log.warning("%s: the manifest being replaced cannot be read (%s); storing every part", path, exc)
            return None

    async def _still_there(
        self,
        earlier: dict[int, fmt.Part],
        old: fmt.Manifest | None,
        old_token: str | None,
        parts: list[fmt.Part | None],
        upload_id: str,
        reader: Callable[[int], Callable[[int, int], bytes]],
        stored: list[str],
        path: str,
    ) -> None:
        """The parts this store kept from a failed attempt are asked for by id before the
        manifest names them: another mount's sweep takes a part no manifest names once it is an
        hour old, and a retry can come late. So are those it kept from the manifest it replaces
        that the last listing lacks (:meth:`PartReader.unlisted`): a part deleted by hand or by
        another client while its manifest stayed (the new manifest named it, fsync returned 0,
        and the file read EIO everywhere once this mount's cache let it go). One that is gone
        is uploaded again from the staged file, which holds the whole content.

        And the manifest it replaces is asked for: once another client replaced or removed it,
        that client retires its parts, deleting them a minute later unless a manifest its
        listing then shows names them. A manifest made between that listing and those
        deletions lost them (helper hAP F1: fsync returned 0, the file read EIO everywhere, 9 of
        90 files aimed at that moment), so every part kept from a manifest that is gone is
        uploaded again. One that is still there when asked cannot have its parts retired for a
        minute, and the new manifest is made within moments of the question."""
        named = {p.token for p in parts if p is not None}
        kept = {p.token for p in earlier.values()} & named
        kept.update(t for t in self.reader.unlisted(old.tokens() if old is not None else []) if t in named)
        from_old = {t for t in old.tokens() if t in named} if old is not None and old_token else set()
        if not kept and not from_old:
            return
        asked = kept | ({old_token} if from_old else set())
        there = {i.token for i in await find_each(self.store.tokens, sorted(asked))}
        gone = kept - there
        if gone and from_old and old_token in there:
            await self._store_again(gone, parts, upload_id, reader, stored, path)
            gone = set()
            # asked again: those uploads may have taken longer than the minute the answer gave
            # (hAT F2)
            there = {i.token for i in await find_each(self.store.tokens, [old_token])}
        retiring = from_old if from_old and old_token not in there else set()
        if retiring:
            log.info(
                "%s: the version this store replaces was replaced or removed by another client, which retires "
                "its parts; the %d parts kept from it are stored again",
                path,
                len(retiring),
            )
        await self._store_again(gone | retiring, parts, upload_id, reader, stored, path, retiring)

    async def _store_again(
        self,
        again: set[str],
        parts: list[fmt.Part | None],
        upload_id: str,
        reader: Callable[[int], Callable[[int, int], bytes]],
        stored: list[str],
        path: str,
        retiring: set[str] = frozenset(),
    ) -> None:
        """Upload again, from the staged file, the parts of ``parts`` whose tokens are in ``again``
        (``in_flight`` at a time); those not in ``retiring`` are gone from the vault: said so."""
        room = trio.CapacityLimiter(self.in_flight)

        async def store_again(i: int, size: int) -> None:
            async with room:
                parts[i] = await self._put_part(upload_id, i, size, reader(i), stored)

        with single_error():
            async with trio.open_nursery() as nursery:
                for i, part in enumerate(parts):
                    if part is not None and part.token in again:
                        if part.token not in retiring:
                            log.warning(
                                "%s: part %d, which this store kept, is gone from the vault; storing it again", path, i
                            )
                        nursery.start_soon(store_again, i, part.size)

    async def _put_part(
        self, upload_id: str, i: int, size: int, read: Callable[[int, int], bytes], stored: list[str]
    ) -> fmt.Part:
        """Upload part ``i`` (``size`` bytes, read through ``read``) and note its token as this
        store's (``stored``) and in flight (kept from this mount's sweep)."""
        part = await self.store.put_part_from(upload_id, i, size, read)
        stored.append(part.token)
        self.reader.in_flight.add(part.token)
        self.parts_uploaded += 1
        return part

    async def store_staged(
        self,
        staged: StagedFile,
        old: fmt.Manifest | None,
        meta: FileMeta,
        risk: dict[str, str],
        old_token: str | None = None,
        progress: Callable[[int], None] = lambda n: None,
    ) -> tuple[str, list[str]]:
        """Store ``staged`` as parts and a manifest (at ``meta``'s place, with ``risk`` and the
        manifest mark); returns the manifest token and the old manifest's parts it no longer names."""
        size = staged.size
        part_size = old.part_size if old is not None else self.part_size
        count = fmt.parts_needed(size, part_size)
        parts: list[fmt.Part | None] = [None] * count
        upload_id = secrets.token_hex(8)
        digest_key = self.reader.digest_key

        def reader(i: int) -> Callable[[int, int], bytes]:
            start = i * part_size
            # (what the page cache lacks, past it: see SealedFile.read_view)
            return lambda offset, n: staged.sealed.read_view(start + offset, n, direct=True)

        def digest_of(i: int) -> bytes:
            """Part ``i``'s digest, read a piece at a time (on a worker thread)."""
            read, size_i = reader(i), min(part_size, size - i * part_size)
            mac = fmt.part_hasher(digest_key, i)
            for offset in range(0, size_i, PIECE):
                mac.update(read(offset, min(PIECE, size_i - offset)))
            return mac.digest()

        changes = self.reader.changes
        written = await trio.to_thread.run_sync(written_parts, staged, part_size)
        room = trio.Semaphore(self.in_flight)  # parts read or uploaded at once (taken before each starts)
        earlier = self.unfinished.take(staged.id)  # what a failed store of this file uploaded

        async def one(i: int) -> None:
            length = min(part_size, size - i * part_size)
            try:
                before = old.parts[i] if old is not None and i < len(old.parts) else None
                # (a failed attempt's copy first: see _same_part)
                bases = [p for p in (earlier.get(i), before) if p is not None and not p.is_hole and p.size == length]
                if bases:
                    digest = await trio.to_thread.run_sync(digest_of, i)
                    same = next((p for p in bases if hmac.compare_digest(p.digest, digest)), None)
                    if same is not None:
                        parts[i] = same
                        self.parts_kept += 1
                        progress(length)
                        return
                # streamed: read, digested and encrypted a piece at a time while it uploads
                parts[i] = await self._put_part(upload_id, i, length, reader(i), stored)
                progress(length)
            finally:
                room.release()

        stored: list[str] = []
        try:
            with single_error():
                async with trio.open_nursery() as nursery:
                    for i in range(count):
                        if i % 4096 == 4095:
                            await trio.lowlevel.checkpoint()  # (holes and kept parts cost no await: let the rest run)
                        if old is not None and changes.unchanged(staged.id, old_token, part_size, i):
                            # not written since it was copied from the old manifest; a failed
                            # attempt's copy of it is taken first: a retry after the old manifest
                            # went kept none of its parts and uploaded them all again, each time
                            # (hAT F5)
                            parts[i] = _same_part(earlier.get(i), old.parts[i])
                            if parts[i].is_hole:
                                self.holes += 1
                            else:
                                self.parts_kept += 1
                        elif i not in written:  # never written: nothing to upload
                            parts[i] = fmt.hole(min(part_size, size - i * part_size))
                            self.holes += 1
                        else:
                            await room.acquire()
                            nursery.start_soon(one, i)
                            continue
                        progress(parts[i].size)
            await self._still_there(earlier, old, old_token, parts, upload_id, reader, stored, meta.path)
            manifest = fmt.Manifest(part_size, size, tuple(parts))
            token = await self.store.put_manifest(manifest, meta, risk)
            self.reader.remember(token, manifest)
            self.reader.settling.update(dict.fromkeys(stored, trio.current_time()))
        except BaseException:
            # offered to the next store of this staged file, which goes on where this one stopped
            # (a full engine disk: each retry stored every part again beside the last attempt's
            # until the sweep removed those, an hour later)
            self.unfinished.keep(staged.id, earlier, {i: p for i, p in enumerate(parts) if p and p.token in stored})
            stored.clear()  # kept from the sweep meanwhile
            raise
        finally:  # unless offered to the next store, a failed store leaves its parts to the sweep
            self.reader.in_flight.difference_update(stored)
        changes.forget(staged.id)
        named = set(manifest.tokens())
        stale = [t for t in old.tokens() if t not in named] if old is not None else []
        reused = [p.token for p in earlier.values() if p.token in named]
        self.reader.settling.update(dict.fromkeys(reused, trio.current_time()))  # (the listing may lag)
        self.unfinished.done(earlier)
        stale += [p.token for p in earlier.values() if p.token not in named]  # the last attempt's, changed since
        for replaced in ([old_token] if old_token else []) + stale:  # never read again by this mount
            self.cache.evict(replaced)
        if old_token:
            self.cache.evict(manifest_key(old_token))
        return token, stale


class Unfinished:
    """The parts failed stores uploaded, by staged file and part index: offered to the next
    store of the same staged file, which keeps each one whose content is still that part's (its
    digest: proof enough, wherever the part came from), and kept from this mount's sweep
    meanwhile (``in_flight``, PartReader's). Another mount's sweep collects any part no manifest
    names once it is ``COLLECT_MIN_AGE`` old, so a part is offered only while younger than
    :data:`REUSE_AGE`; then it is let go to the sweeps. The parts of a file removed (or whose
    staged file a copy replaced) since its store failed are retired (:meth:`let_go_gone`)."""

    def __init__(self, in_flight: set[str]):
        self.in_flight = in_flight
        self._parts: dict[str, dict[int, fmt.Part]] = {}
        self._born: dict[str, float] = {}  # part token -> when it was uploaded (time.time())

    def take(self, staged_id: str) -> dict[int, fmt.Part]:
        """The parts offered to a store of ``staged_id``; that store ends with :meth:`keep`
        (it failed) or :meth:`done` (it stored a manifest)."""
        self.let_go_old()
        return self._parts.pop(staged_id, {})

    def let_go_old(self) -> None:
        """Parts older than :data:`REUSE_AGE` are offered no more: left to the sweeps."""
        now = time.time()
        for sid, parts in list(self._parts.items()):
            for i, part in list(parts.items()):
                if now - self._born.get(part.token, now) > REUSE_AGE:
                    del parts[i]
                    self._let_go(part.token)
            if not parts:
                del self._parts[sid]

    def let_go_gone(self, exists: Callable[[str], bool]) -> list[str]:
        """The parts offered for staged files that ``exists`` says are gone (the file removed,
        or its content replaced by a copy while the store failed): no store will come back for
        them and no manifest names them, so they are let go and returned, to be retired like a
        rewrite's stale parts (left to the sweeps, they held the engine's disk for up to an hour
        and a half: on a full disk, every other upload failed meanwhile)."""
        out: list[str] = []
        for sid in [s for s in self._parts if not exists(s)]:
            for part in self._parts.pop(sid).values():
                self._let_go(part.token)
                out.append(part.token)
        return out

    def keep(self, staged_id: str, earlier: dict[int, fmt.Part], uploaded: dict[int, fmt.Part]) -> None:
        """A store of ``staged_id`` failed: what it was offered and what it ``uploaded`` (the
        newer part where both have an index) are offered to the next one."""
        kept = dict(earlier)
        for i, part in uploaded.items():
            if i in kept:
                self._let_go(kept[i].token)  # named by no manifest: left to the sweep
            kept[i] = part
            self._born[part.token] = time.time()
            self.in_flight.add(part.token)
        if kept:
            self._parts[staged_id] = kept

    def done(self, earlier: dict[int, fmt.Part]) -> None:
        """A store offered ``earlier`` stored its manifest."""
        for part in earlier.values():
            self._let_go(part.token)

    def _let_go(self, token: str) -> None:
        self._born.pop(token, None)
        self.in_flight.discard(token)

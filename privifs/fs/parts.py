"""Reading files stored as parts (:mod:`privifs.parts`) through the mount.

A node whose token is a manifest (risk meta ``privifs.parts``) is read part by part: a read fetches
only the parts it touches (several at once), each into the read cache as its own entry (so a file
larger than the cache streams through it and the cache's limit holds: every download is one part),
and checks each part's digest against the manifest before serving a byte of it. A part this reader
downloads is kept in memory as it arrives and its digest computed there (:class:`Fresh`, on the
download's worker thread), so it is verified without reading the cache file back, and the reads of
it are served from that plaintext until they reach its end (a few parts at most are kept). A
sequential reader (512 KiB read back to back) gets the next parts fetched ahead in the background. A hole
(a sparse file's never-written part) reads as zeros with nothing fetched. Decoded manifests
are kept in memory (a manifest token never changes). A part that is missing or fails its checks
raises :class:`~privifs.errors.PrivifsError`; the filesystem turns that into EIO for the reads that
need the part, logged with the path. The refresher hands each listing to :meth:`PartReader.sweep`,
which deletes parts no manifest names once they are an hour old.
"""

from __future__ import annotations

import hmac
import logging
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import trio

from privifs.client.datatokens import whole_listing
from privifs.client.shapes import TokenInfo
from privifs.client.vault import Vault
from privifs.crypto.sealed import SealedFile
from privifs.crypto.wire import SLACK
from privifs.errors import IntegrityError, NotFoundError, PrivifsError, ServerUnreachable, single_error
from privifs.fs.cache import DOWNLOAD_IDLE, ContentCache
from privifs.fs.staging import StagedFile, Staging
from privifs.parts import format as fmt
from privifs.parts.store import COLLECT_MIN_AGE, PartStore, is_manifest, is_part, maybe_unmarked_manifest

log = logging.getLogger("privifs.fs.parts")

READ_AHEAD = 3  # parts fetched ahead of a sequential reader
SEQUENTIAL = 512 * 1024  # bytes read back to back before reads count as sequential
MANIFESTS_KEPT = 64
VERIFIED_KEPT = 4096
OPEN_PARTS = 64  # verified part files kept open between reads (random reads in a big file)
IN_MEMORY_PARTS = 4  # … of them at most this many not cache entries (read through memory, or not kept)
FRESH_KEPT = 6  # downloaded parts whose verified plaintext stays in memory until read to their end
SWEEP_INTERVAL = 600.0  # seconds between collections of unreferenced parts
SETTLE = 120.0  # seconds a listing may lag behind a manifest this mount stored


def manifest_key(token: str) -> str:
    """The cache entry holding the manifest ``token`` (its bytes, kept when it was fetched; the
    entry named by the token itself is the file's whole content, see :meth:`PartReader.stage`)."""
    return f"{token}#manifest"


def is_manifest_node(remote_risk: str | None) -> bool:
    """Whether a node's token (its risk meta as JSON, as the index keeps it) is a manifest."""
    return remote_risk is not None and f'"{fmt.MARK}"' in remote_risk


@dataclass
class Base:
    """A staged file copied from a manifest, and what changed in it since."""

    token: str  # the manifest it was copied from
    part_size: int
    low: int  # the smallest size it had since (parts from here on may have changed)
    dirty: set[int] = field(default_factory=set)  # parts written since


class Changes:
    """Which parts of staged files changed since the manifest they were copied from, so the
    write-back reads and digests only those (:mod:`privifs.fs.partwrite`). In memory only: a
    staged file it does not know (after a restart, or staged another way) has every part
    compared by digest instead."""

    def __init__(self) -> None:
        self._bases: dict[str, Base] = {}

    def based(self, staged_id: str, token: str, manifest: fmt.Manifest) -> None:
        self._bases[staged_id] = Base(token, manifest.part_size, manifest.total)

    def wrote(self, staged_id: str, offset: int, length: int) -> None:
        base = self._bases.get(staged_id)
        if base is not None and length > 0:
            base.dirty.update(range(offset // base.part_size, (offset + length - 1) // base.part_size + 1))

    def resized(self, staged_id: str, size: int) -> None:
        base = self._bases.get(staged_id)
        if base is not None:
            base.low = min(base.low, size)

    def cloned(self, source_id: str, clone_id: str) -> None:
        base = self._bases.get(source_id)
        if base is not None:
            self._bases[clone_id] = Base(base.token, base.part_size, base.low, set(base.dirty))

    def forget(self, staged_id: str) -> None:
        self._bases.pop(staged_id, None)

    def unchanged(self, staged_id: str, token: str | None, part_size: int, index: int) -> bool:
        """Whether part ``index`` of the staged file is certainly the manifest ``token``'s part."""
        base = self._bases.get(staged_id)
        return (
            base is not None
            and base.token == token
            and base.part_size == part_size
            and index not in base.dirty
            and (index + 1) * part_size <= base.low
        )


class Fresh:
    """A part's plaintext as its download arrives (a :class:`~privifs.fs.cache.Tap`): the download
    puts it in place in :attr:`data` (:meth:`target`; a block from elsewhere is copied there), and
    each block is fed to the part's digest on the download's worker thread. Complete only if the
    blocks came in order and added up to the part's size; trusted only once the download returned
    (its GCM tag verified) and the digest matched the manifest's."""

    def __init__(self, key: bytes, index: int, size: int):
        self._key = key
        self.index = index
        self.size = size
        self.data: bytearray | None = None  # allocated by the download (a cache hit needs none)
        self.filled = 0
        self.broken = False
        self.mac = fmt.part_hasher(key, index)

    def target(self, block: int) -> bytearray:
        if self.data is None:
            self.data = bytearray(-(-max(self.size, 1) // block) * block + SLACK)  # whole blocks, room to decrypt
        return self.data

    def block(self, offset: int, data: memoryview) -> None:
        end = offset + len(data)
        if self.broken or offset != self.filled or end > self.size:
            self.broken = True  # not this part's size: the file is checked from the cache instead
            return
        if self.data is None:
            self.data = bytearray(self.size)
        if data.obj is not self.data:  # filled in place by the download: nothing to copy
            self.data[offset:end] = data
        self.mac.update(data)
        self.filled = end

    def restart(self) -> None:
        self.filled = 0
        self.broken = False
        self.mac = fmt.part_hasher(self._key, self.index)

    def complete(self) -> bool:
        return not self.broken and self.filled == self.size and self.data is not None


class PartReader:
    def __init__(self, cache: ContentCache, vault: Vault, *, read_ahead: int = READ_AHEAD):
        self.cache = cache
        self.vault = vault
        self.store = PartStore(vault)
        self.digest_key = vault.derive(fmt.part_key)
        self.read_ahead = read_ahead
        self._manifests: OrderedDict[str, fmt.Manifest] = OrderedDict()
        self._kept: OrderedDict[str, None] = OrderedDict()  # manifests put in the cache (manifest(keep=True))
        self._verified: OrderedDict[tuple, None] = OrderedDict()  # (part token, index, digest, cache file id)
        # part token -> its cache file, open and verified: a read of a part read before costs no
        # open(2) nor header check. Closed when the cache drops the entry (its space comes back).
        self._open: OrderedDict[str, SealedFile] = OrderedDict()
        cache.on_evict(self._close_open)
        # part token -> (index, digest, plaintext) of parts downloaded and verified here, until read
        # to their end (or pushed out): the first reads of a fetched part cost no read-back
        self._fresh: OrderedDict[str, tuple[int, bytes, bytearray]] = OrderedDict()
        # manifest token → (where a sequential read goes on, bytes read back to back up to there)
        self._next: OrderedDict[str, tuple[int, int]] = OrderedDict()
        self._ahead: set[str] = set()  # part tokens being fetched ahead
        self._swept_at: float | None = None
        self.sweep_error: str | None = None  # why the last sweep collected nothing (for `privifs status`)
        self.changes = Changes()
        # parts this mount is storing (their manifest is not stored yet): never collected, however
        # old (an upload slower than COLLECT_MIN_AGE would otherwise lose its first parts); then,
        # for SETTLE seconds after their manifest is stored, protected from a listing taken before it
        self.in_flight: set[str] = set()
        self.settling: dict[str, float] = {}  # part token -> when its manifest was stored (trio time)
        # (when it started, in trio time; the part tokens it showed) of the refresher's last listing
        self.listed: tuple[float, frozenset[str]] | None = None
        # token -> the parts it names as a manifest that lost its mark (empty: not one), decided
        # once per token (its content never changes): see unmarked_parts
        self._unmarked: dict[str, frozenset[str]] = {}

    def saw_listing(self, infos: list[TokenInfo], started: float) -> None:
        """The refresher read a whole listing (started at ``started``, trio time)."""
        self.listed = (started, frozenset(i.token for i in infos if is_part(i)))

    def unlisted(self, tokens: list[str]) -> list[str]:
        """Those of ``tokens`` (parts) the last listing lacks though they were stored before it
        started: deleted since (by another client, or by hand), or skipped by a listing read
        while tokens were deleted; only a request by id tells the two apart. A part whose
        manifest this mount stored after the listing started may be missing from it, and is
        not counted."""
        if self.listed is None:
            return []
        started, there = self.listed
        return [t for t in tokens if t not in there and self.settling.get(t, started - 1) < started]

    # -- manifests and parts -------------------------------------------------------------------
    async def manifest(self, token: str, risk: dict[str, str] | None = None, *, keep: bool = False) -> fmt.Manifest:
        """The manifest ``token`` holds (from memory once fetched); fetched, it must be the one
        ``risk`` (the token's risk meta, when the caller has it) states. ``keep`` (a file's read
        or write): a fetched manifest is also kept in the cache, for reads while the vault cannot
        be reached (the sweep and retirement, which read every manifest, keep none)."""
        m = self._manifests.get(token)
        if m is None:
            key = manifest_key(token)
            try:
                with trio.move_on_after(DOWNLOAD_IDLE):  # a manifest is small: no data this long is a stall
                    m = await self.store.manifest(token, risk)
                if m is None:
                    raise ServerUnreachable(f"the vault sent no data for manifest {token} for {DOWNLOAD_IDLE:.0f}s")
            except PrivifsError as exc:
                # offline (or unreachable, 5xx): the copy kept when it was fetched before, so that
                # a big file whose parts are cached reads as a cached whole file does
                kept = self.cache.get(key) if exc.transient else None
                if kept is None:
                    raise
                m = await self.store.decode_manifest(kept, risk)
                self._kept[token] = None
            self._manifests[token] = m
            while len(self._manifests) > MANIFESTS_KEPT:
                self._manifests.popitem(last=False)
        self._manifests.move_to_end(token)
        if keep and token not in self._kept:  # (once: a cache that cannot keep it is not asked again)
            self._kept[token] = None
            while len(self._kept) > MANIFESTS_KEPT:
                self._kept.popitem(last=False)
            self.cache.put(manifest_key(token), fmt.encode(m))
        return m

    def knows(self, token: str, *, kept: bool = False) -> bool:
        """Whether the manifest ``token`` is in memory (fetched and checked already); ``kept``:
        and kept in the cache too (see :meth:`manifest`)."""
        return token in self._manifests and (not kept or token in self._kept)

    def remember(self, token: str, manifest: fmt.Manifest) -> None:
        """A manifest this mount just stored: no need to fetch it back."""
        self._manifests[token] = manifest
        while len(self._manifests) > MANIFESTS_KEPT:
            self._manifests.popitem(last=False)

    def _check(self, m: fmt.Manifest, index: int, sealed: SealedFile) -> None:
        part = m.parts[index]
        if sealed.size != part.size:
            raise IntegrityError(f"part {index} holds {sealed.size} bytes, the manifest says {part.size}")
        mac = fmt.part_hasher(self.digest_key, index)
        for piece in sealed.chunks():
            mac.update(piece)
        if not hmac.compare_digest(mac.digest(), part.digest):
            raise IntegrityError(f"part {index} does not match its digest in the manifest (replaced or swapped)")

    async def part(self, m: fmt.Manifest, index: int) -> SealedFile:
        """Part ``index``, in the cache (downloaded if needed) and checked against the manifest.
        The reader keeps it open for later reads: the caller must not close it, nor await
        between this call returning and its use of the file. A part downloaded here is verified
        in memory as it arrives; one found in the cache is read back and checked."""
        part = m.parts[index]
        sealed = self._open.get(part.token)
        if sealed is not None and (part.token, index, part.digest, sealed.file_id) in self._verified:
            self._open.move_to_end(part.token)
            self.cache.used_again(part.token)
            return sealed
        fresh = Fresh(self.digest_key, index, part.size)
        try:
            sealed = await self.cache.fetch(part.token, self.vault, part.size, tap=fresh)
        except NotFoundError:  # the file is damaged, not gone: its manifest names the part
            raise IntegrityError(f"part {index} (token {part.token}) is missing from the vault") from None
        sealed.dense = True  # a download's file: a chunk of it that reads as a hole is damage
        key = (part.token, index, part.digest, sealed.file_id)  # this content, checked at this place
        if key not in self._verified:
            try:
                if fresh.complete():  # downloaded by this call: GCM verified, digest computed
                    if not hmac.compare_digest(fresh.mac.digest(), part.digest):
                        raise IntegrityError(
                            f"part {index} does not match its digest in the manifest (replaced or swapped)"
                        )
                    self._keep_fresh(part.token, index, part.digest, fresh.data)
                else:
                    await trio.to_thread.run_sync(self._check, m, index, sealed)
            except BaseException:
                sealed.close()
                self.cache.evict(part.token)
                raise
            self._verified[key] = None
            while len(self._verified) > VERIFIED_KEPT:
                self._verified.popitem(last=False)
        self._verified.move_to_end(key)
        self._close_open(part.token)  # another task opened it meanwhile
        self._open[part.token] = sealed
        while len(self._open) > OPEN_PARTS:
            self._open.popitem(last=False)[1].close()
        if sealed.is_in_memory or not self.cache.holds(part.token):
            # not a cache entry: read through memory (the disk had no room), or a private copy the
            # cache could not keep (larger than its limit, or evicted at once for the staging
            # reserve), unlinked, its disk space counted nowhere: keep few of those (64 held 256
            # MiB of a small cache disk, its --cache-size 2 MiB)
            private = [t for t, f in self._open.items() if f.is_in_memory or not self.cache.holds(t)]
            for token in private[:-IN_MEMORY_PARTS]:
                self._open.pop(token).close()
        return sealed

    def _keep_fresh(self, token: str, index: int, digest: bytes, data: bytearray) -> None:
        self._fresh[token] = (index, digest, data)
        self._fresh.move_to_end(token)
        while len(self._fresh) > FRESH_KEPT:
            self._fresh.popitem(last=False)

    def _close_open(self, token: str) -> None:
        sealed = self._open.pop(token, None)
        if sealed is not None:
            sealed.close()

    def _read_part(self, m: fmt.Manifest, index: int, sealed: SealedFile, offset: int, end: int) -> bytes | memoryview:
        """Bytes [offset, end) of the file from part ``index`` (a view of a fresh part's verified
        plaintext: pyfuse3 copies it into its reply, nothing copies it here); a cache file that
        no longer authenticates is dropped (the next read downloads the part again) and raises."""
        start, stop = m.span(index)
        lo, hi = max(offset, start), min(end, stop)
        part = m.parts[index]
        fresh = self._fresh.get(part.token)
        if fresh is not None and fresh[0] == index and fresh[1] == part.digest:
            if hi == stop:  # read to its end: later reads of it go to the cache file
                del self._fresh[part.token]
            return memoryview(fresh[2])[lo - start : hi - start]
        try:
            return sealed.read(lo - start, hi - lo)
        except IntegrityError:
            self.cache.evict(m.parts[index].token)
            raise

    # -- collection ----------------------------------------------------------------------------
    async def sweep(
        self, infos: list[TokenInfo], *, min_age: float = COLLECT_MIN_AGE, interval: float = SWEEP_INTERVAL
    ) -> int:
        """Delete the parts of ``infos`` (a whole listing) that no manifest in it names and that
        are older than ``min_age`` (a deleted file's parts, a store stopped before its manifest),
        at most once per ``interval``; returns how many. Manifests come from memory when known."""
        now = trio.current_time()
        if self._swept_at is not None and now - self._swept_at < interval:
            return 0
        self._swept_at = now
        wall = time.time()
        settle = min(min_age, SETTLE)
        self.settling = {t: at for t, at in self.settling.items() if now - at < settle}
        old = [
            i.token
            for i in infos
            if is_part(i)
            and i.token not in self.in_flight
            and i.token not in self.settling
            and i.created_at is not None
            and wall - i.created_at >= min_age
        ]
        if not old:  # no manifest need be read (nor a token that may be one downloaded)
            self.sweep_error = None
            return 0
        try:
            named = await self._named(infos)
        except IntegrityError as exc:
            self.sweep_error = str(exc)
            raise
        except NotFoundError as exc:
            return self._manifest_went(exc)
        self.sweep_error = None
        gone = [t for t in old if t not in named]
        if gone:
            try:
                gone = await self._confirmed_unnamed(gone)
            except NotFoundError as exc:
                return self._manifest_went(exc)
        for token in gone:
            await self.store.tokens.delete(token)
            self.cache.evict(token)
        if gone:
            log.info("collected %d part tokens no manifest names", len(gone))
        return len(gone)

    def _manifest_went(self, exc: NotFoundError) -> int:
        """A manifest the listing showed was deleted before it was read (another client rewrote
        or removed its file). Its replacement, which may name the same parts, can be missing from
        the listing, so nothing is collected; the next listing tries again. (The sweep failed
        with a warning and waited its whole interval: under a client rewriting a big file every
        few seconds it rarely ran, and parts no manifest named piled up.)"""
        self._swept_at = None
        log.info(
            "collecting unreferenced parts: a manifest went while it was read (%s); trying at the next listing", exc
        )
        return 0

    async def _confirmed_unnamed(self, gone: list[str]) -> list[str]:
        """Those of ``gone`` (parts no manifest of one listing names) that a second listing,
        read now, lists and names in no manifest either. The service lists by page number: a
        deletion elsewhere while a listing is read makes a page start one token later, and the
        manifest skipped so had its parts collected: a stored file lost for good (found under
        a rename/write/unlink workload). Read only when there is something to collect; a
        manifest both listings skip is left, which takes deletions under both reads. Nothing is
        collected when the second listing's end cannot be told (:func:`whole_listing`)."""
        infos = await whole_listing(self.store.tokens)
        if infos is None:
            log.info("collecting unreferenced parts: the listing's end cannot be told for sure; nothing collected")
            return []
        named = await self._named(infos)
        listed = {i.token for i in infos}
        return [t for t in gone if t in listed and t not in named]

    async def _named(self, infos: list[TokenInfo]) -> set[str]:
        """The part tokens the manifests among ``infos`` name (each checked against its risk
        meta). A manifest that does not verify may name any part, so it stops the collection:
        IntegrityError naming it and what to do."""
        named: set[str] = set()
        for info in infos:
            if is_manifest(info) and not is_part(info):
                try:
                    manifest = await self.manifest(info.token, info.risk)
                except IntegrityError as exc:
                    where = f"{info.context.rstrip('/')}/{info.file_name}"
                    raise IntegrityError(
                        f"the manifest {info.token} ({where}) does not verify ({exc}); no part is collected while"
                        " it is in the vault, since it may name any of them: see `privifs verify --data`, and"
                        f" remove it with `privifs token rm {info.token}` if it is damaged for good"
                    ) from None
                named.update(manifest.tokens())
            elif maybe_unmarked_manifest(info):
                named.update(await self.unmarked_parts(info))
        return named

    async def unmarked_parts(self, info: TokenInfo) -> frozenset[str]:
        """:meth:`PartStore.unmarked_parts`, decided once per token (its content never changes)."""
        known = self._unmarked.get(info.token)
        if known is None:
            known = self._unmarked[info.token] = await self.store.unmarked_parts(info)
            if known:
                where = f"{info.context.rstrip('/')}/{info.file_name}"
                log.info("%s: a manifest without its mark (%s); its parts are kept", where, info.token)
        return known

    # -- reads ---------------------------------------------------------------------------------
    async def read(self, token: str, offset: int, length: int) -> bytes | memoryview:
        """Bytes [offset, offset+length) of the file whose manifest is ``token`` (a read within
        one fresh part is a view of its plaintext, valid as long as it is kept)."""
        m = await self.manifest(token)
        touched = m.touched(offset, length)
        end = min(offset + length, m.total)
        if not touched:
            return b""
        if len(touched) == 1:  # most reads: no nursery
            i = touched[0]
            data = await self._piece(m, i, offset, end)
            self._follow(token, m, offset, end, i)
            return data
        got: dict[int, bytes | memoryview] = {}

        async def one(i: int) -> None:
            got[i] = await self._piece(m, i, offset, end)

        with single_error():
            async with trio.open_nursery() as nursery:
                for i in touched:
                    nursery.start_soon(one, i)
        self._follow(token, m, offset, end, touched[-1])
        return b"".join(got[i] for i in touched)

    async def _piece(self, m: fmt.Manifest, index: int, offset: int, end: int) -> bytes | memoryview:
        """Bytes [offset, end) of the file from part ``index``: zeros for a hole (nothing fetched)."""
        if m.parts[index].is_hole:
            start, stop = m.span(index)
            return bytes(min(end, stop) - max(offset, start))
        return self._read_part(m, index, await self.part(m, index), offset, end)

    def _follow(self, token: str, m: fmt.Manifest, offset: int, end: int, last: int) -> None:
        """After a read of [offset, end): fetch the next parts ahead once the reads have been
        sequential for :data:`SEQUENTIAL` bytes (a random read, or a program peeking at a file's
        first bytes, fetches only what it touches)."""
        at, run = self._next.get(token, (None, 0))
        run = run + end - offset if at == offset else end - offset
        self._next[token] = (end, run)
        self._next.move_to_end(token)
        while len(self._next) > MANIFESTS_KEPT:
            self._next.popitem(last=False)
        if run < SEQUENTIAL:
            return
        for i in range(last + 1, min(last + 1 + self.read_ahead, len(m.parts))):
            part = m.parts[i]
            if part.is_hole or part.token in self._ahead or self.cache.holds(part.token):
                continue
            self._ahead.add(part.token)
            trio.lowlevel.spawn_system_task(self._fetch_ahead, m, i)

    async def _fetch_ahead(self, m: fmt.Manifest, index: int) -> None:
        token = m.parts[index].token
        try:
            await self.part(m, index)
        except (PrivifsError, OSError) as exc:  # the read that needs the part reports it
            log.debug("read-ahead of part %d failed (%s)", index, exc)
        except Exception:
            log.exception("read-ahead of part %d failed unexpectedly", index)
        finally:
            self._ahead.discard(token)

    def stage_cached(self, token: str, size: int, staging: Staging) -> StagedFile | None:
        """The whole content of ``size`` bytes the cache holds under the manifest ``token`` (what
        this mount uploaded last), moved into a new staged file; None when the cache holds no
        such content. Needs no manifest: offline, a write to a big file whose content is cached
        is staged from it as a read is served from it (the write-back then compares every part
        by digest, see :class:`Changes`)."""
        staged_id = secrets.token_hex(12)
        if not self.cache.take(token, staging.path(staged_id)):  # moved, not copied
            return None
        try:
            staged = staging.open(staged_id, bound_to=token)
        except PrivifsError:
            staging.path(staged_id).unlink(missing_ok=True)
            return None
        if staged.size == size:
            return staged
        staging.remove(staged)  # the manifest itself, read as a file's content (see Filesystem._whole_content)
        return None

    async def stage(self, token: str, staging: Staging) -> StagedFile:
        """The whole file in a new staged file (for a write to a file stored as parts): the whole
        content this mount uploaded last, moved out of the cache (the write-back caches it under
        the manifest's token, as for any file), else assembled from the verified parts."""
        m = await self.manifest(token)
        staged = self.stage_cached(token, m.total, staging)
        if staged is not None:
            self.changes.based(staged.id, token, m)
            return staged
        staged = staging.create()
        try:
            for i in range(len(m.parts)):
                if m.parts[i].is_hole:  # stays one in the staged file
                    continue
                sealed = await self.part(m, i)
                pos = m.span(i)[0]
                for piece in sealed.chunks():
                    staged.write(pos, piece, 0)  # a copy, not a change: no time recorded
                    pos += len(piece)
            if staged.size < m.total:  # the file ends in a hole
                staged.sealed.truncate(m.total, stamp=0)
        except BaseException:
            staging.remove(staged)
            raise
        self.changes.based(staged.id, token, m)
        return staged

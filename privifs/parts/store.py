"""The client-level parts layer: store a file as part tokens plus a manifest token, read a byte
range of such a file fetching and verifying only the parts it needs, and collect part tokens
no manifest names (an old version, or a store that stopped between its parts and its manifest).

Parts are uploaded before the manifest that names them, several in flight. Every part is checked
twice before a byte of it is handed out: its GCM tag (by :class:`~privifs.client.vault.Vault`) and
its keyed digest in the manifest (:func:`privifs.parts.format.part_digest`), so a part swapped,
replaced or missing raises :class:`~privifs.errors.IntegrityError` or
:class:`~privifs.errors.NotFoundError`.
"""

from __future__ import annotations

import hmac
import logging
import re
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import trio

from privifs.client.datatokens import DataTokens, FileMeta, whole_listing
from privifs.client.shapes import TokenInfo
from privifs.client.vault import Reader, Vault
from privifs.crypto import digest
from privifs.errors import IntegrityError, PrivifsError, VaultError, single_error
from privifs.fs.tokenmeta import split_context
from privifs.parts import format as fmt
from privifs.zeros import all_zero

log = logging.getLogger("privifs.parts")

MiB = 1024 * 1024
PART_SIZE = 4 * MiB  # see docs/format.md, "Why these sizes"
THRESHOLD = 8 * MiB  # files larger than this are stored as parts
IN_FLIGHT = 4
COLLECT_MIN_AGE = 3600.0  # a part younger than this may belong to a store still uploading

Source = Callable[[], AsyncIterator[bytes]]


BIG_MANIFEST = 20_000  # parts (an 80 GiB file): coded on a worker thread, not the event loop


async def _off_loop(fn, arg, parts: int):
    """``fn(arg)``, on a worker thread when the manifest has many parts (a 4 TiB file's takes
    half a second, which would stall every request meanwhile)."""
    return fn(arg) if parts < BIG_MANIFEST else await trio.to_thread.run_sync(fn, arg)


PART_NAME = re.compile(r"[0-9a-f]{16}-[0-9]{1,10}")  # <upload id>-<index>, as put_part names a part


def is_part(info: TokenInfo) -> bool:
    """A part privifs stored: in the parts context and named as :meth:`PartStore.put_part_from`
    names one. Another application's token in that context is not one, and no sweep deletes it."""
    return PART_NAME.fullmatch(info.file_name or "") is not None and split_context(info.context) == split_context(
        fmt.PARTS_CONTEXT
    )


def is_manifest(info: TokenInfo) -> bool:
    return fmt.is_manifest_risk(info.risk)


class PartStore:
    def __init__(self, vault: Vault, *, part_size: int = PART_SIZE, in_flight: int = IN_FLIGHT):
        self.vault = vault
        self.tokens: DataTokens = vault.tokens
        self._digest_key = vault.derive(fmt.part_key)
        self._content_key = vault.derive(digest.content_key)  # the manifest's own digest
        self.part_size = part_size
        self.in_flight = in_flight
        self.parts_fetched = 0  # part downloads, for tests and measurements

    def __repr__(self) -> str:
        return "PartStore(<key hidden>)"

    # -- store ---------------------------------------------------------------------------------
    async def _store_blob(self, data: bytes | memoryview, meta: FileMeta) -> str:
        sealed = self.vault.seal(bytes(data))
        return await self.tokens.store(sealed, len(sealed), meta)

    async def put_part(self, upload_id: str, index: int, data: bytes | memoryview) -> fmt.Part:
        view = memoryview(data)
        return await self.put_part_from(upload_id, index, len(view), lambda offset, n: view[offset : offset + n])

    async def put_part_from(self, upload_id: str, index: int, size: int, read: Reader) -> fmt.Part:
        """Store part ``index`` of ``size`` bytes that ``read(offset, length)`` hands out (called
        on a worker thread, :data:`~privifs.client.vault.PIECE` bytes at a time, and again from
        the start if the store is retried; it may return a view valid until that thread's next
        read). Each piece is digested and encrypted there as the part uploads
        (:meth:`~privifs.client.vault.Vault.put_from`), so no copy of the whole part, plaintext
        or ciphertext, is ever held."""
        meta = FileMeta(f"{upload_id}-{index}", "", fmt.PARTS_CONTEXT, size, f"{fmt.PARTS_CONTEXT}/{upload_id}-{index}")
        macs = []

        def watch():
            mac = fmt.part_hasher(self._digest_key, index)  # each attempt starts a new digest
            macs.append(mac)
            return mac.update

        token = await self.vault.put_from(read, size, meta, watch)
        return fmt.Part(token, size, macs[-1].digest())  # the attempt that stored it sent every byte

    async def put(self, source: Source, size: int, meta: FileMeta) -> str:
        """Store ``size`` bytes from ``source()`` as parts, then the manifest at ``meta``'s place;
        returns the manifest's token. Parts of a failed store are left for :meth:`collect`."""
        upload_id = secrets.token_hex(8)
        count = fmt.parts_needed(size, self.part_size)
        parts: list[fmt.Part | None] = [None] * count
        limit = trio.Semaphore(self.in_flight)

        async def one(index: int, data: bytes) -> None:
            try:  # a part of zeros is a hole: nothing to upload (a sparse file's gap)
                parts[index] = fmt.hole(len(data)) if all_zero(data) else await self.put_part(upload_id, index, data)
            finally:
                limit.release()

        buf = bytearray()
        index = total = 0
        with single_error():
            async with trio.open_nursery() as nursery:
                async for chunk in source():
                    total += len(chunk)
                    if total > size:
                        raise IntegrityError(f"the source grew while it was being stored ({total} > {size} bytes)")
                    buf += chunk
                    while len(buf) >= self.part_size:
                        await limit.acquire()
                        nursery.start_soon(one, index, bytes(buf[: self.part_size]))
                        del buf[: self.part_size]
                        index += 1
                if total != size:
                    raise IntegrityError(
                        f"the source changed while it was being stored ({total} bytes instead of {size})"
                    )
                if buf:
                    await limit.acquire()
                    nursery.start_soon(one, index, bytes(buf))
        return await self.put_manifest(fmt.Manifest(self.part_size, size, tuple(parts)), meta)

    async def put_manifest(self, manifest: fmt.Manifest, meta: FileMeta, risk: dict[str, str] | None = None) -> str:
        """Store the manifest at ``meta``'s place (its size: the file's) and mark it in its risk meta,
        with the digest of its encoding (privifs.crypto.digest: a manifest swapped with another
        file's, or served for another token, is refused)."""
        meta.size = manifest.total
        encoded = await _off_loop(fmt.encode, manifest, len(manifest.parts))
        token = await self._store_blob(encoded, meta)
        risk = {} if risk is None else risk
        risk[fmt.MARK] = str(manifest.version)  # (the caller's dict too: what it records is what was stored)
        risk.update(digest.stated(self._content_key, encoded))
        try:
            await self.tokens.set_risk(token, risk)
        except VaultError as exc:
            # the token exists (unmarked, or marked by a command whose answer was lost): the
            # caller deletes it; left, it stayed at the file's place, older than the retry's
            exc.made = token
            raise
        return token

    # -- read ----------------------------------------------------------------------------------
    async def manifest(self, token: str, risk: dict[str, str] | None = None) -> fmt.Manifest:
        """The manifest ``token`` holds; IntegrityError if it is not the one ``risk`` (the token's
        risk meta, when the caller has it) states."""
        return await self.decode_manifest(await self.vault.get_bytes(token), risk)

    async def decode_manifest(self, data: bytes, risk: dict[str, str] | None = None) -> fmt.Manifest:
        """The manifest ``data`` encodes, checked against ``risk`` as :meth:`manifest` does."""
        if risk:
            digest.check_whole(self._content_key, risk, data)
        return await _off_loop(fmt.decode, data, len(data) // 40)

    async def get_part(self, manifest: fmt.Manifest, index: int) -> bytes:
        """Part ``index``'s plaintext, verified against the manifest (IntegrityError if not)."""
        part = manifest.parts[index]
        if part.is_hole:
            return bytes(part.size)
        self.parts_fetched += 1
        data = await self.vault.get_bytes(part.token)
        self.check_part(manifest, index, data)
        return data

    def check_part(self, manifest: fmt.Manifest, index: int, data: bytes | memoryview) -> None:
        part = manifest.parts[index]
        if len(data) != part.size:
            raise IntegrityError(f"part {index} holds {len(data)} bytes, the manifest says {part.size}")
        if not hmac.compare_digest(fmt.part_digest(self._digest_key, index, data), part.digest):
            raise IntegrityError(f"part {index} does not match its digest in the manifest (replaced or swapped)")

    async def read(self, manifest: fmt.Manifest, offset: int, length: int) -> bytes:
        """Bytes [offset, offset+length) of the file, fetching only the parts they touch."""
        touched = manifest.touched(offset, length)
        got: dict[int, bytes] = {}
        limit = trio.CapacityLimiter(self.in_flight)

        async def one(i: int) -> None:
            async with limit:
                got[i] = await self.get_part(manifest, i)

        with single_error():
            async with trio.open_nursery() as nursery:
                for i in touched:
                    nursery.start_soon(one, i)
        out = bytearray()
        end = min(offset + length, manifest.total)
        for i in touched:
            start, stop = manifest.span(i)
            out += got[i][max(offset, start) - start : min(end, stop) - start]
        return bytes(out)

    async def copy(self, manifest: fmt.Manifest, write: Callable[[bytes], Awaitable[None]]) -> None:
        """Hand the whole file to ``write`` part by part, in order, each verified before it is
        written; the next parts download meanwhile (``in_flight`` at most)."""
        count = len(manifest.parts)
        ready: list[trio.Event] = [trio.Event() for _ in range(count)]
        got: dict[int, bytes] = {}
        room = trio.Semaphore(self.in_flight)

        async def fetch(i: int) -> None:
            got[i] = await self.get_part(manifest, i)
            ready[i].set()

        async def fetch_all(nursery: trio.Nursery) -> None:
            for i in range(count):
                await room.acquire()
                nursery.start_soon(fetch, i)

        with single_error():
            async with trio.open_nursery() as nursery:
                nursery.start_soon(fetch_all, nursery)
                for i in range(count):
                    await ready[i].wait()
                    data = got.pop(i)
                    room.release()
                    await write(data)

    # -- delete and collect --------------------------------------------------------------------
    async def delete(self, token: str, manifest: fmt.Manifest | None) -> None:
        """Delete a manifest token, then the parts it names that are privifs's parts and that no
        other manifest names (a part left behind is collected later). A manifest can name any
        token: one another application wrote naming an ordinary file deleted that file (helper
        hAG F1), and a copy of a manifest lost its parts with the original."""
        await self.tokens.delete(token)
        mine = set(manifest.tokens()) if manifest else set()
        if not mine:
            return
        infos = [i async for i in self.tokens.list()]
        try:
            going = await self.unreferenced(infos, min_age=0)
        except PrivifsError:
            return  # a manifest that cannot be read protects what it may name: left to collection
        for info in going:
            if info.token in mine:
                await self.tokens.delete(info.token)

    async def unreferenced(
        self, infos: list[TokenInfo], *, min_age: float = COLLECT_MIN_AGE, now: float | None = None
    ) -> list[TokenInfo]:
        """The part tokens of ``infos`` (a whole listing) that no manifest in it names and that
        are older than ``min_age`` seconds. A manifest that cannot be read protects nothing, so
        it stops the collection (IntegrityError) rather than let its parts go."""
        named: set[str] = set()
        for info in infos:
            if is_manifest(info) and not is_part(info):
                named.update((await self.manifest(info.token, info.risk)).tokens())
            elif maybe_unmarked_manifest(info):
                named.update(await self.unmarked_parts(info))
        now = time.time() if now is None else now
        return [
            i
            for i in infos
            if is_part(i) and i.token not in named and (i.created_at is None or now - i.created_at >= min_age)
        ]

    async def unmarked_parts(self, info: TokenInfo) -> frozenset[str]:
        """The parts ``info`` names if it is a manifest whose mark is missing (its writer was
        killed between configure-file-meta and the risk meta write, or another application
        replaced the risk meta), empty if it is not one. Collection counted only marked
        manifests: an unmarked one's parts were collected after an hour and its file read as EIO
        for good, unless its writer came back within that hour to adopt it. At most
        :data:`~privifs.parts.format.PEEK` bytes are downloaded (a longer token is no manifest);
        a token that does not decrypt names nothing readable."""
        manifest = await self.unmarked_manifest(info)
        return frozenset(manifest.tokens()) if manifest is not None else frozenset()

    async def unmarked_manifest(self, info: TokenInfo) -> fmt.Manifest | None:
        """The manifest ``info`` holds if it is one whose mark is missing (see
        :meth:`unmarked_parts`), else None (also for a token that does not decrypt: the caller's
        check of it as a whole token says so)."""
        sink = _PeekSink(fmt.PEEK)
        try:
            size = await self.vault.get(info.token, sink)
        except (_TooLong, IntegrityError):
            return None
        return fmt.unmarked(size, info.size, sink.value)

    async def collect(self, *, min_age: float = COLLECT_MIN_AGE) -> int:
        """Delete unreferenced parts; returns how many."""
        infos = [i async for i in self.tokens.list()]
        gone = await self.unreferenced(infos, min_age=min_age)
        if gone:  # a manifest the listing skipped (a deletion while it was read) names them?
            whole = await whole_listing(self.tokens)  # (None: its end cannot be told: nothing goes)
            again = {i.token for i in await self.unreferenced(whole or [], min_age=min_age)}
            gone = [i for i in gone if i.token in again]
        for info in gone:
            await self.tokens.delete(info.token)
        if gone:
            log.info("collected %d part tokens no manifest names", len(gone))
        return len(gone)


def maybe_unmarked_manifest(info: TokenInfo) -> bool:
    """Whether ``info`` may be a manifest that lost its mark: a token at a file's place, not
    marked, whose meta states a size only files stored as parts have."""
    return not is_manifest(info) and not is_part(info) and info.size is not None and info.size > THRESHOLD


class _TooLong(Exception):
    """A token looked at as a possible manifest is longer than any manifest."""


class _PeekSink:
    """A PlaintextSink keeping up to ``limit`` bytes; past them it stops the download."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._kept: list[bytes] = []
        self._size = 0

    async def write(self, data: bytes | memoryview) -> None:
        self._size += len(data)
        if self._size > self.limit:
            raise _TooLong()
        self._kept.append(bytes(data))

    async def reset(self) -> None:
        self._kept, self._size = [], 0

    def value(self) -> bytes:
        return b"".join(self._kept)

"""The read cache: verified content of tokens, sealed (never plaintext) in a diskcache.

One cache entry per token (content never changes under a token), holding a sealed file whose
chunks decrypt independently, so a random read of a cached 1 GiB file decrypts only the 64 KiB
chunks it touches. Entries are evicted least-recently-used beyond the size limit; unuploaded
data lives in staging, never here, so eviction cannot lose it.

A download is shared: concurrent readers of the same uncached token wait for one fetch. Its
plaintext goes into a sealed file under ``incoming/`` and enters the cache (by rename, see
:class:`AdoptingDisk`) only after the whole blob's GCM tag verified.
"""
from __future__ import annotations

import logging
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

import diskcache
import trio

from privifs.client.vault import Vault
from privifs.crypto.sealed import CHUNK, SealedFile
from privifs.errors import single_error

log = logging.getLogger("privifs.fs.cache")


@dataclass
class AdoptFile:
    """A value that moves an existing file into the cache instead of copying it."""

    path: str


class AdoptingDisk(diskcache.Disk):
    def store(self, value, read, key=diskcache.core.UNKNOWN):
        if isinstance(value, AdoptFile):
            filename, full_path = self.filename(key, value)
            os.makedirs(os.path.dirname(full_path), exist_ok=True)
            os.rename(value.path, full_path)
            return os.path.getsize(full_path), diskcache.core.MODE_BINARY, filename, None
        return super().store(value, read, key)


class SealedSink:
    """Receives plaintext in arbitrary pieces and writes whole chunks into a sealed file.

    Sealing and writing a piece runs on a worker thread while the next piece downloads (one
    piece in flight), so the network and the disk work at the same time."""

    def __init__(self, sealed: SealedFile, nursery: trio.Nursery):
        self.sealed = sealed
        self.nursery = nursery
        self.pending: list[bytes] = []
        self.pending_len = 0
        self.index = 0
        self.total = 0
        self._done: trio.Event | None = None
        self._error: BaseException | None = None

    def _write(self, index: int, data: bytes) -> None:
        view = memoryview(data)
        for off in range(0, len(view), CHUNK):
            self.sealed.write_chunk(index, view[off:off + CHUNK])
            index += 1

    async def _job(self, index: int, data: bytes, done: trio.Event) -> None:
        try:
            await trio.to_thread.run_sync(self._write, index, data)
        except BaseException as exc:  # noqa: BLE001 - handed to the next write()/finish()
            self._error = exc
        finally:
            done.set()

    async def _wait(self) -> None:
        if self._done is not None:
            await self._done.wait()
            self._done = None
        if self._error is not None:
            raise self._error

    async def _submit(self, index: int, data: bytes) -> None:
        await self._wait()
        self._done = trio.Event()
        self.nursery.start_soon(self._job, index, data, self._done)

    async def reset(self) -> None:
        await self._wait()
        self.pending.clear()
        self.pending_len = 0
        self.index = 0
        self.total = 0
        self.sealed.truncate(0)

    BATCH = 16 * CHUNK

    async def write(self, data: bytes) -> None:
        self.total += len(data)
        self.pending.append(data)
        self.pending_len += len(data)
        if self.pending_len < self.BATCH:
            return
        data = b"".join(self.pending)
        self.pending.clear()
        whole = len(data) - len(data) % CHUNK
        self.pending_len = len(data) - whole
        if self.pending_len:
            self.pending.append(data[whole:])
        await self._submit(self.index, data[:whole] if whole < len(data) else data)
        self.index += whole // CHUNK

    async def finish(self) -> None:
        if self.pending:
            await self._submit(self.index, b"".join(self.pending))  # ends with a short chunk
            self.pending.clear()
            self.pending_len = 0
        await self._wait()
        self.sealed.size = self.total
        self.sealed.write_header()


class ContentCache:
    def __init__(self, directory: Path, size_limit: int, key: bytes):
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.incoming = directory / "incoming"
        for leftover in self.incoming.glob("*") if self.incoming.exists() else ():
            leftover.unlink(missing_ok=True)
        self.incoming.mkdir(exist_ok=True, mode=0o700)
        self.size_limit = size_limit
        self._key = key
        self.cache = diskcache.Cache(str(directory / "entries"), size_limit=size_limit,
                                     eviction_policy="least-recently-used", disk=AdoptingDisk,
                                     cull_limit=100, statistics=False)
        self._inflight: dict[str, trio.Event] = {}
        self.downloads = 0

    def close(self) -> None:
        self.cache.close()

    def open(self, token: str) -> SealedFile | None:
        f = self.cache.get(token, read=True)
        if f is None:
            return None
        try:
            return SealedFile.open(f.name, self._key)
        except OSError:
            return None  # evicted between the lookup and the open
        finally:
            f.close()

    def contains(self, token: str) -> bool:
        return token in self.cache

    async def fetch(self, token: str, vault: Vault, size: int | None = None) -> SealedFile:
        """The token's content, downloading and verifying it once for all concurrent callers."""
        while True:
            sealed = self.open(token)
            if sealed is not None:
                return sealed
            event = self._inflight.get(token)
            if event is None:
                break
            await event.wait()
            if token not in self.cache:
                # the shared download failed: each waiter tries (and reports) on its own
                break
        event = trio.Event()
        self._inflight[token] = event
        path = self.incoming / secrets.token_hex(12)
        sealed = SealedFile.create(path, self._key)
        try:
            self.downloads += 1
            with single_error():
                async with trio.open_nursery() as nursery:
                    sink = SealedSink(sealed, nursery)
                    await vault.get(token, sink, size=size)
                    await sink.finish()
            if os.path.getsize(path) > self.size_limit:
                # larger than the whole cache: serve this reader from a private, unlinked copy
                path.unlink()
                return sealed
            sealed.close()
            self.adopt(token, str(path))
        except BaseException:
            sealed.close()
            path.unlink(missing_ok=True)
            raise
        finally:
            del self._inflight[token]
            event.set()
        opened = self.open(token)
        if opened is None:
            return await self.fetch(token, vault, size)  # evicted at once by a concurrent insert
        return opened

    def adopt(self, token: str, path: str) -> bool:
        """Move a sealed file holding ``token``'s content into the cache (False: too large)."""
        if os.path.getsize(path) > self.size_limit:
            os.unlink(path)
            return False
        self.cache.set(token, AdoptFile(path))
        return True

    def evict(self, token: str) -> None:
        self.cache.delete(token)

    def clear(self) -> None:
        self.cache.clear()

    def volume(self) -> int:
        return self.cache.volume()

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

from privifs.client.sinks import BlockWriter
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


class SealedSink(BlockWriter):
    """Seals downloaded plaintext chunk by chunk into a cache file, on a worker thread while the
    next block downloads."""

    def __init__(self, sealed: SealedFile, nursery: trio.Nursery):
        super().__init__(nursery, block=16 * CHUNK)  # whole chunks: each block starts a chunk
        self.sealed = sealed

    def _write_block(self, offset: int, data: bytes) -> None:
        view = memoryview(data)
        index = offset // CHUNK
        for off in range(0, len(view), CHUNK):
            self.sealed.write_chunk(index, view[off:off + CHUNK])
            index += 1

    def _restart(self) -> None:
        self.sealed.truncate(0)

    async def finish(self) -> None:
        await super().finish()
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
            if not self.adopt(token, str(path)):
                return sealed  # larger than the whole cache: this reader keeps a private, unlinked copy
            sealed.close()
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

    def volume(self) -> int:
        return self.cache.volume()

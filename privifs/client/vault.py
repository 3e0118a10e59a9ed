"""Client-side encryption wrapped around data tokens: the transport below never sees plaintext,
the cipher never sees HTTP.

Payloads are AES-256-GCM in the vault's wire format with a fresh random IV per store (a retried
store re-encrypts with a new IV). Large payloads are encrypted while they upload and verified
while they download, in 1 MiB pieces, so memory stays bounded. Plaintext handed to a
:class:`PlaintextSink` during a retrieval is *unverified* until :meth:`Vault.get` returns: sinks
must keep it private and discard it on :meth:`PlaintextSink.reset` or when ``get`` raises.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Protocol

import trio

from privifs.client.datatokens import DataTokens, FileMeta
from privifs.crypto import wire
from privifs.errors import IntegrityError

PIECE = 1024 * 1024
SPARE_BUFFERS = 16  # ciphertext buffers of put_from kept for the next stores

Source = Callable[[], AsyncIterator[bytes]]
Reader = Callable[[int, int], bytes | memoryview]  # (offset, length) → plaintext, on a worker thread
Watch = Callable[[], Callable[[memoryview], None]]  # per attempt: what sees each plaintext piece


class PlaintextSink(Protocol):
    async def write(self, data: bytes | memoryview) -> None:
        """Take the next piece; it may be a view valid only during the call (copy what you keep)."""

    async def reset(self) -> None: ...


class InPlaceSink(PlaintextSink, Protocol):
    """A sink that may take the plaintext where it keeps it: :meth:`space` gives memory for the
    next piece, decrypted there and announced by :meth:`wrote` (no :meth:`write`, no copy)."""

    def space(self, n: int) -> memoryview | None:
        """Room for the next ``n`` bytes plus :data:`~privifs.crypto.wire.SLACK`, or None (then
        the piece comes by :meth:`write`)."""

    async def wrote(self, n: int) -> None: ...


class BytesSink:
    def __init__(self) -> None:
        self.parts: list[bytes] = []

    async def write(self, data: bytes | memoryview) -> None:
        self.parts.append(bytes(data))

    async def reset(self) -> None:
        self.parts.clear()

    def value(self) -> bytes:
        return b"".join(self.parts)


class Vault:
    def __init__(self, tokens: DataTokens, key: bytes):
        if len(key) != 32:
            raise ValueError("AES-256 needs a 32-byte key")
        self.tokens = tokens
        self._key = key
        self._buffers: list[bytearray] = []  # put_from's ciphertext buffers, reused (trio thread only)

    def __repr__(self) -> str:
        return "Vault(<key hidden>)"

    def seal(self, data: bytes) -> bytes:
        """``data`` in the wire format under the vault's key, with a fresh IV."""
        return wire.seal(self._key, data)

    def derive(self, kdf: Callable[[bytes], bytes]) -> bytes:
        """A subkey ``kdf`` derives from the vault's key (e.g. the key of part digests)."""
        return kdf(self._key)

    async def put_bytes(self, data: bytes, meta: FileMeta) -> str:
        meta.size = len(data)
        sealed = wire.seal(self._key, data)
        if len(sealed) <= self.tokens.options.inline_limit:
            return await self.tokens.store(sealed, len(sealed), meta)

        async def once() -> AsyncIterator[bytes]:
            yield data

        return await self.put_stream(once, len(data), meta)

    async def put_stream(self, source: Source, size: int, meta: FileMeta) -> str:
        """Store ``size`` plaintext bytes produced by ``source()`` (called again on a retry)."""
        meta.size = size
        wire_size = size + wire.OVERHEAD
        if wire_size <= self.tokens.options.inline_limit:
            data = b"".join([c async for c in source()])
            _check_size(len(data), size)
            return await self.tokens.store(wire.seal(self._key, data), wire_size, meta)

        def body() -> AsyncIterator[bytes]:
            return self._encrypting(source(), size)

        return await self.tokens.store(body, wire_size, meta)

    async def put_from(self, read: Reader, size: int, meta: FileMeta, watch: Watch | None = None) -> str:
        """Store ``size`` plaintext bytes that ``read(offset, length)`` hands out on a worker
        thread (:data:`PIECE` at a time, from the start again on a retry; it may return a view
        valid until the thread's next read). Each piece is read, shown to ``watch()``'s callable
        (a fresh one per attempt: e.g. a digest) and encrypted into a reused buffer in one
        worker-thread call, and that buffer goes to the upload as it is: no fresh memory per
        piece (new pages are dear on a VM) and one thread hop per piece."""
        meta.size = size
        wire_size = size + wire.OVERHEAD
        if wire_size <= self.tokens.options.inline_limit:
            see = watch() if watch is not None else None

            def whole() -> bytes:
                data = bytes(read(0, size))
                if see is not None:
                    see(memoryview(data))
                return data

            data = await trio.to_thread.run_sync(whole)
            _check_size(len(data), size)
            return await self.tokens.store(wire.seal(self._key, data), wire_size, meta)
        return await self.tokens.store(lambda: self._sealing(read, size, watch), wire_size, meta)

    async def _sealing(self, read: Reader, size: int, watch: Watch | None) -> AsyncIterator[memoryview | bytes]:
        """One attempt of :meth:`put_from`: the wire format's pieces; each ciphertext piece is a
        view of one buffer, valid until the next is asked for."""
        see = watch() if watch is not None else None
        sealer = wire.StreamSealer(self._key)
        buf = self._buffers.pop() if self._buffers else bytearray(PIECE + wire.UPDATE_SLACK)
        view = memoryview(buf)

        def seal_piece(offset: int, n: int) -> int:
            data = read(offset, n)
            _check_size(offset + len(data), offset + n)
            if see is not None:
                see(data)
            return sealer.update_into(data, buf)

        try:
            yield sealer.header
            for offset in range(0, size, PIECE):
                n = await trio.to_thread.run_sync(seal_piece, offset, min(PIECE, size - offset))
                yield view[:n]
            yield sealer.finalize()
        finally:
            if len(self._buffers) < SPARE_BUFFERS:
                self._buffers.append(buf)

    async def _encrypting(self, chunks: AsyncIterator[bytes], size: int) -> AsyncIterator[bytes]:
        sealer = wire.StreamSealer(self._key)
        yield sealer.header
        total = 0
        async for chunk in chunks:
            total += len(chunk)
            if total > size:
                raise IntegrityError(f"the source grew while it was being stored ({total} > {size} bytes)")
            if chunk:
                yield sealer.update(chunk)
        _check_size(total, size)
        yield sealer.finalize()

    async def get(self, token: str, sink: PlaintextSink, *, size: int | None = None) -> int:
        """Retrieve and decrypt ``token`` into ``sink``; returns the plaintext size once the tag verified."""
        written = 0

        async def consume(chunks: AsyncIterator[bytes]) -> None:
            nonlocal written
            await sink.reset()
            written = 0
            opener = wire.StreamOpener(self._key)
            space = getattr(sink, "space", None)
            async for chunk in chunks:
                room = None if space is None else space(len(chunk))
                if room is not None:  # decrypted where the sink keeps it
                    n = opener.update_into(chunk, room)
                    if n:
                        written += n
                        await sink.wrote(n)
                    continue
                out = opener.update(chunk)
                if out:
                    written += len(out)
                    await sink.write(out)
            out = opener.finalize()
            if out:
                written += len(out)
                await sink.write(out)

        await self.tokens.fetch(token, consume, wire_size=None if size is None else size + wire.OVERHEAD)
        return written

    async def get_bytes(self, token: str) -> bytes:
        sink = BytesSink()
        await self.get(token, sink)
        return sink.value()


def _check_size(actual: int, expected: int) -> None:
    if actual != expected:
        raise IntegrityError(f"the source changed while it was being stored ({actual} bytes instead of {expected})")

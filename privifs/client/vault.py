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

from privifs.client.datatokens import DataTokens, FileMeta
from privifs.crypto import wire
from privifs.errors import IntegrityError

PIECE = 1024 * 1024

Source = Callable[[], AsyncIterator[bytes]]


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

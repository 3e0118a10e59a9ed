"""Plaintext sinks that write a retrieval to disk on a worker thread while it downloads.

:meth:`privifs.client.vault.Vault.get` hands its sink plaintext in network-sized pieces (64 KiB).
Writing each from the trio thread stalls the download on the disk (first-touch page allocation
makes a new file slow to write on VMs), and a thread hop per piece costs more than the write.
A :class:`BlockWriter` copies pieces into a block buffer and writes each full block on a worker
thread while the next one fills: one block in flight, so the network and the disk overlap, and
two reused buffers are all the memory it takes. Subclasses say how a block lands (:meth:`BlockWriter._write_block`).
A retrieval whose plaintext is kept in memory anyway (a part of a big file) can be given that
memory as ``target``: its blocks are filled in place there, so the plaintext is copied once, not
once into a block and again into the copy kept.
"""

from __future__ import annotations

from collections.abc import Callable

import trio

from privifs.crypto.wire import SLACK


class BlockWriter:
    """A :class:`~privifs.client.vault.PlaintextSink` writing blocks of ``block`` bytes (only
    the last may be shorter) on a worker thread, one at a time.

    Pieces are copied into two block buffers used in turn (one filling, one being written), so
    a retrieval allocates nothing per piece; with a ``target`` (a multiple of ``block`` bytes)
    they go in place, each whole block of it a block (decrypted there when the retrieval asks
    :meth:`space`; bytes past its whole blocks are room for that), and only what goes past its
    whole blocks uses the block buffers. A failed write is raised by the next :meth:`write` or by :meth:`finish`;
    call ``finish`` after ``Vault.get`` returns, inside the nursery given."""

    def __init__(self, nursery: trio.Nursery, *, block: int = 1 << 20, target: bytearray | None = None):
        self.nursery = nursery
        self.block = block
        self._target = target
        self._buffers: tuple[bytearray, bytearray] | None = None  # allocated when first needed
        self._current = 0  # the buffer being filled (when not in the target)
        self._fill = 0
        self._offset = 0  # where the next block goes
        self._done: trio.Event | None = None
        self._error: BaseException | None = None
        self._buf = self._next_buffer()
        self.on_data: Callable[[int], None] | None = None  # called with each piece's size as it arrives (a watchdog)

    def _next_buffer(self) -> memoryview | None:
        """Where the block at ``_offset`` fills: its region of the target, else a block buffer
        (the other one than the block being written)."""
        if self._target is not None and self._offset + self.block <= len(self._target):  # a whole block
            return memoryview(self._target)[self._offset : self._offset + self.block]
        if self._target is not None and self._buffers is None:
            return None  # past the target: the block buffers only if more comes
        if self._buffers is None:
            self._buffers = (bytearray(self.block), bytearray(self.block))
        self._current ^= 1
        return memoryview(self._buffers[self._current])

    def _write_block(self, offset: int, data: memoryview) -> None:
        """Write ``data`` at ``offset`` (runs on a worker thread)."""
        raise NotImplementedError

    def _restart(self) -> None:
        """Forget everything written so far (the retrieval starts over)."""
        raise NotImplementedError

    async def _job(self, offset: int, data: memoryview, done: trio.Event) -> None:
        try:
            await trio.to_thread.run_sync(self._write_block, offset, data)
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

    async def _flush(self) -> None:
        """Hand the filled buffer to a worker (once the other one is written) and switch."""
        await self._wait()
        data = self._buf[: self._fill]
        self._done = trio.Event()
        self.nursery.start_soon(self._job, self._offset, data, self._done)
        self._offset += self._fill
        self._fill = 0
        self._buf = self._next_buffer()

    async def reset(self) -> None:
        await self._wait()
        self._fill = 0
        self._offset = 0
        self._buf = self._next_buffer()
        self._restart()

    @property
    def total(self) -> int:
        """Plaintext bytes received since the last reset."""
        return self._offset + self._fill

    def space(self, n: int) -> memoryview | None:
        """Room in the target for the next ``n`` bytes (and ``wire.SLACK`` past them), where they
        are decrypted in place (:meth:`privifs.client.vault.Vault.get`); None once the blocks
        fill elsewhere or the target's whole blocks cannot take them."""
        target = self._target
        if target is None or self._buf is None or self._buf.obj is not target:
            return None
        start = self._offset + self._fill
        if start + n > len(target) // self.block * self.block or start + n + SLACK > len(target):
            return None
        return memoryview(target)[start : start + n + SLACK]

    async def wrote(self, n: int) -> None:
        """``n`` bytes were put where :meth:`space` said."""
        if self.on_data is not None:
            self.on_data(n)
        self._fill += n
        while self._fill >= self.block:  # the target's blocks follow each other: the rest is in place
            rest = self._fill - self.block
            self._fill = self.block
            await self._flush()
            self._fill = rest

    async def write(self, data: bytes | memoryview) -> None:
        if self.on_data is not None:
            self.on_data(len(data))
        view = memoryview(data)
        while view:
            if self._buf is None:  # more than the target holds
                self._buffers = (bytearray(self.block), bytearray(self.block))
                self._buf = memoryview(self._buffers[self._current])
            n = min(len(view), self.block - self._fill)
            self._buf[self._fill : self._fill + n] = view[:n]
            self._fill += n
            view = view[n:]
            if self._fill == self.block:
                await self._flush()

    async def finish(self) -> None:
        """Write what is left and wait until every block is written."""
        if self._fill:
            await self._flush()
        await self._wait()


class CheckedSink:
    """Passes a retrieval on to ``sink`` after showing each piece to ``check`` (a
    :class:`privifs.crypto.digest.ContentCheck`); the caller asks ``check.verify()`` once the
    retrieval is complete, before it trusts what ``sink`` got."""

    def __init__(self, sink, check) -> None:
        self.sink, self.check = sink, check
        self._offset = 0

    async def write(self, data: bytes | memoryview) -> None:
        self.check.block(self._offset, memoryview(data))
        self._offset += len(data)
        await self.sink.write(data)

    async def reset(self) -> None:
        self.check.restart()
        self._offset = 0
        await self.sink.reset()


async def get_checked(vault, token: str, sink, check, *, size: int | None) -> None:
    """Retrieve ``token`` through ``vault`` (a :class:`privifs.client.vault.Vault`) into ``sink``;
    with ``check`` (a :class:`privifs.crypto.digest.ContentCheck`; None: the token states no
    digest) every piece is shown to it, and IntegrityError unless the content is the one its
    token states. ``size`` (the meta's) bounds the download only with ``check``: another
    application's meta size is a claim, and content larger than it is still that content."""
    if check is None:
        await vault.get(token, sink, size=None)
        return
    await vault.get(token, CheckedSink(sink, check), size=size)
    check.verify()

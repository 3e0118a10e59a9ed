"""Plaintext sinks that write a retrieval to disk on a worker thread while it downloads.

:meth:`privifs.client.vault.Vault.get` hands its sink plaintext in network-sized pieces (64 KiB).
Writing each from the trio thread stalls the download on the disk (first-touch page allocation
makes a new file slow to write on VMs), and a thread hop per piece costs more than the write.
A :class:`BlockWriter` gathers pieces into blocks and writes each on a worker thread while the
next one downloads: one block in flight, so the network and the disk overlap and memory stays
at about two blocks. Subclasses say how a block lands (:meth:`BlockWriter._write_block`).
"""
from __future__ import annotations

import trio


class BlockWriter:
    """A :class:`~privifs.client.vault.PlaintextSink` writing blocks of ``block`` bytes (a
    multiple of ``unit``; only the last may be shorter) on a worker thread, one at a time.

    A failed write is raised by the next :meth:`write` or by :meth:`finish`; call ``finish``
    after ``Vault.get`` returns, inside the nursery given here."""

    def __init__(self, nursery: trio.Nursery, *, block: int = 1 << 20, unit: int = 1):
        assert block % unit == 0
        self.nursery = nursery
        self.block = block
        self.unit = unit
        self.total = 0  # plaintext bytes received since the last reset
        self._pending: list[bytes] = []
        self._pending_len = 0
        self._offset = 0  # where the next block goes
        self._done: trio.Event | None = None
        self._error: BaseException | None = None

    def _write_block(self, offset: int, data: bytes) -> None:
        """Write ``data`` at ``offset`` (runs on a worker thread)."""
        raise NotImplementedError

    def _restart(self) -> None:
        """Forget everything written so far (the retrieval starts over)."""
        raise NotImplementedError

    async def _job(self, offset: int, data: bytes, done: trio.Event) -> None:
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

    async def _submit(self, data: bytes) -> None:
        await self._wait()
        self._done = trio.Event()
        self.nursery.start_soon(self._job, self._offset, data, self._done)
        self._offset += len(data)

    async def reset(self) -> None:
        await self._wait()
        self._pending.clear()
        self._pending_len = 0
        self._offset = 0
        self.total = 0
        self._restart()

    async def write(self, data: bytes) -> None:
        self.total += len(data)
        self._pending.append(data)
        self._pending_len += len(data)
        if self._pending_len < self.block:
            return
        data = b"".join(self._pending)
        whole = len(data) - len(data) % self.unit
        rest = data[whole:]
        self._pending = [rest] if rest else []
        self._pending_len = len(rest)
        await self._submit(data if not rest else data[:whole])

    async def finish(self) -> None:
        """Write what is left and wait until every block is on its way to disk."""
        if self._pending:
            await self._submit(b"".join(self._pending))
            self._pending.clear()
            self._pending_len = 0
        await self._wait()

"""``BlockWriter`` (client/sinks.py): blocks written on a worker thread in order, in two reused
buffers or, given a ``target``, in place in it (what a part's download does: its plaintext is
kept in memory, copied once); what goes past the target, and a retrieval that starts over."""

from __future__ import annotations

import os

import pytest
import trio

from privifs.client.sinks import BlockWriter

BLOCK = 64 * 1024


class Recorder(BlockWriter):
    def __init__(self, nursery: trio.Nursery, target: bytearray | None = None):
        super().__init__(nursery, block=BLOCK, target=target)
        self.written: dict[int, bytes] = {}
        self.in_target: list[bool] = []

    def _write_block(self, offset: int, data: memoryview) -> None:
        self.written[offset] = bytes(data)
        self.in_target.append(data.obj is self._target)

    def _restart(self) -> None:
        self.written.clear()
        self.in_target.clear()


def assembled(sink: Recorder) -> bytes:
    return b"".join(sink.written[o] for o in sorted(sink.written))


@pytest.mark.parametrize("use_target", [False, True])
async def test_pieces_of_any_size_land_in_order_in_the_target_or_the_block_buffers(use_target):
    data = os.urandom(3 * BLOCK + 1234)
    target = bytearray(2 * BLOCK) if use_target else None  # smaller than the data: the rest goes past it
    async with trio.open_nursery() as nursery:
        sink = Recorder(nursery, target)
        await sink.write(os.urandom(5000))  # a first attempt, abandoned: the retrieval starts over
        await sink.reset()
        pos = 0
        for size in (1, 700, BLOCK, 3 * BLOCK // 2, 17, len(data)):
            await sink.write(data[pos : pos + size])
            pos += size
        await sink.finish()
    assert assembled(sink) == data and sink.total == len(data)
    assert sorted(sink.written) == [0, BLOCK, 2 * BLOCK, 3 * BLOCK]
    if use_target:
        assert sink.in_target == [True, True, False, False]  # in place while it fits, then the buffers
        assert bytes(target) == data[: 2 * BLOCK]
    else:
        assert not any(sink.in_target)


async def test_a_target_must_hold_whole_blocks():
    async with trio.open_nursery() as nursery:
        with pytest.raises(ValueError):
            Recorder(nursery, bytearray(BLOCK + 1))

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


async def test_pieces_decrypted_in_place_in_the_target_make_its_blocks_and_the_rest_goes_by_write():
    from privifs.crypto.wire import SLACK

    data = os.urandom(2 * BLOCK + 999)
    target = bytearray(2 * BLOCK + SLACK)  # two whole blocks, room to decrypt past them
    async with trio.open_nursery() as nursery:
        sink = Recorder(nursery, target)
        pos = 0
        for size in (100, BLOCK, BLOCK // 2, BLOCK // 2 - 100, 999):
            room = sink.space(size)
            if room is None:  # past the whole blocks: copied into a block buffer
                assert pos + size > 2 * BLOCK
                await sink.write(data[pos : pos + size])
            else:
                assert len(room) == size + SLACK
                room[:size] = data[pos : pos + size]
                await sink.wrote(size)
            pos += size
        assert sink.space(1) is None  # the blocks fill elsewhere now
        await sink.finish()
    assert assembled(sink) == data
    assert sink.in_target == [True, True, False]
    assert bytes(target[: 2 * BLOCK]) == data[: 2 * BLOCK]


@pytest.mark.parametrize("tamper", [False, True])
async def test_a_stream_decrypted_in_place_gives_the_plaintext_and_its_tag_still_decides(tamper):
    """``StreamOpener.update_into`` (what a retrieval into a target uses) gives what ``update``
    gives, whatever the pieces' sizes (the IV and the held-back tag split across them), and a
    changed byte still fails at ``finalize``."""
    from privifs.crypto import wire
    from privifs.errors import IntegrityError

    key = os.urandom(32)
    data = os.urandom(300_001)
    sealed = bytearray(wire.seal(key, data))
    if tamper:
        sealed[len(sealed) // 2] ^= 1
    opener = wire.StreamOpener(key)
    out = bytearray(len(data) + 64)
    n = 0
    pos = 0
    for size in (5, 7, 16, 3, 70_000, 16, 17, 1, len(sealed)):
        piece = bytes(sealed[pos : pos + size])
        pos += size
        n += opener.update_into(piece, memoryview(out)[n : n + len(piece) + wire.SLACK])
    if tamper:
        with pytest.raises(IntegrityError):
            opener.finalize()
    else:
        assert opener.finalize() == b"" and bytes(out[:n]) == data

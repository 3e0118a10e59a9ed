"""The write-back's queue: first in, first out; an inode an fsync waits on goes ahead of the
backlog, is handed out once, and every waiting worker is woken when work arrives."""

from __future__ import annotations

import trio
import trio.testing

from privifs.fs.workqueue import WorkQueue


async def _drain(q: WorkQueue) -> list[int]:
    out = []
    while len(q):
        out.append(await q.get())
    return out


async def test_inodes_come_out_in_the_order_they_were_queued_and_once_each():
    q = WorkQueue()
    for ino in (5, 3, 5, 9, 3):
        q.put(ino)
    assert await _drain(q) == [5, 3, 9]


async def test_an_urgent_inode_goes_ahead_of_the_backlog_and_its_old_place_is_skipped():
    q = WorkQueue()
    for ino in range(1, 101):
        q.put(ino)
    q.put_urgent(70)
    q.put_urgent(70)
    q.put_urgent(200)
    assert await q.get() == 70
    assert await q.get() == 200
    rest = await _drain(q)
    assert rest == [i for i in range(1, 101) if i != 70]


async def test_an_inode_queued_again_after_its_urgent_turn_is_handed_out_again():
    q = WorkQueue()
    q.put(1)
    q.put(2)
    q.put_urgent(2)
    assert await q.get() == 2
    q.put(2)  # changed again while its stale ordinary place still waits
    assert await _drain(q) == [1, 2]


async def test_every_waiting_worker_gets_work_as_it_arrives():
    q = WorkQueue()
    got: list[int] = []

    async def worker():
        got.append(await q.get())

    async with trio.open_nursery() as n:
        for _ in range(3):
            n.start_soon(worker)
        await trio.testing.wait_all_tasks_blocked()
        q.put(1)
        await trio.testing.wait_all_tasks_blocked()
        q.put(2)
        await trio.testing.wait_all_tasks_blocked()
        q.put_urgent(3)
    assert sorted(got) == [1, 2, 3]

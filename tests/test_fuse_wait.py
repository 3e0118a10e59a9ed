"""The trio facade pyfuse3's request loop runs on (privifs/fs/fuse_wait.py), in-process: queued
requests are taken without a pass through trio's scheduler, but never so many in a row that the
daemon's other tasks stop running; an idle descriptor is still waited for; the read lock stays
exclusive."""

from __future__ import annotations

import os

import pyfuse3
import trio

from privifs.fs import fuse_wait


def _pipe_with_data() -> tuple[int, int]:
    r, w = os.pipe()
    os.write(w, b"x")
    return r, w


def test_queued_requests_are_taken_without_a_scheduler_pass_but_not_forever(monkeypatch) -> None:
    real_wait = trio.lowlevel.wait_readable
    waits: list[str] = []

    async def counted(fd: int) -> None:
        waits.append("trio")
        await real_wait(fd)

    monkeypatch.setattr(trio.lowlevel, "wait_readable", counted)
    fake = fuse_wait.facade()
    r, w = _pipe_with_data()
    ran: list[int] = []

    async def other_task() -> None:
        while True:
            ran.append(1)
            await trio.lowlevel.checkpoint()

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(other_task)
            await trio.sleep(0.01)
            for _ in range(3 * (fuse_wait.FAIR_EVERY + 1)):
                before = len(waits)
                await fake.lowlevel.wait_readable(r)
                if len(waits) == before:
                    waits.append("quick")
            nursery.cancel_scope.cancel()

    try:
        trio.run(main)
    finally:
        os.close(r)
        os.close(w)
    assert waits.count("quick") >= 2 * fuse_wait.FAIR_EVERY  # most waits did not leave the task
    # ... but never more than FAIR_EVERY in a row, so the daemon's other tasks get to run
    longest = max(len(run) for run in "".join("q" if w == "quick" else "t" for w in waits).split("t"))
    assert longest <= fuse_wait.FAIR_EVERY
    assert len(ran) > 1


def test_an_idle_descriptor_is_waited_for_until_a_request_arrives() -> None:
    fake = fuse_wait.facade()
    r, w = os.pipe()

    async def main() -> float:
        async with trio.open_nursery() as nursery:

            async def later() -> None:
                await trio.sleep(0.2)
                os.write(w, b"x")

            nursery.start_soon(later)
            start = trio.current_time()
            await fake.lowlevel.wait_readable(r)
            return trio.current_time() - start

    try:
        waited = trio.run(main)
    finally:
        os.close(r)
        os.close(w)
    assert waited >= 0.15


def test_a_closed_descriptor_wakes_its_waiter_as_in_trio() -> None:
    fake = fuse_wait.facade()
    r, w = os.pipe()

    async def main() -> bool:
        async with trio.open_nursery() as nursery:

            async def close_soon() -> None:
                await trio.sleep(0.1)
                fake.lowlevel.notify_closing(r)

            nursery.start_soon(close_soon)
            try:
                await fake.lowlevel.wait_readable(r)
            except fake.ClosedResourceError:
                return True
            return False

    try:
        assert trio.run(main)
    finally:
        os.close(r)
        os.close(w)


def test_the_read_lock_is_held_by_one_task_at_a_time() -> None:
    fake = fuse_wait.facade()
    holders: list[int] = []
    most: list[int] = []

    async def worker(lock: object) -> None:
        for _ in range(20):
            async with lock:  # type: ignore[attr-defined]
                holders.append(1)
                most.append(len(holders))
                await trio.lowlevel.checkpoint()
                holders.pop()

    async def main() -> None:
        lock = fake.Lock()
        async with trio.open_nursery() as nursery:
            for _ in range(4):
                nursery.start_soon(worker, lock)

    trio.run(main)
    assert len(most) == 80
    assert max(most) == 1


def test_serving_restores_pyfuse3s_trio_afterwards() -> None:
    real = pyfuse3.trio  # type: ignore[attr-defined]

    async def main() -> None:
        try:
            await fuse_wait.serve_requests()  # no pyfuse3.init: main() refuses at once
        except RuntimeError:
            pass

    trio.run(main)
    assert pyfuse3.trio is real  # type: ignore[attr-defined]

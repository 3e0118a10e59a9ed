"""Background tasks that outlive their own bugs: the one place that decides what happens when a
long-running task of the mount (write-back workers, tombstones, refresh, renewal, the event
channel, the control socket) raises something nobody expected.

A supervised task is restarted after a backoff (1 s doubling to 60 s, reset once a run lasted
longer than a minute); the failure is logged with its traceback and kept in :class:`TaskHealth`
for ``privifs status``. Failures *before* the task reported itself started are start-up errors
and propagate (the mount is not ready yet, so the user sees them). Cancellation always
propagates: only unmounting ends a supervised task.

This module is a leaf: it knows nothing of the filesystem or the client, so both can use it.
"""

from __future__ import annotations

import functools
import logging
import time
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio

log = logging.getLogger("privifs.supervise")

FIRST_BACKOFF = 1.0
MAX_BACKOFF = 60.0
STABLE_AFTER = 60.0  # a run this long resets the backoff


@dataclass
class TaskHealth:
    """What ``privifs status`` shows of one supervised task."""

    name: str
    failures: int = 0
    last_error: str | None = None
    last_error_at: float | None = None
    running: bool = False

    def as_dict(self) -> dict:
        return {
            "name": self.name,
            "failures": self.failures,
            "last_error": self.last_error,
            "last_error_at": self.last_error_at,
            "running": self.running,
        }


def describe(exc: BaseException) -> str:
    """A one-line cause for the log and status: the exception and where it was raised."""
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" (at {frames[-1].filename.rsplit('/', 1)[-1]}:{frames[-1].lineno} in {frames[-1].name})" if frames else ""
    return f"{type(exc).__name__}: {exc}{where}"


class _StartedOnce:
    """Forwards the first ``started()`` of any run to the nursery; later runs are restarts."""

    def __init__(self, task_status: trio.TaskStatus):
        self._task_status = task_status
        self.done = False

    def started(self, value=None) -> None:
        if not self.done:
            self.done = True
            self._task_status.started(value)


class Supervisor:
    """Runs tasks so that no exception but cancellation ends them; keeps their health."""

    def __init__(self) -> None:
        self.tasks: dict[str, TaskHealth] = {}

    def health(self, name: str) -> TaskHealth:
        if name not in self.tasks:
            self.tasks[name] = TaskHealth(name)
        return self.tasks[name]

    def failed(self, name: str, exc: BaseException, what: str = "failed unexpectedly") -> None:
        """Record (and log with its traceback) an unexpected failure of ``name``."""
        health = self._record(name, describe(exc))
        log.error("%s %s: %s", name, what, health.last_error, exc_info=exc)

    def _record(self, name: str, cause: str) -> TaskHealth:
        health = self.health(name)
        health.failures += 1
        health.last_error = cause
        health.last_error_at = time.time()
        return health

    def report(self) -> list[dict]:
        return [h.as_dict() for h in self.tasks.values()]

    def failing(self) -> list[TaskHealth]:
        return [h for h in self.tasks.values() if h.failures]

    async def start(self, nursery: trio.Nursery, name: str, fn: Callable[..., Awaitable[object]], *args):
        """``nursery.start`` of a supervised task: returns what ``fn`` passes to ``started()``."""
        return await nursery.start(functools.partial(self.run, startable=True), name, fn, *args)

    def start_soon(self, nursery: trio.Nursery, name: str, fn: Callable[..., Awaitable[object]], *args) -> None:
        nursery.start_soon(functools.partial(self.run, name, fn, *args), name=name)

    async def run(
        self,
        name: str,
        fn: Callable[..., Awaitable[object]],
        *args,
        task_status: trio.TaskStatus = trio.TASK_STATUS_IGNORED,
        startable: bool = False,
    ) -> None:
        """Run ``fn(*args)`` for ever: restart it when it raises or returns. With ``startable``,
        ``fn`` takes ``task_status`` (``nursery.start`` semantics) and errors before its first
        ``started()`` propagate; otherwise the task counts as started at once."""
        health = self.health(name)
        once = _StartedOnce(task_status)
        if not startable:
            once.started()
        backoff = FIRST_BACKOFF
        while True:
            began = trio.current_time()
            health.running = True
            try:
                if startable:
                    await fn(*args, task_status=once)
                else:
                    await fn(*args)
                log.error("%s ended by itself; restarting it", name)
                self._record(name, "ended unexpectedly")
            except Exception as exc:
                if not once.done:
                    raise
                self.failed(name, exc, f"failed unexpectedly; restarting in {backoff:.0f}s")
            finally:
                health.running = False
            if trio.current_time() - began > STABLE_AFTER:
                backoff = FIRST_BACKOFF
            await trio.sleep(backoff)
            backoff = min(MAX_BACKOFF, backoff * 2)

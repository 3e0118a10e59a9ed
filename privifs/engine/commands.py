"""The asynchronous command model: accept (202), apply later, report the outcome.

:meth:`CommandRunner.submit` durably records a command with status 1 and returns its id; the
route answers 202. One runner task applies queued commands in submission order, a batch per
database transaction; each applier either succeeds (status 2) or raises :class:`Rejected`
(status 3 with a reason key). The status row and the command's effect commit together, and only
then is ``X-DPT-CAB-ID`` pushed to the profile's WebSocket channels (subject to the ack fault
options). Commands still at status 1 when the engine starts are applied again, so a 202 survives
``kill -9``.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from privifs.engine.db import Database
from privifs.engine.http import disk_full
from privifs.engine.hub import Hub
from privifs.engine.options import EngineOptions

log = logging.getLogger("privifs.engine.commands")

STARTED, SUCCEEDED, REJECTED = 1, 2, 3
RETRY_FIRST, RETRY_MAX = 0.5, 30.0  # a batch the database could not take is tried again after
STATUS_WORDS = {STARTED: "started", SUCCEEDED: "succeeded", REJECTED: "rejected"}


class Rejected(Exception):
    """Raised by an applier: the command ends with status 3 and this reason key as its body."""

    def __init__(self, reason: str, events: list[dict[str, Any]] | None = None):
        super().__init__(reason)
        self.reason = reason
        self.events = events or []


@dataclass
class Outcome:
    body: Any = None
    events: list[dict[str, Any]] = field(default_factory=list)  # pushed after the commit
    after_commit: list[Callable[[], None]] = field(default_factory=list)


Applier = Callable[[sqlite3.Connection, dict[str, Any], str | None, str], Outcome | None]
# A gate decides, inside the applying transaction, whether a command may be applied now; a held
# command keeps status 1 until :meth:`CommandRunner.release` or :meth:`CommandRunner.finish`.
Gate = Callable[[sqlite3.Connection, str, str | None, str], bool]


class CommandRunner:
    def __init__(self, db: Database, hub: Hub, opts: EngineOptions):
        self.db = db
        self.hub = hub
        self.opts = opts
        self.appliers: dict[str, Applier] = {}
        self.gate: Gate | None = None
        self.after_hold: Callable[[str | None, str], None] | None = None
        self._send, self._recv = trio.open_memory_channel[str](10**6)
        self._nursery: trio.Nursery | None = None

    def register(self, kind: str, applier: Applier) -> None:
        self.appliers[kind] = applier

    async def submit(
        self,
        kind: str,
        profile_id: str | None,
        params: dict[str, Any],
        also: Callable[[sqlite3.Connection, str], None] | None = None,
        command_id: str | None = None,
        fsync_dirs: tuple = (),
    ) -> str:
        """Record a command (and ``also(conn, id)`` in the same transaction); return its id."""
        cid = command_id or str(uuid.uuid4())
        payload = json.dumps(params)

        def write(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT INTO commands (id, profile_id, kind, params, status, created_at) VALUES (?, ?, ?, ?, 1, ?)",
                (cid, profile_id, kind, payload, time.time()),
            )
            if also is not None:
                also(conn, cid)

        await self.db.write(write, fsync_dirs=fsync_dirs)
        if self.opts.emit_started:
            self._push(profile_id, cid, STARTED, None)
        self._send.send_nowait(cid)
        return cid

    def status(self, command_id: str) -> sqlite3.Row | None:
        return self.db.read(
            lambda c: c.execute(
                "SELECT id, profile_id, kind, status, body FROM commands WHERE id = ?", (command_id,)
            ).fetchone()
        )

    async def run(self, task_status: trio.TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
        pending = self.db.read(
            lambda c: [r["id"] for r in c.execute("SELECT id FROM commands WHERE status = 1 ORDER BY rowid")]
        )
        for cid in pending:
            self._send.send_nowait(cid)
        if pending:
            log.info("resuming %d commands accepted before the last stop", len(pending))
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            while True:
                batch = [await self._recv.receive()]
                while len(batch) < 128:
                    try:
                        batch.append(self._recv.receive_nowait())
                    except trio.WouldBlock:
                        break
                if self.opts.apply_delay_ms:
                    await trio.sleep(self.opts.apply_delay_ms / 1000)
                await self._apply_until_done(batch)

    async def _apply_until_done(self, ids: list[str]) -> None:
        """Apply a batch; while the database cannot be written (a full disk), keep its commands
        accepted (status 1: the failed transaction changed nothing) and try again with backoff,
        instead of letting the failure end the runner and with it the engine."""
        delay = RETRY_FIRST
        while True:
            try:
                await self._apply_batch(ids)
                return
            except (sqlite3.Error, OSError) as exc:
                log.warning(
                    "applying %d commands failed (%s); they stay accepted and are applied in %.1fs",
                    len(ids),
                    exc,
                    delay,
                )
            await trio.sleep(delay)
            delay = min(RETRY_MAX, delay * 2)

    async def _apply_batch(self, ids: list[str]) -> None:
        results: list[tuple[str, str | None, int, Any, Outcome | None]] = []
        held: list[tuple[str | None, str]] = []

        def work(conn: sqlite3.Connection) -> None:
            results.clear()
            held.clear()
            for cid in ids:
                row = conn.execute(
                    "SELECT profile_id, kind, params, status FROM commands WHERE id = ?", (cid,)
                ).fetchone()
                if row is None or row["status"] != STARTED:
                    continue
                kind, profile_id = row["kind"], row["profile_id"]
                if self.gate is not None and not self.gate(conn, kind, profile_id, cid):
                    held.append((profile_id, cid))
                    continue  # waits for a vote: stays at status 1
                status, body, outcome = SUCCEEDED, None, None
                conn.execute("SAVEPOINT cmd")
                try:
                    if kind in self.opts.reject:
                        raise Rejected(self.opts.reject_reason)
                    applier = self.appliers[kind]
                    outcome = applier(conn, json.loads(row["params"]), profile_id, cid)
                    body = outcome.body if outcome else None
                except Rejected as exc:
                    conn.execute("ROLLBACK TO cmd")
                    status, body, outcome = REJECTED, exc.reason, Outcome(events=exc.events)
                except Exception as exc:
                    if disk_full(exc):  # not the command's fault: the batch is tried again later
                        raise
                    log.exception("applying %s command %s failed", kind, cid)
                    conn.execute("ROLLBACK TO cmd")
                    status, body, outcome = REJECTED, "engine.internal_error", None
                conn.execute("RELEASE cmd")
                stored = body if body is None or isinstance(body, str) else json.dumps(body)
                conn.execute(
                    "UPDATE commands SET status = ?, body = ?, finished_at = ? WHERE id = ?",
                    (status, stored, time.time(), cid),
                )
                results.append((cid, profile_id, status, body, outcome))

        await self.db.write(work)
        for profile_id, cid in held:
            self._push(profile_id, cid, STARTED, "voting.pending")
            if self.after_hold is not None:
                self.after_hold(profile_id, cid)
        for cid, profile_id, status, body, outcome in results:
            if outcome is not None:
                for fn in outcome.after_commit:
                    fn()
            self._push(profile_id, cid, status, body, outcome.events if outcome else [])

    def release(self, command_id: str) -> None:
        """A held command may now be applied (its vote passed)."""
        self._send.send_nowait(command_id)

    async def finish(self, command_id: str, status: int, body: Any) -> None:
        """End a held command without applying it (its vote failed or timed out)."""

        def work(conn: sqlite3.Connection):
            row = conn.execute("SELECT profile_id FROM commands WHERE id = ? AND status = 1", (command_id,)).fetchone()
            if row is not None:
                conn.execute(
                    "UPDATE commands SET status = ?, body = ?, finished_at = ? WHERE id = ?",
                    (status, body, time.time(), command_id),
                )
            return row

        row = await self.db.write(work)
        if row is not None:
            self._push(row["profile_id"], command_id, status, body)

    def _push(
        self, profile_id: str | None, cid: str, status: int, body: Any, events: list[dict[str, Any]] | None = None
    ) -> None:
        messages = [{"data": {"type": "X-DPT-CAB-ID", "id": cid, "command_status": status, "body": body}}]
        messages.extend(events or [])
        if status != STARTED and self.opts.ack_drop_rate:
            messages = [m for m in messages if not self.opts.chance(self.opts.ack_drop_rate)]
        if not messages:
            return
        delay = self.opts.ack_delay_ms / 1000 if status != STARTED else 0
        if delay and self._nursery is not None:
            self._nursery.start_soon(self._deliver_later, delay, profile_id, messages)
        else:
            for m in messages:
                self.hub.publish(profile_id, m)

    async def _deliver_later(self, delay: float, profile_id: str | None, messages: list[dict[str, Any]]) -> None:
        await trio.sleep(delay)
        for m in messages:
            self.hub.publish(profile_id, m)

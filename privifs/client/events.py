"""The one WebSocket of a session and the waits built on it.

:class:`EventHub` keeps a single connection joined with the session's current token:
re-joins on every token change, reconnects with capped backoff, and counts its (re)joins in
:attr:`EventHub.generation`. Events are dispatched by ``(type, id)`` to registered waiters; an
event that arrives before its waiter is kept for ``early_event_ttl`` seconds (bounded), so an ack
racing the HTTP answer is not lost. When the socket cannot be opened at all, waits fall back to
status polling.

:class:`Commands` turns a 202 into an outcome: wait for ``X-DPT-CAB-ID``, poll the status when
the ack is slow, dropped, or the socket reconnected, and at the deadline report the command as
*pending* (:class:`~privifs.errors.CommandPending`), never as failed or done.

The channel is the profile's: it also carries the ``X-DPT-CAB-ID`` of every command other clients
of the profile run (stores, renames, deletes, …). A successful one that no waiter of this client
claims is counted as a *foreign change*; :meth:`EventHub.foreign_changes` lets the filesystem
re-read the listing soon after another client changed the vault.
"""

from __future__ import annotations

import json
import logging
import math
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager

import trio
from trio_websocket import open_websocket_url

from privifs.client import shapes
from privifs.client.peers import check_server_end
from privifs.client.session import Session
from privifs.client.transport import ClientOptions, Endpoints, Transport
from privifs.errors import CommandPending, PrivifsError, UnknownCommand, VaultError, rejected_command

log = logging.getLogger("privifs.client.events")

EARLY_MAX = 10000
# events nobody waits for (yet) are kept a while for a waiter that registers late: at most this
# many per (type, id), and this many bytes in all (frames as received), the oldest dropped first
# (held without a bound, 300,000 events on one id took a daemon from 65 to 616 MB: helper hY F3)
EARLY_PER_KEY = 8
EARLY_BYTES = 32 << 20


class JoinRefused(Exception):
    pass


@asynccontextmanager
async def websocket(url: str, server_uid: int | None = None, **options) -> AsyncIterator:
    """``open_websocket_url``, whose TCP connection is closed when the block ends.
    trio-websocket's client waits for the server to close it after a close frame or a frame that
    breaks the protocol, and leaves it open on leaving its context: each such frame left a
    connection the server kept joined (and pushed every event into) until the garbage collector
    found it (helper hY F4)."""
    async with open_websocket_url(url, **options) as ws:
        try:
            _check_server_end(ws, server_uid)
            yield ws
        finally:
            stream = getattr(ws, "_stream", None)  # (no public name for it)
            if ws.closed is not None and stream is not None:  # (open: closed politely on leaving)
                await trio.aclose_forcefully(stream)


def _check_server_end(ws, server_uid: int | None) -> None:
    """Refuse a channel whose loopback server is not this user's program (client/peers.py) before
    the caller sends its token over it."""
    if server_uid is None:
        return
    local, remote = ws.local, ws.remote
    if isinstance(local, str) or isinstance(remote, str):  # (a Unix socket: not a port to take)
        return
    check_server_end((str(local.address), local.port), (str(remote.address), remote.port), server_uid)


class ChannelTimeout(Exception):
    """The WebSocket server did not answer the handshake, the join or a ping in time."""


def _first_cause(exc: BaseException) -> BaseException:
    """The first exception inside nested exception groups (what the channel's nursery raised)."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


class Waiter:
    """Receives every event for one (type, id)."""

    def __init__(self, key: tuple[str, str]):
        self.key = key
        self.keys: list[tuple[str, str]] = []
        self.events: list[dict] = []
        self.arrived = trio.Event()
        self.channel_changed = False  # the hub (re)joined or lost its channel since the last look

    def push(self, data: dict) -> None:
        self.events.append(data)
        self.arrived.set()

    def interrupt(self) -> None:
        self.channel_changed = True
        self.arrived.set()

    async def next_or_change(self) -> dict | None:
        """The next event, or None once the channel changed (events may have been missed)."""
        while not self.events:
            if self.channel_changed:
                self.channel_changed = False
                return None
            await self.arrived.wait()
            if not self.events:
                self.arrived = trio.Event()
        return await self.next()

    async def next(self) -> dict:
        while not self.events:
            await self.arrived.wait()
            if not self.events:
                self.arrived = trio.Event()
        data = self.events.pop(0)
        if not self.events:
            self.arrived = trio.Event()
        return data


class EventHub:
    def __init__(self, url: str | None, session: Session, options: ClientOptions, endpoints: Endpoints | None = None):
        self._url = url
        self._endpoints = endpoints  # followed when given (their ws URL may move)
        self.session = session
        self.options = options
        self.connected = False
        self.generation = 0
        self.changed = trio.Event()
        self._waiters: dict[tuple[str, str], list[Waiter]] = {}
        self._early: OrderedDict[tuple[str, str], list[tuple[float, dict, int]]] = OrderedDict()
        self._early_bytes = 0
        self._session_scope: trio.CancelScope | None = None
        self._reopen_deadline = -math.inf  # until when a channel reopen() ended is waited for
        self.reopened = 0  # joined channels ended because they delivered no events (reopen)
        self._ws = None
        self._join_answer: trio.MemorySendChannel | None = None
        self._rejoin = trio.Event()
        self._own: OrderedDict[str, None] = OrderedDict()  # command ids this client ran
        self._foreign: OrderedDict[str, float] = OrderedDict()  # successful acks nobody claimed yet
        self._foreign_arrived = trio.Event()
        self.foreign_seen = 0
        # since when (time.time()) and why the channel cannot be joined: ``privifs status`` says so
        # (the mount works on by polling, but other clients' changes wait for the next listing)
        self.down_since: float | None = None
        self.down_reason: str | None = None
        session.on_token_change(lambda token: self._rejoin.set())

    @property
    def url(self) -> str | None:
        """The channel's URL: the endpoints' when the hub follows them (see ``Endpoints.move_to``)."""
        return self._endpoints.ws if self._endpoints is not None else self._url

    # -- waiters -------------------------------------------------------------------------------

    def register(self, type_: str, id_: str, waiter: Waiter | None = None) -> Waiter:
        """Wait for events of ``(type_, id_)``; pass ``waiter`` to add a key to an existing waiter."""
        key = (type_, id_)
        if type_ == "X-DPT-CAB-ID":
            self.claim(id_)
        w = waiter if waiter is not None else Waiter(key)
        w.keys.append(key)
        self._waiters.setdefault(key, []).append(w)
        now = time.monotonic()
        for ts, data, size in self._early.pop(key, []):
            self._early_bytes -= size
            if now - ts <= self.options.early_event_ttl:
                w.push(data)
        return w

    def unregister(self, w: Waiter) -> None:
        for key in w.keys:
            lst = self._waiters.get(key)
            if lst is not None:
                try:
                    lst.remove(w)
                except ValueError:
                    pass
                if not lst:
                    del self._waiters[key]
        w.keys.clear()

    def claim(self, command_id: str) -> None:
        """``command_id`` is one of this client's commands (its ack is no foreign change)."""
        self._own[command_id] = None
        self._own.move_to_end(command_id)
        while len(self._own) > EARLY_MAX:
            self._own.popitem(last=False)
        self._foreign.pop(command_id, None)

    async def foreign_changes(self, settle: float) -> int:
        """Wait until another client's command succeeded (an ack no command of ours claims within
        ``settle`` seconds) or the channel reconnected (events may have been missed); return how
        many such acks arrived (0 after a reconnect)."""
        generation = self.generation
        while True:
            if not self._foreign:
                self._foreign_arrived = trio.Event()
                with trio.move_on_after(60):
                    async with trio.open_nursery() as n:

                        async def on(event: trio.Event) -> None:
                            await event.wait()
                            n.cancel_scope.cancel()

                        n.start_soon(on, self._foreign_arrived)
                        n.start_soon(on, self.changed)
                if self.generation != generation:
                    return 0
                if not self._foreign:
                    continue
            await trio.sleep(settle)  # our own command's waiter may still be on its way
            count = len(self._foreign)
            self._foreign.clear()
            self._foreign_arrived = trio.Event()
            if count:
                return count

    def _note_ack(self, data: dict, id_: str) -> None:
        if id_ in self._own or (("X-DPT-CAB-ID", id_) in self._waiters):
            return
        if shapes.ws_status(data).status != 2:
            return
        self.foreign_seen += 1
        self._foreign[id_] = time.monotonic()
        while len(self._foreign) > EARLY_MAX:
            self._foreign.popitem(last=False)
        self._foreign_arrived.set()

    def _dispatch(self, data: dict, size: int = 0) -> None:
        """Hand an event (``size``: its frame's length) to its waiters, or keep it a while."""
        type_ = data.get("type")
        if not isinstance(type_, str):
            return
        ids = {i for i in (data.get("id"), data.get("requestId")) if isinstance(i, str)}
        if type_ == "X-DPT-CAB-ID":
            for id_ in ids:
                self._note_ack(data, id_)
        for id_ in ids:
            key = (type_, id_)
            waiters = self._waiters.get(key)
            if waiters:
                for w in waiters:
                    w.push(data)
            else:
                self._keep_early(key, data, size)
        now = time.monotonic()
        while self._early:
            key, items = next(iter(self._early.items()))
            if (
                len(self._early) > EARLY_MAX
                or self._early_bytes > EARLY_BYTES
                or now - items[-1][0] > self.options.early_event_ttl
            ):
                self._early_bytes -= sum(size for _, _, size in self._early.pop(key))
            else:
                break

    def _keep_early(self, key: tuple[str, str], data: dict, size: int) -> None:
        items = self._early.setdefault(key, [])
        items.append((time.monotonic(), data, size))
        self._early_bytes += size
        if len(items) > EARLY_PER_KEY:
            self._early_bytes -= items.pop(0)[2]
        self._early.move_to_end(key)

    def _signal_change(self) -> None:
        self.changed.set()
        self.changed = trio.Event()
        for waiters in self._waiters.values():
            for w in waiters:
                w.interrupt()

    # -- connection ------------------------------------------------------------------------------
    def reopen(self, generation: int, reason: str) -> bool:
        """End the joined channel of ``generation``, if it is still the current one, so that
        :meth:`run` opens and joins a new one: a channel that answers pings but delivers no
        events (a server whose consumer died behind a live socket, a subscription it lost) was
        kept for good, and every read of uncached data failed with EIO after its request-data
        results did not come (helper hY F2). Returns whether it was ended."""
        if self._session_scope is None or not self.connected or generation != self.generation:
            return False
        log.warning("the event channel delivered no %s; opening it again", reason)
        self.reopened += 1
        self.connected = False  # (after_reopen waits for the next one, not this one's end)
        self._reopen_deadline = trio.current_time() + self.options.connect_timeout + self.options.join_timeout
        self._signal_change()
        self._session_scope.cancel()
        return True

    async def after_reopen(self) -> None:
        """While a channel :meth:`reopen` ended is being opened again, wait until it is joined
        (up to the handshake's and join's time limit): a request asked meanwhile has its result
        pushed to no channel (helper hZ N2: of six cold reads at once, the five that did not
        reopen it used up their asks while it was down)."""
        while not self.connected and trio.current_time() < self._reopen_deadline:
            with trio.move_on_at(self._reopen_deadline):
                await self.changed.wait()

    async def run(self, task_status: trio.TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
        """Keep the channel joined for ever; ``started`` once joined or known to be unavailable."""
        started = False

        def joined() -> None:
            nonlocal started, delay
            delay = 0.2
            self.down_since = self.down_reason = None
            if not started:
                started = True
                task_status.started()

        delay = 0.2
        while True:
            if self.url:
                try:
                    await self._connected_session(joined)
                except Exception as exc:  # noqa: BLE001 - any failure means: reconnect later
                    log.debug("event channel unavailable: %r", exc)
                    cause = _first_cause(exc)  # (not "Exceptions from Trio nursery": helper hS F5)
                    self.down_reason = (str(cause) or type(cause).__name__)[:200]
                    if self.down_since is None:
                        self.down_since = time.time()
                    if self.connected:
                        log.info("event channel disconnected; reconnecting")
                finally:
                    self.connected = False
                    self._ws = None
                    self._signal_change()
            if not started:
                log.warning("cannot open the event WebSocket at %s; falling back to status polling", self.url)
                task_status.started()
                started = True
            with trio.move_on_after(delay):
                await self._rejoin.wait()  # a new token is worth trying at once
            delay = min(delay * 2, 10.0)

    async def _connected_session(self, joined) -> None:
        # trio-websocket's own connect_timeout does not end a connection whose server accepted
        # it and never answers the handshake (its reader task keeps the connection's nursery
        # open): the channel stayed down for good, with no new attempt, after one such stall
        # (helper hS F2: reads of uncached files failed with EIO for minutes). Our deadline
        # covers the handshake and the join and is lifted once joined.
        limit = self.options.connect_timeout + self.options.join_timeout
        with trio.CancelScope() as session:
            self._session_scope = session
            try:
                with trio.CancelScope(deadline=trio.current_time() + limit) as opening:
                    await self._session(joined, opening)
            finally:
                self._session_scope = None
        if opening.cancelled_caught:
            raise ChannelTimeout(f"no answer to the WebSocket handshake and join within {limit:g} s")
        if session.cancelled_caught:
            raise ChannelTimeout("joined, it delivered no events: opened again")

    async def _session(self, joined, opening: trio.CancelScope) -> None:
        async with websocket(
            self.url,
            self.options.server_uid,
            connect_timeout=self.options.connect_timeout,
            disconnect_timeout=2,
            message_queue_size=4096,
        ) as ws:
            self._ws = ws
            send, recv = trio.open_memory_channel(10)
            self._join_answer = send
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._reader, ws, nursery)
                await self._join(ws, recv)
                opening.deadline = math.inf
                nursery.start_soon(self._keep_alive, ws)
                self.connected = True
                self.generation += 1
                self._signal_change()
                joined()
                while True:
                    await self._rejoin.wait()
                    self._rejoin = trio.Event()
                    await self._join(ws, recv)
                    self.generation += 1
                    self._signal_change()

    async def _keep_alive(self, ws) -> None:
        """Ping the joined channel; a pong that does not come ends the session (reconnected)."""
        while True:
            await trio.sleep(self.options.ping_interval)
            with trio.move_on_after(self.options.ping_timeout) as waited:
                await ws.ping()
            if waited.cancelled_caught:
                log.info("the event channel did not answer a ping within %g s; reconnecting", self.options.ping_timeout)
                raise ChannelTimeout(f"no answer to a ping within {self.options.ping_timeout:g} s")

    async def _join(self, ws, answers: trio.MemoryReceiveChannel) -> None:
        token = self.session.current_token()
        corr = str(uuid.uuid4())
        await ws.send_message(
            json.dumps(
                {
                    "action": "joinChannel",
                    "correlationId": corr,
                    "data": {"authorizationToken": token, "correlationId": corr},
                }
            )
        )
        with trio.fail_after(self.options.join_timeout):
            while True:
                answer = await answers.receive()
                if answer.get("correlationId") not in (corr, None):
                    continue
                data = answer.get("data") if isinstance(answer.get("data"), dict) else {}
                if answer.get("status") == 200 and data.get("channelId"):
                    return
                raise JoinRefused(f"joinChannel refused: {answer.get('status')} {data.get('message')}")

    async def _reader(self, ws, nursery: trio.Nursery) -> None:
        try:
            while True:
                text = await ws.get_message()
                try:
                    frame = json.loads(text)
                except (ValueError, TypeError, RecursionError):
                    continue
                if not isinstance(frame, dict):
                    continue
                data = frame.get("data")
                if "status" in frame and ("correlationId" in frame or (isinstance(data, dict) and "channelId" in data)):
                    if self._join_answer is not None:
                        try:
                            self._join_answer.send_nowait(frame)
                        except trio.WouldBlock:
                            pass
                    continue
                if isinstance(data, dict):
                    self._dispatch(data, len(text))
        finally:
            nursery.cancel_scope.cancel()


# the failure words a server is known to send (reference 2.3: "rejected"; 3 on the socket)
FAILURE_WORDS = frozenset({"rejected", "3", "failed", "failure", "error"})


class Commands:
    """Waiting for asynchronous commands and reading their status."""

    def __init__(self, transport: Transport, hub: EventHub, options: ClientOptions):
        self.transport = transport
        self.hub = hub
        self.options = options
        self.polls = 0

    async def poll(self, command_id: str) -> shapes.CommandState:
        self.polls += 1
        resp = await self.transport.call(
            "POST",
            f"/request-status/{command_id}",
            json={},
            idempotent=True,
            expected=(200, 404, 405),
            what="command status",
        )
        if resp.status_code == 405:
            resp = await self.transport.call(
                "GET", f"/request-status/{command_id}", idempotent=True, expected=(200, 404), what="command status"
            )
        if resp.status_code == 404:
            resp = await self.transport.call(
                "GET",
                f"/utility/request-command-id-status/{command_id}",
                idempotent=True,
                expected=(200, 404),
                what="command status",
            )
            if resp.status_code == 404:
                raise UnknownCommand(f"the server does not know command {command_id}")
        state = shapes.poll_answer(shapes.json_or_text(resp))
        if state.status == 3 and state.reason in (None, "rejected"):
            state.reason = await self._reason(command_id) or state.reason
        return state

    async def _reason(self, command_id: str) -> str | None:
        try:
            resp = await self.transport.call(
                "GET", f"/utility/request-command-id-status/{command_id}", idempotent=True, what="command status"
            )
            body = shapes.json_or_text(resp)
            if isinstance(body, dict) and body.get("body"):
                return str(body["body"])
        except PrivifsError:
            pass
        return None

    async def wait(
        self, command_id: str, *, what: str = "command", timeout: float | None = None
    ) -> shapes.CommandState:
        """Wait for ``command_id``'s outcome; raise CommandRejected (3) or CommandPending (deadline)."""
        waiter = self.hub.register("X-DPT-CAB-ID", command_id)
        try:
            state = await self._wait(command_id, waiter, timeout if timeout is not None else self.options.ack_timeout)
        finally:
            self.hub.unregister(waiter)
        if state.status == 3 and state.reason is not None and state.reason.strip().lower() not in FAILURE_WORDS:
            # a word no server is known to send for a failure (``succaeded``: a status changed on
            # its way) is asked for again before it is taken for a rejection, which failed an
            # fsync and held the change back for 30 s
            state = await self._poll_settled(command_id) or state
        if state.status == 3:
            raise rejected_command(
                f"{what} was rejected by the server: {state.reason or 'no reason given'}",
                command_id=command_id,
                reason=state.reason,
            )
        return state

    async def _wait(self, command_id: str, waiter: Waiter, timeout: float) -> shapes.CommandState:
        deadline = trio.current_time() + timeout
        ack_window = 1.0  # with a live channel: how long to trust the ack before polling
        poll_gap = 0.05  # without one: polling interval, growing to 1 s
        generation = self.hub.generation
        while True:
            remaining = deadline - trio.current_time()
            if remaining <= 0:
                break
            connected = self.hub.connected
            window = min(remaining, ack_window if connected else poll_gap)
            if not connected:
                poll_gap = min(poll_gap * 2, 1.0)
            waiter.channel_changed = False  # only a change during this window cuts it short (as before)
            with trio.move_on_after(window):
                # one wait, no tasks: the hub interrupts its waiters when the channel changes
                while (data := await waiter.next_or_change()) is not None:
                    if not shapes.ws_says_status(data):
                        break  # an ack that does not say how the command ended: the poll below does
                    state = shapes.ws_status(data)
                    if not state.pending:
                        return state
            # no ack in this window, or the channel changed: ask for the status
            state = await self._poll_settled(command_id)
            if state is not None:
                return state
            if self.hub.generation == generation:
                ack_window = min(ack_window * 2, 8.0)
            generation = self.hub.generation
        state = await self._poll_settled(command_id)
        if state is not None:
            return state
        raise CommandPending(
            f"command {command_id} is still in flight after {timeout:.0f}s; it may still "
            f"complete — its status can be polled",
            command_id=command_id,
        )

    async def _poll_settled(self, command_id: str) -> shapes.CommandState | None:
        """The command's final state, or None while it is in flight or the poll failed transiently."""
        try:
            state = await self.poll(command_id)
        except UnknownCommand:
            raise  # (transient, but for the chain: waiting longer for an id the server lacks is vain)
        except VaultError as exc:
            if not exc.transient:
                raise
            return None
        return None if state.pending else state

    async def wait_all(self, ids: Iterable[str]) -> None:
        async with trio.open_nursery() as n:
            for cid in ids:
                n.start_soon(self.wait, cid)

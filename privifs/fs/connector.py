"""Reaching the vault: the first connection at start-up, an offline start when the server cannot
be reached, and the catch-up once it answers.

The filesystem never holds the client itself. It talks to a :class:`VaultLink`, a stand-in for
:class:`~privifs.client.datatokens.DataTokens` that forwards every call to the connected client
and, while there is none, fails at once with :class:`~privifs.errors.ServerUnreachable` (reads
of uncached content give EIO, uploads stay staged and are retried).

:class:`Connector` is the one task that connects. Its first attempt runs before the mount: log
in, read the listing, check the AES key, merge the listing, and only then attach the link. If
the server cannot be reached (connection refused, time-out, 5xx) and this machine has already
checked this key against this vault (the ``vault-checked`` marker in the state directory), the
mount starts **offline** from the local index and cache; otherwise the mount is refused. The
task then keeps trying with backoff (and at once when a flush asks) and, once the server answers,
does the same steps — log in, key check, listing merge — attaches the link and wakes the
write-back, which drains what was staged meanwhile. A connection lost later is retried the same
way; the mount itself never ends because of it.

The marker also records the vault's key-check token: the vault's name. A connection, and every
new login while connected (``Session.verify``, before the call that met it is sent again), checks
that token is still there; if not, the server's URL and user name lead to another vault
(:class:`~privifs.errors.VaultChanged`): the link goes down and the connection is dropped before
any listing of it is merged or any upload reaches it, and the connector keeps trying.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from privifs.client.connect import connect
from privifs.client.datatokens import DataTokens, FileMeta, find, find_each
from privifs.client.shapes import TokenInfo
from privifs.client.transport import ClientOptions
from privifs.crypto.keys import key_id
from privifs.errors import (
    AuthenticationError,
    MalformedHTTP,
    PrivifsError,
    ServerUnreachable,
    VaultChanged,
    WrongKeyError,
)
from privifs.fs.tokenmeta import RESERVED_CONTEXT
from privifs.keycheck import key_checks, naming_check
from privifs.supervise import Supervisor
from privifs.words import count

if TYPE_CHECKING:
    from privifs.account import Account
    from privifs.fs.refresh import Refresher
    from privifs.fs.sync import Syncer

log = logging.getLogger("privifs.fs.connector")

MARKER = "vault-checked"
FIRST_RETRY = 1.0
MAX_RETRY = 60.0
KNOWN_ASKED = 5  # files this mount knows asked for by id when its key check is gone (no listing at hand)


class VaultLink:
    """The data-token operations the filesystem uses, forwarded to the connected client."""

    def __init__(self, options: ClientOptions):
        self.options = options
        self._tokens: DataTokens | None = None
        self.reason = "the vault has not been reached yet"
        self.login_refused_offline = False  # offline because the server refused the login (it answers)

    @property
    def online(self) -> bool:
        return self._tokens is not None

    def attach(self, tokens: DataTokens) -> None:
        self._tokens = tokens

    def detach(self, reason: str, *, login_refused: bool = False) -> None:
        self._tokens = None
        self.reason = reason
        self.login_refused_offline = login_refused

    async def foreign_changes(self, settle: float) -> int:
        """Another client's change, as the connected client's event channel reports it (see
        ``EventHub.foreign_changes``); while offline, waits until the link is attached again."""
        while True:
            tokens = self._tokens
            if tokens is None:
                await trio.sleep(1)
                continue
            with trio.move_on_after(30):  # the connection may be replaced meanwhile: look again
                return await tokens.hub.foreign_changes(settle)

    def login_refused(self, since: float) -> str | None:
        """Why the server refuses this connection's login, if a call met that refusal at or after
        ``since`` (trio time) and no login succeeded since: every upload fails until the password
        (its file) is right again or the account is back."""
        session = self._tokens.transport.auth if self._tokens is not None else None
        refusal = getattr(session, "refusal", None)
        if refusal is None or session.refused_at is None or session.refused_at < since:
            return None
        return str(refusal)

    def events(self) -> dict | None:
        """The event channel's state while online (``None`` offline, or without a channel)."""
        hub = self._tokens.hub if self._tokens is not None else None
        if hub is None or not hub.url:
            return None
        return {"connected": hub.connected, "down_since": hub.down_since, "down_reason": hub.down_reason}

    def _get(self) -> DataTokens:
        if self._tokens is None:
            raise ServerUnreachable(f"offline: {self.reason}")
        return self._tokens

    async def store(self, body, wire_size: int, meta: FileMeta) -> str:
        return await self._get().store(body, wire_size, meta)

    async def fetch(
        self, token: str, consume: Callable[[AsyncIterator[bytes]], Awaitable[None]], wire_size: int | None = None
    ) -> None:
        await self._get().fetch(token, consume, wire_size=wire_size)

    async def configure(self, tmp: object, meta: FileMeta) -> str:
        return await self._get().configure(tmp, meta)

    async def list(self, **kwargs) -> AsyncIterator[TokenInfo]:
        async for info in self._get().list(**kwargs):
            yield info

    async def update(self, token: str, **kwargs) -> None:
        await self._get().update(token, **kwargs)

    async def set_risk(self, token: str, fields: dict[str, str]) -> None:
        await self._get().set_risk(token, fields)

    async def delete(self, token: str) -> None:
        await self._get().delete(token)


def marker_path(state_dir: Path) -> Path:
    return state_dir / MARKER


def _marker(state_dir: Path) -> list[str]:
    """The marker's words; none if it is missing or unreadable (a marker that is not text, as
    damage leaves it, made the mount fail with a UnicodeDecodeError: it only saves a check)."""
    try:
        return marker_path(state_dir).read_text().split()
    except (OSError, UnicodeDecodeError):
        return []


def may_start_offline(state_dir: Path, key: bytes) -> bool:
    """True once a mount on this machine checked this key against this vault and merged its listing."""
    return _marker(state_dir)[:1] == [key_id(key)]


def checked_vault(state_dir: Path, key: bytes) -> str | None:
    """The key-check token of the vault this machine checked this key against (None: not
    recorded; markers written before it was)."""
    lines = _marker(state_dir)
    return lines[1] if len(lines) > 1 and lines[0] == key_id(key) else None


def remember_vault_checked(state_dir: Path, key: bytes, keycheck: str | None = None) -> None:
    """Record that this key was checked against the vault whose key-check token is ``keycheck``
    (public: a fingerprint of the key and a token id, no secret)."""
    lines = [key_id(key)] + ([keycheck] if keycheck else [])
    if _marker(state_dir) == lines:
        return
    tmp = marker_path(state_dir).with_suffix(".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(marker_path(state_dir))


class Connector:
    """Connects, keeps the link attached, and reconnects with backoff (see the module docstring)."""

    def __init__(
        self,
        account: Account,
        link: VaultLink,
        refresher: Refresher,
        syncer: Syncer,
        state_dir: Path,
        check_key: Callable[..., Awaitable[None]],
        supervisor: Supervisor | None = None,
    ):
        self.account = account
        self.supervisor = supervisor or Supervisor()
        self.link = link
        self.refresher = refresher
        self.syncer = syncer
        self.state_dir = state_dir
        self.check_key = check_key
        self.offline_since: float | None = None
        self.error: str | None = None
        self.reached = False  # the last failure came with an answer (a 5xx, a malformed one): not "cannot be reached"
        self.attempts = 0
        self._wake = trio.Event()
        self._attempted = trio.Event()
        self._changed: VaultChanged | None = None  # found after a new login: the connection is dropped
        self._changed_event = trio.Event()

    # -- what the daemon asks --------------------------------------------------------------------
    def status(self) -> dict:
        return {
            "online": self.link.online,
            "offline_since": self.offline_since,
            "offline_reason": None if self.link.online else self.link.reason,
            "connect_error": self.error,
            "events": self.link.events(),
        }

    async def try_now(self, timeout: float) -> bool:
        """Offline: try to connect at once and wait (at most ``timeout``) for that attempt. True if online."""
        if self.link.online:
            return True
        attempted = self._attempted
        self._wake.set()
        with trio.move_on_after(timeout):
            await attempted.wait()
        return self.link.online

    # -- the task --------------------------------------------------------------------------------
    async def run(self, task_status: trio.TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
        """Started with ``nursery.start``: reports True (online) or False (started offline) after the
        first attempt, or raises why the mount cannot start."""
        first = True
        delay = FIRST_RETRY
        while True:
            self.attempts += 1
            try:
                # the first attempt of a vault that may start offline is bounded until the vault
                # answered (--server-timeout): a server that never answers must not hold the mount
                # (its reads time out after a minute, retried); the attempts after it run in the
                # background. A refused connection is known in seconds
                bounded = trio.CancelScope()
                if first and may_start_offline(self.state_dir, self.account.key):
                    bounded.deadline = trio.current_time() + self.link.options.login_timeout
                with bounded:
                    async with connect(
                        self.account.endpoints, self.account.credentials, self.link.options, supervisor=self.supervisor
                    ) as client:
                        await self._bring_online(client, bounded)
                        was_offline = self.offline_since is not None
                        self.offline_since = None
                        self.error = None
                        self.attempts = 0  # attempts since the vault last answered
                        delay = FIRST_RETRY
                        self._attempt_finished()
                        if first:
                            first = False
                            task_status.started(True)
                        elif was_offline:
                            log.warning(
                                "the vault answers again: key checked, listing merged; uploading what was "
                                "staged meanwhile"
                            )
                        try:
                            await self._changed_event.wait()  # (a connection that works is kept for good)
                            changed, self._changed = self._changed, None
                            self._changed_event = trio.Event()
                            raise changed
                        finally:
                            self.link.detach("the connection to the vault was closed")
                            self.offline_since = time.time()
                if bounded.cancelled_caught:
                    raise ServerUnreachable(
                        f"the Privicore server at {self.account.endpoints.api} did not answer within "
                        f"{self.link.options.login_timeout:g}s"
                    )
            except PrivifsError as exc:
                if first and not (exc.transient and may_start_offline(self.state_dir, self.account.key)):
                    if exc.transient:
                        raise ServerUnreachable(
                            f"{exc}; privifs can start without the server only after one successful mount of "
                            f"this vault with this key on this machine"
                        ) from None
                    raise
                self._went_offline(str(exc), login_refused=isinstance(exc, AuthenticationError))
                self.error = str(exc)
                self.reached = not isinstance(exc, ServerUnreachable) or isinstance(exc, MalformedHTTP)
                if first:
                    first = False
                    log.warning(
                        "starting OFFLINE: %s. Serving the local index and cache: cached files are "
                        "readable, others fail with EIO; writes are staged and uploaded once the server "
                        "answers (retrying in the background)",
                        exc,
                    )
                    task_status.started(False)
                elif self.attempts == 0:
                    log.warning("lost the vault (%s); working offline, next attempt in %.0fs", exc, delay)
                elif isinstance(exc, VaultChanged):
                    log.error("%s; next attempt in %.0fs", exc, delay)
                elif isinstance(exc, WrongKeyError):
                    log.error(
                        "the vault answers but refuses this key: %s; nothing is uploaded until the "
                        "mount is restarted with the right key",
                        exc,
                    )
                else:
                    log.warning("the vault cannot be used yet (%s); next attempt in %.0fs", exc, delay)
            except Exception as exc:
                if first:
                    raise
                self._went_offline(f"connecting failed unexpectedly: {exc!r}")
                self.error = repr(exc)
                log.exception("connecting to the vault failed unexpectedly; next attempt in %.0fs", delay)
            self._attempt_finished()
            with trio.move_on_after(delay):
                await self._wake.wait()
            self._wake = trio.Event()
            delay = min(MAX_RETRY, delay * 2)

    def _attempt_finished(self) -> None:
        self._attempted.set()
        self._attempted = trio.Event()

    def _went_offline(self, reason: str, *, login_refused: bool = False) -> None:
        self.link.detach(reason, login_refused=login_refused)
        if self.offline_since is None:
            self.offline_since = time.time()

    async def _bring_online(self, client, bounded: trio.CancelScope | None = None) -> None:
        """Key check and listing merge on a fresh connection, then the link goes live and the
        write-back starts over. Once the vault answered, ``bounded`` (the first attempt's time
        limit) no longer applies: the merge is never cut off."""
        infos, started = await self.refresher.fetch(client.tokens)
        await self._same_vault(client.tokens, infos)
        keycheck = await self.check_key(client.vault(self.account.key), infos)
        if bounded is not None:
            bounded.deadline = math.inf
        client.session.verify = partial(self._still_the_vault, client.tokens)
        self.link.attach(client.tokens)
        try:
            infos = await self.refresher.complete(infos, started, client.tokens)
            await self.refresher.apply(infos, started)
        except BaseException:
            self.link.detach("merging the listing failed")
            raise
        remember_vault_checked(self.state_dir, self.account.key, keycheck)
        self.syncer.unreachable_since = None
        self.syncer.retry_all_now()
        # the listing was an answer: an fsync in the mount's first seconds waits through a restart
        # of the server as a later one does (it failed with EIO after the client's own retries)
        self.syncer.answered()

    async def _same_vault(self, tokens: DataTokens, infos: list[TokenInfo] | None = None) -> None:
        """VaultChanged unless the vault this machine checked (its key-check token, recorded by
        the last connection) is the one answering: the same URL and user name may lead to
        another vault (the server's data replaced, another server behind the name), whose
        listing would empty the tree and which would take the uploads staged here for good."""
        recorded = checked_vault(self.state_dir, self.account.key)
        if recorded is None:
            return
        whole = infos
        if infos is None:
            infos = [i async for i in tokens.list(context=RESERVED_CONTEXT)]
        checks = [i.token for i in key_checks(infos)]
        if recorded in checks or await find(tokens, recorded) is not None:  # (a listing may skip a token)
            return
        known = len(self.refresher.ns.by_token)
        held = await self._known_files_held(tokens, whole)
        if held or (not known and self._nothing_staged()):
            # the key check alone was deleted (another application's clean-up): the vault's files
            # this mount knows, named by ids the server made, are still there, or it knows none
            # and has nothing to upload (nothing to lose). Refused, every machine that had
            # mounted the vault was locked out of it (helpers hAG F3, hAH F6)
            now = naming_check(infos)
            log.warning(
                "the vault's key check %s, recorded when this machine last checked it, is gone (deleted by "
                "another application?), but %s: the same vault; its key check is now %s",
                recorded,
                f"the vault still holds {held} of the files this mount knows" if held else "this mount knows no file",
                now.token if now is not None else "made anew",
            )
            if now is not None:  # (else the key check made at this connection is recorded)
                remember_vault_checked(self.state_dir, self.account.key, now.token)
            return
        files = (
            f"it holds none of the {count(known, 'file')} this mount knows"
            if known
            else "this mount knows no file to look for and has changes staged"
        )
        raise VaultChanged(
            f"the server at {self.account.endpoints.api} answers with another vault than this mount's: the key "
            f"check {recorded} it was checked with is gone (the vault has {', '.join(checks) or 'none'}), and "
            f"{files}; nothing is uploaded to it or taken from its listing. If that vault is the one to use from "
            f"now on, unmount and remove {marker_path(self.state_dir)}; what is staged here is then uploaded to it"
        )

    async def _known_files_held(self, tokens: DataTokens, infos: list[TokenInfo] | None) -> int:
        """How many of the files this mount knows the vault holds: those the whole listing
        (``infos``) shows, or without it, of :data:`KNOWN_ASKED` asked for by id. A token id is
        the server's, never reused: another vault holds none of them, so one is proof enough."""
        known = list(self.refresher.ns.by_token)
        if infos is not None:
            listed = {i.token for i in infos}
            return sum(t in listed for t in known)
        # spread over the tree: the first ones are the oldest, which one rm -r may take together
        return len(await find_each(tokens, random.sample(known, min(KNOWN_ASKED, len(known)))))

    def _nothing_staged(self) -> bool:
        return self.syncer.pending().count == 0 and not self.syncer.tombstone_count()

    async def _still_the_vault(self, tokens: DataTokens) -> None:
        """After a new login while connected (the server forgot the session: restarted, or
        replaced): the vault must still be the one checked. If not, the link goes down at
        once, before the call that met the new login is sent again, and the connection is
        dropped; the connector tries again with backoff until the vault comes back."""
        try:
            await self._same_vault(tokens)
        except VaultChanged as exc:
            self.link.detach(str(exc))
            self._changed = exc
            self._changed_event.set()
            raise

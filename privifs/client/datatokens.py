"""Data-token operations on ciphertext: store (reserve → temporary token → inline exchange or
upstream stream → configure file meta), retrieve (request data → inline or downstream), list,
update, risk meta, delete.

This layer never sees plaintext or keys (see :mod:`privifs.client.vault`). A store that fails
part-way restarts from a fresh reservation (stream authorizations are single-use and a lost 202
is never repeated); an unpromoted reservation simply expires on the server.
"""

from __future__ import annotations

import base64
import logging
import math
import random
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass
from typing import Protocol

import httpx
import trio

from privifs.client import shapes
from privifs.client.events import Commands, EventHub, websocket
from privifs.client.http11 import Answer, HTTPFailure
from privifs.client.transport import ClientOptions, Transport, failure_text
from privifs.errors import (
    CommandPending,
    CommandRejected,
    IntegrityError,
    MalformedAnswer,
    NotFoundError,
    PrivifsError,
    ProtocolError,
    RequestRejected,
    ServerError,
    ServerUnreachable,
    UnknownCommand,
    VaultError,
    rejected_command,
    single_error,
)

log = logging.getLogger("privifs.client.datatokens")

DOWNLOAD_CHUNK = 1024 * 1024
LISTING_LAG = 10.0  # how long a token configure-file-meta named is waited for in the listing
RESERVE_TTLS = ("5", "60")  # what reserve-token-space asks for: first, and after an upload outlived it
B64_ALPHABET = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=\r\n-_")


@dataclass
class FileMeta:
    """What configure-file-meta records: ``size`` is the plaintext size."""

    file_name: str
    extension: str
    context: str
    size: int
    path: str

    def form(self, temp_token: str) -> dict[str, str]:
        return {
            "token": temp_token,
            "fileName": self.file_name,
            "extension": self.extension,
            "context": self.context,
            "size": str(self.size),
            "path": self.path,
        }


Body = bytes | Callable[[], AsyncIterator[bytes]]


class DataTokens:
    def __init__(self, transport: Transport, commands: Commands, hub: EventHub, options: ClientOptions):
        self.transport = transport
        self.commands = commands
        self.hub = hub
        self.options = options
        self._held: dict[str, str] = {}  # context → its reservation command a vote holds
        # the reservation's ttl: 5, as the live probe sent it, until an upload outlives it (a
        # server counting it in seconds, as the guides say, and a slow link); then the largest
        # the API allows, 60, unless the server refuses that (RESERVE_TTLS, reference 5.4)
        self.ttl = RESERVE_TTLS[0]
        self.token_filter_ignored = False  # the server lists other tokens for filters[token]

    # -- store ---------------------------------------------------------------------------------
    async def reserve(self, context: str) -> shapes.TemporaryToken:
        """A temporary token for ``context``. A reservation an earlier attempt left in flight (held
        by a vote, say) is resumed rather than asked for again, so one store never opens several
        votes."""
        cid = self._held.get(context)
        if cid is not None:
            try:
                state = await self.commands.poll(cid)
            except UnknownCommand:
                state = None
            if state is not None and state.pending:
                raise CommandPending(
                    f"reserving token space is still waiting for the server (command {cid}; a vote may be holding it)",
                    command_id=cid,
                )
            if self._held.get(context) == cid:  # a concurrent store may have settled it already
                del self._held[context]
            if state is not None and state.status == 2:
                return await self._temporary(cid)
            if state is not None:
                raise rejected_command(
                    f"reserve token space was rejected by the server: {state.reason}",
                    command_id=cid,
                    reason=state.reason,
                )
        ttl = self.ttl
        try:
            resp = await self.transport.call(
                "POST",
                "/data-token/reserve-token-space",
                data={"context": context, "ttl": ttl},
                idempotent=True,
                expected=(202, 200),
                what="reserve token space",
            )
        except RequestRejected as exc:
            if ttl == RESERVE_TTLS[0] or "ttl" not in exc.fields:
                raise
            log.warning("the server refuses a reservation ttl of %s (%s); back to %s", ttl, exc, RESERVE_TTLS[0])
            self.ttl = RESERVE_TTLS[0]
            return await self.reserve(context)
        cid = shapes.command_id(resp)
        try:
            await self.commands.wait(cid, what="reserve token space")
        except CommandPending:
            self._held[context] = cid
            raise
        return await self._temporary(cid)

    async def _temporary(self, cid: str) -> shapes.TemporaryToken:
        for attempt in range(6):
            resp = await self.transport.call(
                "GET",
                f"/data-token/retrieve-temporary-data-token/{cid}",
                idempotent=True,
                expected=(200, 404),
                what="retrieve temporary token",
            )
            if resp.status_code == 200:
                return shapes.temporary_token(shapes.json_or_text(resp))
            await trio.sleep(0.25 * (attempt + 1))
        raise NotFoundError("the reservation was acknowledged but its temporary token never appeared", status=404)

    async def exchange(self, tmp: shapes.TemporaryToken, wire: bytes) -> None:
        resp = await self.transport.call(
            "POST",
            "/data-token/exchange-data-for-token",
            data={"temporaryTokenSpace": tmp.token, "data": base64.b64encode(wire).decode()},
            expected=(202, 200),
            what="exchange data for token",
        )
        await self.commands.wait(shapes.command_id(resp), what="exchange data for token")

    async def upload(self, tmp: shapes.TemporaryToken, body: Body, wire_size: int) -> None:
        url = shapes.upstream_url(tmp, self.transport.endpoints.upstream)
        if url is None:
            raise ProtocolError(
                "the server gave no upstream stream authorization for a payload too large to send inline"
            )
        content = body if isinstance(body, bytes) else body()
        lean = self.transport.lean
        try:
            if lean is not None and url.startswith("http://") and not isinstance(content, bytes):
                # the engine on loopback: pieces go to the socket as they are (no copy per piece)
                try:
                    resp = await lean.upload(
                        url,
                        content,
                        {"Content-Type": "application/octet-stream", "Content-Length": str(wire_size)},
                    )
                except HTTPFailure as exc:
                    raise ServerUnreachable(f"upload to the upstream server failed ({exc})") from None
            else:
                resp = await self._upload_httpx(url, content, wire_size)
        finally:
            if not isinstance(content, bytes) and hasattr(content, "aclose"):
                await content.aclose()
        if not 200 <= resp.status_code < 300:
            raise self.transport.error_for(resp, "upstream upload")

    async def _upload_httpx(self, url: str, content: bytes | AsyncIterator[bytes], wire_size: int) -> httpx.Response:
        try:
            return await self.transport.http.post(
                url,
                content=content,
                headers={"Content-Type": "application/octet-stream", "Content-Length": str(wire_size)},
                # each write and the wait for the answer bounded like any call (none bounded: an
                # upstream that stopped reading or answering held the upload, and the file's
                # write-back, for good); waiting for a pooled connection is not
                timeout=httpx.Timeout(self.options.http_timeout, connect=self.options.connect_timeout, pool=None),
            )
        except httpx.TransportError as exc:
            raise ServerUnreachable(f"upload to the upstream server failed ({failure_text(exc)})") from None

    async def configure(self, tmp: shapes.TemporaryToken, meta: FileMeta) -> str:
        resp = await self.transport.call(
            "POST",
            "/data-token/configure-file-meta",
            data=meta.form(tmp.token),
            idempotent=True,
            what="configure file meta",
        )
        return shapes.permanent_token(shapes.json_or_text(resp))

    async def store(self, body: Body, wire_size: int, meta: FileMeta) -> str:
        """Store a ciphertext (bytes, or a factory of a fresh chunk iterator) and return its permanent token."""
        inline = isinstance(body, bytes) and wire_size <= self.options.inline_limit
        last: Exception | None = None
        for attempt in range(self.options.store_attempts):
            # reserve, retrieve and configure retry on their own (idempotent); a failure that
            # reaches here from them is final for this attempt chain, but for a reservation whose
            # command id the server does not know (changed on its way): a new one is asked for
            try:
                tmp = await self.reserve(meta.context)
            except UnknownCommand as exc:
                last = exc
                log.info("reserving token space for %s: %s; asking again", meta.file_name, exc)
                await trio.sleep(self.transport.backoff(attempt))
                continue
            try:
                can_stream = shapes.upstream_url(tmp, self.transport.endpoints.upstream) is not None
                if inline or not can_stream:
                    if not isinstance(body, bytes):
                        # (transient: a temporary token answer whose "stream" was changed on its
                        # way; a server that never gives one fails after store_attempts)
                        raise MalformedAnswer(
                            "the server gave no upstream stream authorization for a payload too large to send inline"
                        )
                    try:
                        await self.exchange(tmp, body)
                    except RequestRejected as exc:
                        if exc.status in (413, 422) and "data" in exc.fields and can_stream:
                            log.info("the server refused %d bytes inline; streaming instead", wire_size)
                            inline = False
                            continue
                        raise
                else:
                    try:
                        await self.upload(tmp, body, wire_size)
                    except RequestRejected as exc:
                        if exc.status != 410 or self.ttl == RESERVE_TTLS[-1]:
                            raise
                        # the reservation ran out while the bytes were on their way: a ttl of 5
                        # seconds (the guides' unit) and a link too slow to send them in that
                        log.warning(
                            "storing %s: %s; reserving with a ttl of %s from now on",
                            meta.file_name,
                            exc,
                            RESERVE_TTLS[-1],
                        )
                        self.ttl = RESERVE_TTLS[-1]
                        continue
            except (CommandPending, CommandRejected):
                raise
            except VaultError as exc:
                # the exchange or upload (sent once: not idempotent) failed: start over from a new
                # reservation; the old one expires unpromoted on the server. So when the server
                # does not know the temporary token or stream authorization (404: expired, or
                # changed on its way): nothing was stored
                if not exc.transient and not isinstance(exc, NotFoundError):
                    raise
                last = exc
                log.info("storing %s failed (%s); restarting from a new reservation", meta.file_name, exc)
                await trio.sleep(self.transport.backoff(attempt))
                continue
            try:
                return await self._configured(tmp, meta)
            except NotFoundError as exc:
                if getattr(exc, "unconfigured", None) is not None:
                    raise
                last = exc  # twice unknown: the reservation made nothing (see _configured)
                log.info("storing %s: %s; restarting from a new reservation", meta.file_name, exc)
                await trio.sleep(self.transport.backoff(attempt))
        assert last is not None
        raise last

    async def _configured(self, tmp: shapes.TemporaryToken, meta: FileMeta) -> str:
        """configure-file-meta until it answers with a token the vault lists. Asking again is
        safe (a server promotes a reservation once and names that token again), while giving up
        may leave a token the server made but the client never learnt of. An answer changed on
        its way (a flipped character, a proxy's ``hello`` taken for a bare-string token) looks
        like any token, and what a file names is kept: a manifest naming such a part read EIO on
        every mount while the real part went unnamed, a directory's marker became an empty file.
        A listing that lags behind is waited for up to :data:`LISTING_LAG` seconds (an answer is
        never taken unlisted, not even one named several times: a middlebox changing the same
        byte of every answer names the same wrong token each time). A failure that lasts carries
        ``tmp`` as the error's ``unconfigured``, for the caller to settle
        (``Syncer._drop_unconfigured``)."""
        failures = unknown = 0
        deadline = trio.current_time() + LISTING_LAG
        while True:
            try:
                token = await self.configure(tmp, meta)
                if await self._listed(token):
                    return token
            except VaultError as exc:
                failures += 1
                if isinstance(exc, NotFoundError) and not isinstance(exc, CommandRejected):
                    # the server does not know the temporary token (expired, or changed on its
                    # way): asked once more (a 404 changed on its way after it made the token),
                    # then, said twice, nothing was made and the caller starts over
                    unknown += 1
                    if unknown == 2:
                        raise
                elif not getattr(exc, "transient", False) or failures == self.options.store_attempts:
                    exc.unconfigured = tmp
                    raise
                log.info("configuring %s failed (%s); asking again", meta.file_name, exc)
                await trio.sleep(self.transport.backoff(failures - 1))
                continue
            unlisted = MalformedAnswer(
                f"configure-file-meta named token {token!r} for {meta.file_name!r}, which the vault does not list"
            )
            if trio.current_time() >= deadline:
                unlisted.unconfigured = tmp
                raise unlisted
            log.info("%s; asking again", unlisted)
            await trio.sleep(0.25)

    async def _listed(self, token: str) -> bool:
        """Whether the vault lists ``token``, asked for by id (``filters[token]``). A server that
        ignores the filter would have every store read the whole listing: once two asks for a
        token no vault has list something, a token is taken as named, unconfirmed (as before the
        check). One answer naming another token is not that: one flipped byte in it turned the
        check off for good, and a manifest then named a part that does not exist."""
        if self.token_filter_ignored:
            return True
        first = await self._first_listed(token)
        if first is None:
            return False
        if first.token == token:
            return True
        if await self._ignores_token_filter():
            self.token_filter_ignored = True
            log.warning(
                "the server ignores filters[token] in listings; the tokens configure-file-meta names "
                "are taken without asking the listing"
            )
            return True
        return False  # (an answer changed on its way: asked again)

    async def _ignores_token_filter(self) -> bool:
        """Whether the server lists tokens when asked for one no vault has (twice)."""
        for _ in range(2):
            if await self._first_listed(f"privifs-no-such-token-{secrets.token_hex(8)}") is None:
                return False
        return True

    async def _first_listed(self, token: str) -> shapes.TokenInfo | None:
        """The first token a listing asked for ``token`` by id shows (only its first page read)."""
        async with aclosing(self.list(token=token)) as infos:
            async for info in infos:
                return info
        return None

    # -- retrieve ----------------------------------------------------------------------------
    async def request(self, token: str) -> shapes.RequestResult:
        """request-data and wait for its result. When no result comes (acks can be dropped and
        request ids cannot be polled) it is issued again; a result for any issued id is taken."""
        waiter = None
        rids: list[str] = []
        try:
            for attempt in range(self.options.request_attempts):
                await self.hub.after_reopen()  # (a result pushed while it is opened again is lost)
                resp = await self.transport.call(
                    "POST",
                    "/data-token/request-data",
                    data={"token": token},
                    idempotent=True,
                    expected=(202, 200),
                    what="request data",
                )
                try:
                    rid = shapes.request_id(resp)
                except MalformedAnswer as exc:  # nothing to wait for: ask again
                    log.info("request-data for %s: %s; asking again", token, exc)
                    await trio.sleep(self.transport.backoff(attempt))
                    continue
                if resp.headers.get("x-dpt-cab-id"):
                    self.hub.claim(resp.headers["x-dpt-cab-id"])  # its ack is ours, not a change
                rids.append(rid)
                waiter = self.hub.register("X-DPT-CAB-REQUEST-ID", rid, waiter)
                generation = self.hub.generation
                window = self.options.request_timeout * (attempt + 1) if self.hub.connected else 3.0
                with trio.move_on_after(window):
                    while True:
                        data = await waiter.next()
                        result = shapes.request_result(data)
                        if result.status.pending:
                            continue
                        if result.status.status == 3:
                            reason = result.status.reason or ""
                            raise rejected_command(
                                f"request data for token {token} was rejected: {reason or 'no reason'}",
                                command_id=rid,
                                reason=reason,
                            )
                        result.request_id = data.get("id") if data.get("id") in rids else rid
                        return result
                log.info("request-data result for %s did not arrive; asking again", token)
                # on a new channel: the joined one may answer pings and deliver nothing (helper hY F2)
                self.hub.reopen(generation, f"request-data result within {window:g} s")
        finally:
            if waiter is not None:
                self.hub.unregister(waiter)
        raise CommandPending(
            f"no data arrived for token {token} after {len(rids)} requests", command_id=rids[-1] if rids else ""
        )

    @asynccontextmanager
    async def open_download(self, result: shapes.RequestResult, wire_size: int | None = None):
        """Yield an async iterator of the wire bytes of a request result (inline or streamed)."""
        if result.output_type in (0, None):
            if not isinstance(result.body, str):
                raise ProtocolError("the inline request-data result carries no payload")
            data = shapes.lenient_b64decode(result.body)

            async def one() -> AsyncIterator[bytes]:
                yield data

            yield one()
            return
        if result.output_type != 1 or not isinstance(result.body, str):
            raise ProtocolError(f"unexpected request-data result (output_type {result.output_type})")
        rid = result.request_id
        stream_url = result.stream_url
        if rid is not None:
            waiter = self.hub.register("STREAM-READY", rid)
            try:
                with trio.move_on_after(self.options.stream_ready_wait if self.hub.connected else 0.2):
                    ready = await waiter.next()
                    stream_url = stream_url or ready.get("streamUrl")
            finally:
                self.hub.unregister(waiter)
        if isinstance(stream_url, str) and stream_url.startswith(("ws://", "wss://")):
            # (its close handshake bounded: a stream server that never answered it held a refused
            # download, and the read, for trio-websocket's default minute)
            async with websocket(
                stream_url, self.options.server_uid, connect_timeout=self.options.connect_timeout, disconnect_timeout=2
            ) as ws:

                async def frames() -> AsyncIterator[bytes]:
                    from trio_websocket import ConnectionClosed

                    try:
                        while True:
                            msg = await ws.get_message()
                            yield msg if isinstance(msg, bytes) else msg.encode()
                    except ConnectionClosed:
                        return

                yield frames()
            return
        base = self.transport.endpoints.downstream
        if not base:
            raise ProtocolError("no downstream URL is configured for streamed retrievals")
        # a downstream server with too many downloads in flight answers 503 with Retry-After at
        # once, the authorization unused: the server is there and says when to come back, so the
        # same authorization is tried again for as long as a stalled answer would be waited for
        give_up = trio.current_time() + self.options.http_timeout
        while True:
            async with self._download(base, result.body, wire_size) as (chunks, busy):
                if chunks is not None:
                    yield chunks
                    return
            if trio.current_time() + busy > give_up:
                raise ServerError("download: the server has too many downloads in flight; requesting the data again")
            log.debug("download: the server has too many downloads in flight; trying again in %.1fs", busy)
            await trio.sleep(busy)

    def _body(self, chunks: AsyncIterator[bytes], headers, wire_size: int | None) -> AsyncIterator[bytes]:
        """A 200 answer's body, decoded, failing if it trickles (see :func:`_progressing`)."""
        return _decode_download(
            _progressing(chunks, self.options.http_timeout), headers.get("content-length"), wire_size
        )

    @asynccontextmanager
    async def _download(self, base: str, auth: str, wire_size: int | None):
        """One GET of the downstream authorization ``auth``: ``(chunks, None)``, or ``(None,
        seconds)`` for a busy server's 503 with Retry-After (try again after that many seconds);
        any other answer is a transient error."""
        lean = self.transport.lean
        if lean is not None and base.startswith("http://"):
            try:
                async with lean.download(base.rstrip("/"), "/", params={"auth": auth}) as answer:
                    if answer.status_code != 200:
                        text = await answer.read()
                        busy = _busy(answer.status_code, answer.headers)
                        if busy is not None:
                            yield None, busy
                            return
                        err = self.transport.error_for(Answer(answer.status_code, answer.headers, text), "download")
                        raise ServerError(f"{err}; requesting the data again", status=answer.status_code)
                    yield self._body(answer.body(), answer.headers, wire_size), None
            except HTTPFailure as exc:
                raise ServerUnreachable(f"download from the downstream server failed ({exc})") from None
            return
        try:
            async with self.transport.http.stream(
                "GET",
                f"{base.rstrip('/')}/",
                params={"auth": auth},
                timeout=httpx.Timeout(self.options.http_timeout, connect=self.options.connect_timeout),
            ) as resp:
                if resp.status_code != 200:
                    await resp.aread()
                    busy = _busy(resp.status_code, resp.headers)
                    if busy is not None:
                        yield None, busy
                        return
                    err = self.transport.error_for(resp, "download")
                    # a used or expired downstream authorization: ask for the data again
                    raise ServerError(f"{err}; requesting the data again", status=resp.status_code)
                yield self._body(resp.aiter_raw(), resp.headers, wire_size), None
        except httpx.TransportError as exc:
            raise ServerUnreachable(f"download from the downstream server failed ({failure_text(exc)})") from None

    async def fetch(
        self, token: str, consume: Callable[[AsyncIterator[bytes]], Awaitable[None]], wire_size: int | None = None
    ) -> None:
        """Retrieve ``token`` and hand its wire bytes to ``consume``; retries from request-data when
        the download breaks (``consume`` then starts over with a fresh iterator), at least
        ``request_attempts`` times and, while the download server answers, for ``fetch_budget``
        seconds: each retry's request-data was answered too, so the server is there (one that
        is not fails the request at once)."""
        deadline = trio.current_time() + self.options.fetch_budget
        attempt = 0
        while True:
            result = await self.request(token)  # retries on its own; its failures are final here
            answered = False
            try:
                async with self.open_download(result, wire_size) as chunks:
                    answered = True
                    await consume(chunks if wire_size is None else _at_most(chunks, wire_size, token))
                return
            except VaultError as exc:
                # the download broke or its single-use authorization was refused: ask again;
                # for the budget only once the download server answered (one refusing
                # connections failed each read after the whole budget: helper hU N2)
                attempt += 1
                if (
                    not exc.transient
                    or attempt >= self.options.request_attempts
                    and (not answered or trio.current_time() >= deadline)
                ):
                    raise
                log.info("retrieving %s failed (%s); asking again", token, exc)
                await trio.sleep(self.transport.backoff(attempt - 1))

    # -- listing and meta -------------------------------------------------------------------------
    async def list(
        self,
        *,
        context: str | None = None,
        token: str | None = None,
        per_page: int = 500,
        ending: dict | None = None,
    ) -> AsyncIterator[shapes.TokenInfo]:
        """Every token of the profile (or of one context, or just ``token``), page by page: until
        an empty page, a page shorter than the page size the server states, or the count the
        server states is reached, or (no count that can be a total) a page shorter than the
        longest one yet. A server that caps ``perPage`` below what was asked (25 by the
        reference's example) answers full pages shorter than ``per_page``: taken for the last
        page, the listing ended after the first, and tokens other clients added past it never
        showed. ``meta.count`` may be the total or the page's own items (undocumented): a count
        equal to the page's items is no total (taken for one, a listing of full pages ended
        after the first). A page that repeats the previous one (a server ignoring ``page``)
        ends it. ``ending``, when given, gets ``whole``: whether the listing provably reached
        its end (the total the server states, or a last page that holds tokens and is shorter
        than a full one) rather than at an empty page no total vouches for, which is also what a
        middlebox's well-formed empty page looks like (:func:`whole_listing`)."""
        page = 1
        seen = 0
        longest = 0
        previous: list[str] | None = None
        while True:
            params = {"page": str(page), "perPage": str(per_page)}
            if context is not None:
                params["filters[context]"] = context
            if token is not None:
                params["filters[token]"] = token
            for attempt in range(self.transport.options.retry_attempts):
                resp = await self.transport.call(
                    "GET", "/data-token/list-data-tokens", params=params, idempotent=True, what="list data tokens"
                )
                try:
                    items, count, stated = shapes.listing_page(shapes.json_or_text(resp))
                    total = count is not None and count != len(items)  # (a page's own size is no total)
                    last = not items or (stated is not None and len(items) < stated)  # shorter than the server's page
                    if last and total and seen + len(items) < count:
                        # a last page short of the total the server states (a count of the page's
                        # own items equals them): cut short on its way, not the end
                        raise MalformedAnswer(
                            f"list data tokens: page {page} ends the listing with {seen + len(items)} tokens,"
                            f" but the server states {count}"
                        )
                    break
                except MalformedAnswer as exc:  # a page cut short or a proxy's page: ask for it again
                    if attempt + 1 == self.transport.options.retry_attempts:
                        raise
                    log.info("%s; asking for page %d again", exc, page)
                    await trio.sleep(self.transport.backoff(attempt))
            infos = [shapes.TokenInfo.from_item(item) for item in items]
            tokens = [info.token for info in infos]
            if tokens and tokens == previous:
                log.warning("the server answered page %d of the listing with page %d again; ending it", page, page - 1)
                if ending is not None:
                    ending["whole"] = False  # (what lies past the first page is not known)
                return
            previous = tokens
            for info in infos:
                yield info
            seen += len(items)
            longest = max(longest, len(items))
            if ending is not None:  # (when this page ends it: a page that holds tokens, or the total)
                ending["whole"] = bool(items) or page == 1 or (total and seen >= count)
            if last:
                return
            if total:
                if seen >= count:
                    return
            elif len(items) < longest:  # shorter than a full page: the last one
                return
            page += 1

    async def _command(self, path: str, form: dict[str, str], what: str, *, missing_ok: bool = False) -> None:
        """A command on ``form["token"]``; with ``missing_ok``, a token the server says is gone
        counts as done once the vault does not list it either (an answer changed on its way to a
        404 left a deleted file's token in the vault: it came back on every mount)."""
        try:
            resp = await self.transport.call("POST", path, data=form, idempotent=True, expected=(202, 200), what=what)
            await self.commands.wait(shapes.command_id(resp), what=what)
        except NotFoundError as exc:  # (a rejected command's TokenMissing too)
            if not missing_ok:
                raise
            await confirm_gone(self, form["token"], exc, what)

    async def update(
        self, token: str, *, file_name: str | None = None, extension: str | None = None, context: str | None = None
    ) -> None:
        form = {"token": token}
        for k, v in (("fileName", file_name), ("extension", extension), ("context", context)):
            if v is not None:
                form[k] = v
        await self._command("/data-token/update-data-token", form, "update data token")

    async def set_risk(self, token: str, fields: dict[str, str]) -> None:
        await self._command(
            "/data-token/configure-information-security-risk-meta", {"token": token, **fields}, "configure risk meta"
        )

    async def delete(self, token: str) -> None:
        """Delete a token; deleting one that is already gone succeeds (idempotent unlink)."""
        await self._command("/data-token/delete-data", {"token": token}, "delete data", missing_ok=True)


def _busy(status: int, headers) -> float | None:
    """Seconds to wait before the same download is tried again: a 503 with a ``Retry-After`` in
    seconds (a server with too many downloads in flight; at most 10, jittered so that the clients
    it turned away do not all come back at once), or None for any other answer."""
    if status != 503:
        return None
    try:
        seconds = float(headers.get("retry-after") or "")
    except ValueError:
        return None
    if not math.isfinite(seconds) or seconds < 0:
        return None
    return min(seconds, 10.0) * (0.5 + random.random())


DOWNLOAD_PROGRESS = 64 * 1024  # a download brings at least this much per read time-out, or fails


async def _at_most(chunks: AsyncIterator[bytes], wire_size: int, token: str) -> AsyncIterator[bytes]:
    """``chunks``, failing as soon as they hold more than the token's ``wire_size`` bytes. A
    server that did not stop (a Content-Length that lies, a chunked body or a stream URL that
    goes on) was read to the end before the tag check failed: into the content cache, far past
    its limit, until the disk was full (helper hY: 8 GB in 30 s for a 100 KB file)."""
    got = 0
    async for chunk in chunks:
        got += len(chunk)
        if got > wire_size:
            raise IntegrityError(
                f"the server sent more than the {wire_size} bytes token {token} holds; the content is refused"
            )
        yield chunk


async def _progressing(chunks: AsyncIterator[bytes], window: float) -> AsyncIterator[bytes]:
    """``chunks``, failing (transient: the fetch asks for the data again) once less than
    :data:`DOWNLOAD_PROGRESS` bytes arrived in ``window`` seconds. The read time-out is per read:
    a downstream server trickling a byte a second never tripped it, and ``privifs token get`` of
    a 120 KB token sat there for 33 hours' worth of it."""
    start, got = trio.current_time(), 0
    async for chunk in chunks:
        got += len(chunk)
        if got >= DOWNLOAD_PROGRESS:
            start, got = trio.current_time(), 0
        elif trio.current_time() - start > window:
            raise ServerUnreachable(
                f"download from the downstream server failed (ReadTimeout: under "
                f"{DOWNLOAD_PROGRESS // 1024} KiB in {window:g} s: the server trickles)"
            )
        yield chunk


async def _decode_download(
    chunks: AsyncIterator[bytes], content_length: str | None, wire_size: int | None
) -> AsyncIterator[bytes]:
    """Raw bytes as a rule; base64 text when the body is plainly base64 and not the raw size."""
    first = b""
    async for chunk in chunks:
        first = chunk
        break
    raw = (
        wire_size is not None
        and content_length is not None
        and content_length.isdigit()
        and int(content_length) == wire_size
    )
    if not raw and first and len(first) >= 64 and all(b in B64_ALPHABET for b in first[:4096]):
        carry = b""
        pending = [first]

        async def rest():
            for c in pending:
                yield c
            async for c in chunks:
                yield c

        async for c in rest():
            data = carry + bytes(b for b in c if b not in b"\r\n")
            cut = len(data) - len(data) % 4
            carry = data[cut:]
            if cut:
                yield shapes.lenient_b64decode(data[:cut].decode("ascii"))
        if carry:
            yield shapes.lenient_b64decode(carry.decode("ascii"))
        return
    if first:
        yield first
    async for chunk in chunks:
        yield chunk


class Lister(Protocol):
    """What lists tokens: :class:`DataTokens`, or what stands in for it (the mount's VaultLink)."""

    def list(self, **filters) -> AsyncIterator[shapes.TokenInfo]: ...


async def whole_listing(tokens: Lister) -> list[shapes.TokenInfo] | None:
    """Every token, or None when the listing's end cannot be told from its pages (it ended at an
    empty page no stated total vouches for). What deletes tokens because a listing lacks others
    (the part collector) acts only on one that is whole: a proxy's well-formed empty page
    (``{"items": []}``) ended listings early, and the parts of files whose manifests came after
    it were collected (helper hL: 6 of 6, the files EIO for good)."""
    ending: dict = {}
    infos = [i async for i in tokens.list(ending=ending)]
    return infos if ending.get("whole") else None


async def find(tokens: Lister, token: str) -> shapes.TokenInfo | None:
    """``token`` as the vault lists it, asked for by id (``filters[token]``), or None when the
    vault does not have it; what a server that ignores the filter lists besides is passed over."""
    found = [i async for i in tokens.list(token=token) if i.token == token]
    return found[0] if found else None


async def confirm_gone(tokens: Lister, token: str, exc: PrivifsError, what: str) -> None:
    """After ``exc``, a 404 for ``token``: returns when the vault no longer lists the token;
    raises :class:`~privifs.errors.MalformedAnswer` (transient: asked again) when it still does,
    for then the 404 was changed on its way or sent by a middlebox, not the server's word. Taken
    for "gone", such a 404 dropped a rename, left a removed file's token, or retired a part a
    conflict copy still named."""
    if await find(tokens, token) is not None:
        raise MalformedAnswer(f"{what}: the server said token {token} is gone, yet the vault lists it ({exc})") from exc


async def find_each(tokens: Lister, wanted: list[str], in_flight: int = 8) -> list[shapes.TokenInfo]:
    """Those of ``wanted`` the vault has, each asked for by id (``in_flight`` at a time), in the
    order asked. The listing is read page by page, and a deletion while it is read makes a page
    start one token later: a token a listing lacks may still exist, and this tells the two apart."""
    found: dict[str, shapes.TokenInfo] = {}
    limiter = trio.CapacityLimiter(in_flight)

    async def ask(token: str) -> None:
        async with limiter:
            info = await find(tokens, token)
        if info is not None:
            found[token] = info

    with single_error():
        async with trio.open_nursery() as nursery:
            for token in wanted:
                nursery.start_soon(ask, token)
    return [found[t] for t in wanted if t in found]


__all__ = ["DataTokens", "FileMeta", "PrivifsError", "confirm_gone", "find", "find_each"]

"""Start the engine: four servers (the API on privifs.engine.h1; the WebSocket proxy, upstream
and downstream on hypercorn) on one trio loop, the command runner and the janitor; write the
URLs file; stop cleanly on SIGTERM or SIGINT.

No request can end the engine. A failure inside one connection (a protocol error hypercorn's
h11/wsproto glue raises, a bug in a handler) ends that connection only: it is logged in one line
and the server goes on. Should a server still fail as a whole, it is logged with its cause and
started again on the same port, with backoff; the other servers keep running.

The API server also carries the engine's admin endpoints under ``/_engine/`` (not part of
Privicore): they read and change :class:`~privifs.engine.options.EngineOptions` at run time and
require the ``X-Engine-Admin`` header holding the secret in ``<data-dir>/admin-token``.
"""

from __future__ import annotations

import base64
import json
import logging
import secrets
import signal
from collections.abc import Callable
from functools import partial
from pathlib import Path

import h11
import hypercorn.protocol.events
import hypercorn.protocol.h11
import hypercorn.protocol.ws_stream
import hypercorn.trio.run
import hypercorn.trio.tcp_server
import trio
import wsproto.extensions
import wsproto.handshake
import wsproto.utilities
from hypercorn.config import Config
from hypercorn.trio import serve
from starlette.applications import Starlette
from starlette.convertors import StringConvertor
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from privifs.engine import (
    h1,
    routes_datatoken,
    routes_device,
    routes_oauth,
    routes_profile,
    routes_utility,
    routes_voting,
)
from privifs.engine.coalesce import CoalescingSend, PlainReads, SendTimeout, SteadyIdleTimer
from privifs.engine.core import Engine
from privifs.engine.features import build_engine
from privifs.engine.h1 import client_error, leaves, log_dropped
from privifs.engine.http import Handler, read_body
from privifs.engine.options import EngineOptions
from privifs.engine.streams import downstream_app, upstream_app
from privifs.engine.wsproxy import MAX_FRAME, websocket_app
from privifs.memory import trim_memory
from privifs.paths import write_json

log = logging.getLogger("privifs.engine")

SERVERS = ("api", "ws", "upstream", "downstream")

# hypercorn reads sockets 64 KiB at a time; streamed payloads move far faster in 1 MiB reads
hypercorn.trio.tcp_server.MAX_RECV = 1024 * 1024

# what a misbehaving or departing client can make hypercorn's protocol glue (or a handler reading
# the body) raise: an ordinary event, logged in one line, not a bug with a traceback
PROTOCOL_ERRORS = (
    h11.LocalProtocolError,
    h11.RemoteProtocolError,
    wsproto.utilities.LocalProtocolError,
    wsproto.utilities.RemoteProtocolError,
    trio.BrokenResourceError,
    trio.ClosedResourceError,
    trio.BusyResourceError,
    ConnectionError,
    ClientDisconnect,
)
RESTART_DELAY, RESTART_DELAY_MAX = 0.5, 10.0


class ContainedTCPServer(CoalescingSend, SteadyIdleTimer, PlainReads, SendTimeout, hypercorn.trio.tcp_server.TCPServer):
    """hypercorn's per-connection handler, except that its failure ends the connection only.

    Unpatched, an exception escaping one connection (e.g. h11's ``LocalProtocolError`` after a
    WebSocket upgrade request with extra bytes behind it) propagates into the server's nursery
    and stops the whole engine.
    """

    async def run(self) -> None:
        try:
            await super().run()
        except Exception as exc:  # noqa: BLE001 - logged with its cause; it ends this connection only
            log_dropped(self._server_name, exc, PROTOCOL_ERRORS)

    @property
    def _server_name(self) -> str:
        return getattr(self.config, "privifs_server", self.config.bind[0])


hypercorn.trio.run.TCPServer = ContainedTCPServer  # worker_serve looks the name up at each serve()


def valid_key(key: bytes | None) -> bool:
    """Whether a Sec-WebSocket-Key is what RFC 6455 (4.2.1) requires: base64 of 16 bytes."""
    if key is None:
        return True  # no key: hypercorn's own check answers it 400
    try:
        return len(base64.b64decode(key.strip(), validate=True)) == 16
    except ValueError:  # binascii.Error
        return False


def readable_handshake(headers, http_version: str) -> bool:
    """Whether hypercorn can take this WebSocket upgrade request's headers: wsproto decodes the
    comma lists (Connection, Sec-WebSocket-Protocol, Sec-WebSocket-Extensions) as ASCII and
    parses a permessage-deflate offer's window bits as integers, raising on anything else. A
    Sec-WebSocket-Key that is not base64 of 16 bytes (empty, ``!!!``, 5000 characters) was
    accepted with a 101; RFC 6455 asks for a 400."""
    try:
        handshake = hypercorn.protocol.ws_stream.Handshake(headers, http_version)
        if not valid_key(handshake.key):
            return False
        if handshake.extensions is not None:
            wsproto.handshake.server_extensions_handshake(
                handshake.extensions, [wsproto.extensions.PerMessageDeflate()]
            )
    except (UnicodeDecodeError, ValueError):
        return False
    return True


class CheckedWSStream(hypercorn.protocol.ws_stream.WSStream):
    """hypercorn's WebSocket stream, except that an upgrade request whose headers it cannot parse
    (a non-ASCII Sec-WebSocket-Protocol, ``client_max_window_bits=x``) is answered 400. It got
    no answer: the UnicodeDecodeError (or, at the accept, the ValueError and then an
    AttributeError in hypercorn's cleanup) dropped the connection with a traceback."""

    async def handle(self, event) -> None:
        if (
            isinstance(event, hypercorn.protocol.events.Request)
            and not self.closed
            and not readable_handshake(event.headers, event.http_version)
        ):
            self.closed = True
            headers = [(b"content-length", b"0"), (b"connection", b"close")]
            await self.send(
                hypercorn.protocol.events.Response(stream_id=self.stream_id, status_code=400, headers=headers)
            )
            await self.send(hypercorn.protocol.events.EndBody(stream_id=self.stream_id))
            return
        await super().handle(event)

    async def _handle_events(self) -> None:
        await super()._handle_events()
        if self.buffer.length > self.buffer.max_length:
            # hypercorn answered a message past websocket_max_message_size with a close (1009)
            # but kept its pieces and went on adding every piece the client sent after it: a
            # client that kept sending grew the engine without bound. Let go and hang up.
            self.buffer.clear()
            await self.send(hypercorn.protocol.events.StreamClosed(stream_id=self.stream_id))


hypercorn.protocol.h11.WSStream = CheckedWSStream  # H11Protocol looks the name up per upgrade request


class PlainH11Protocol(hypercorn.protocol.h11.H11Protocol):
    """hypercorn's HTTP/1.1 protocol, and only that: a request h11 cannot parse is answered 400
    where h11 hints 501 (a transfer coding other than chunked), as the API server does
    (``h1.client_error``), and no request switches the connection to HTTP/2. No Privicore
    client speaks HTTP/2, and every HTTP/2 connection (a prior-knowledge preface, or an
    ``Upgrade: h2c``) kept its socket open in the engine after the client closed it: a
    descriptor each, for good. The preface is now an HTTP/1.1 request like any other (a 4xx),
    and an h2c upgrade is ignored, as a server may."""

    async def _send_error_response(self, status_code: int) -> None:
        await super()._send_error_response(client_error(status_code))

    async def _check_protocol(self, event) -> None:
        return None


hypercorn.protocol.H11Protocol = PlainH11Protocol  # ProtocolWrapper looks the name up per connection


class ClientFaultsInOneLine(logging.Filter):
    """hypercorn logs every exception out of an app as "Error in ASGI Framework" with a traceback;
    when all its causes are the client's doing (it left, or broke the protocol), one INFO line."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None:
            causes = leaves(exc)
            if all(isinstance(e, PROTOCOL_ERRORS) for e in causes):
                record.msg, record.args = (
                    "a request ended on its client's side: %s",
                    ("; ".join(f"{type(e).__name__}: {e}" for e in causes),),
                )
                record.levelno, record.levelname = logging.INFO, "INFO"
                record.exc_info, record.exc_text = None, None
        return True


if not any(isinstance(f, ClientFaultsInOneLine) for f in logging.getLogger("hypercorn.error").filters):
    logging.getLogger("hypercorn.error").addFilter(ClientFaultsInOneLine())


def admin_routes(engine: Engine) -> list[Route]:
    def check(request: Request) -> None:
        given = request.headers.get("x-engine-admin", "")
        if not secrets.compare_digest(given.encode(), engine.admin_secret.encode()):
            raise HTTPException(401, "admin secret required")

    async def options(request: Request) -> Response:
        check(request)
        if request.method == "POST":
            try:
                values = json.loads(await read_body(request, 64 * 1024))
                if not isinstance(values, dict):
                    raise ValueError("expected a JSON object")
                engine.opts.update(values)
            except (ValueError, TypeError, RecursionError) as exc:
                return JSONResponse({"status": 422, "message": str(exc)}, status_code=422)
        return JSONResponse(engine.opts.as_dict())

    async def disconnect(request: Request) -> Response:
        check(request)
        return JSONResponse({"disconnected": engine.hub.disconnect_all()})

    async def sweep(request: Request) -> Response:
        check(request)
        await engine.sweep()
        return JSONResponse({"swept": True})

    return [
        Route("/_engine/options", options, methods=["GET", "POST"]),
        Route("/_engine/disconnect-websockets", disconnect, methods=["POST"]),
        Route("/_engine/sweep", sweep, methods=["POST"]),
    ]


class ExactRoutes:
    """The API app: a request for a route without path parameters whose handler is
    :func:`~privifs.engine.http.guarded` (it turns every error into an answer itself) goes
    straight to that handler by one dictionary lookup; anything else (path parameters, admin
    routes, 404, 405, redirects) through Starlette. Starlette's router matches a path against
    each route's regex in turn and wraps the call in two middleware layers and their send
    wrappers: ≈ 7 % of the engine's main thread when small files are stored. A guarded route
    whose only parameter is its last path segment (``/data-token/retrieve-temporary-data-token/
    {command_id}``, one of the five requests of every upload; the request-status, device, OAuth,
    policy and voting lookups by id) is found the same way by its prefix, unless another route
    could match a path under that prefix (its path starts with the prefix, or it is not a plain
    route): then Starlette decides, as for everything else. Authorization is each handler's."""

    def __init__(self, app: Starlette):
        self.app = app
        self.exact: dict[tuple[str, str], Handler] = {}
        self.tail: dict[tuple[str, str], tuple[str, Handler]] = {}  # (method, prefix/) -> (param, handler)
        for route in app.routes:
            if not isinstance(route, Route) or not getattr(route.endpoint, "guarded", False):
                continue
            if not route.param_convertors:
                for method in route.methods or ():
                    self.exact.setdefault((method, route.path), route.endpoint)
                continue
            prefix, _, last = route.path.rpartition("/")
            name = last[1:-1]
            if (
                list(route.param_convertors) == [name]
                and last == "{" + name + "}"
                and type(route.param_convertors[name]) is StringConvertor
                and not self._shadowed(route, prefix + "/")
            ):
                for method in route.methods or ():
                    self.tail.setdefault((method, prefix + "/"), (name, route.endpoint))

    def _shadowed(self, route: Route, prefix: str) -> bool:
        """Whether a route other than ``route`` could take a path under ``prefix`` (a literal
        path or a parameter there, a mount, or anything else that is not a plain route)."""
        for other in self.app.routes:
            if other is route:
                continue
            if not isinstance(other, Route) or other.path.startswith(prefix) or other.path_regex.match(prefix + "x"):
                return True
        return False

    @property
    def routes(self) -> list:
        return self.app.routes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            path = scope["path"]
            handler = self.exact.get((scope["method"], path))
            if handler is None and self.tail:
                cut = path.rfind("/") + 1
                found = self.tail.get((scope["method"], path[:cut])) if cut < len(path) else None
                if found is not None:
                    scope["path_params"] = {found[0]: path[cut:]}
                    handler = found[1]
            if handler is not None:
                scope["app"] = self.app
                response = await handler(Request(scope, receive, send))
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def api_app(engine: Engine) -> ExactRoutes:
    """The API's routes (building them turns nothing on: see privifs.engine.features)."""
    routes = (
        routes_utility.routes(engine)
        + routes_profile.routes(engine)
        + routes_datatoken.routes(engine)
        + routes_oauth.routes(engine)
        + routes_device.routes(engine)
        + routes_voting.routes(engine)
        + admin_routes(engine)
    )

    async def http_error(request: Request, exc: HTTPException) -> Response:
        message = {404: "Record Not Found", 405: "Method Not Allowed"}.get(exc.status_code, exc.detail)
        return JSONResponse({"status": exc.status_code, "message": message}, status_code=exc.status_code)

    return ExactRoutes(Starlette(routes=routes, exception_handlers={HTTPException: http_error}))


def _config(name: str, host: str, port: int, send_timeout: Callable[[], float] = lambda: 0.0) -> Config:
    config = Config()
    config.privifs_server = name  # named in ContainedTCPServer's log lines
    config.privifs_send_timeout = send_timeout  # the option as it is now (SendTimeout)
    config.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    config.accesslog = None  # query strings carry single-use stream tokens: never log them
    config.errorlog = logging.getLogger("hypercorn.error")
    config.keep_alive_timeout = 75
    config.keep_alive_max_requests = 2**31  # long-lived client connections are never cut mid-stream
    # the proxy reads JSON frames of up to MAX_FRAME characters: hypercorn holds a message's
    # fragments until it ends, and at 1 MiB each client sending all of a message but its end held
    # 1 MiB of the engine for as long as it liked; past this the connection closes (1009)
    config.websocket_max_message_size = 2 * MAX_FRAME
    config.graceful_timeout = 3
    return config


def write_urls_file(path: Path, urls: dict[str, str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, urls, indent=2)


async def run_engine(
    data_dir: Path,
    host: str,
    ports: dict[str, int],
    opts: EngineOptions,
    urls_file: Path | None = None,
    *,
    announce=print,
    task_status: trio.TaskStatus = trio.TASK_STATUS_IGNORED,
) -> None:
    engine = build_engine(data_dir, opts)
    stop = trio.Event()
    apps = {
        "api": api_app(engine),
        "ws": websocket_app(engine),
        "upstream": upstream_app(engine),
        "downstream": downstream_app(engine),
    }
    try:
        async with trio.open_nursery() as nursery:
            engine.nursery = nursery
            await nursery.start(engine.runner.run)
            for task in engine.background:
                nursery.start_soon(task)
            for task in engine.at_start:
                engine.spawn(task)
            nursery.start_soon(_watch_signals, stop)
            nursery.start_soon(trim_memory)
            async with trio.open_nursery() as servers:
                for name in SERVERS:
                    url = await servers.start(
                        partial(_supervised, send_timeout=lambda: engine.opts.send_timeout),
                        name,
                        apps[name],
                        host,
                        ports[name],
                        stop,
                    )
                    engine.urls[name] = url.replace("http://", "ws://", 1) if name == "ws" else url
                write_urls_file(data_dir / "urls.json", engine.urls)
                if urls_file is not None:
                    write_urls_file(urls_file, engine.urls)
                for name in SERVERS:
                    announce(f"{name:<10} {engine.urls[name]}")
                log.info("engine ready, data in %s", data_dir)
                task_status.started(dict(engine.urls))
            nursery.cancel_scope.cancel()
    finally:
        (data_dir / "urls.json").unlink(missing_ok=True)
        engine.db.close()


async def _supervised(
    name: str,
    app,
    host: str,
    port: int,
    stop: trio.Event,
    task_status: trio.TaskStatus = trio.TASK_STATUS_IGNORED,
    *,
    send_timeout: Callable[[], float] = lambda: 0.0,
) -> None:
    """Serve ``app`` until ``stop``; if the server fails, log why and serve again on the same port.

    Failing to start the first time (the port is taken) is raised: the engine cannot start."""
    started = False
    delay = RESTART_DELAY
    while True:
        began = trio.current_time()
        try:
            async with trio.open_nursery() as nursery:
                if name == "api":  # many small requests: the lean server (privifs/engine/h1.py)
                    config = _config(name, host, port)
                    timeouts = {"keep_alive_timeout": config.keep_alive_timeout, "send_timeout": send_timeout}
                    lean = h1.Server(app, name, graceful_timeout=config.graceful_timeout, **timeouts)
                    binds = await nursery.start(lean.serve, host, port, stop.wait)
                else:
                    binds = await nursery.start(
                        partial(serve, app, _config(name, host, port, send_timeout), shutdown_trigger=stop.wait)
                    )
                port = int(binds[0].rsplit(":", 1)[1])  # port 0 was given: restarts reuse the one bound
                if not started:
                    started = True
                    task_status.started(binds[0])
            return  # stop was set: a clean shutdown
        except Exception as exc:
            if not started and not stop.is_set():
                bind = next((e for e in leaves(exc) if isinstance(e, OSError)), None)
                if bind is not None:  # (it said "Permission denied" without a port: hAO F9)
                    raise OSError(
                        bind.errno, f"the {name} server cannot listen on {host} port {port}: {bind.strerror or bind}"
                    ) from None
            if not started or stop.is_set():
                raise
            if trio.current_time() - began > 60:
                delay = RESTART_DELAY
            log.error(
                "the %s server failed (%s); serving again on port %d in %.1fs",
                name,
                "; ".join(f"{type(e).__name__}: {e}" for e in leaves(exc)),
                port,
                delay,
                exc_info=exc,
            )
        await trio.sleep(delay)
        delay = min(delay * 2, RESTART_DELAY_MAX)


async def _watch_signals(stop: trio.Event) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for _ in signals:
            log.info("stopping")
            stop.set()
            return

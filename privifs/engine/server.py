"""Start the engine: four hypercorn servers (API, WebSocket proxy, upstream, downstream) on one
trio loop, the command runner and the janitor; write the URLs file; stop cleanly on SIGTERM or
SIGINT.

The API server also carries the engine's admin endpoints under ``/_engine/`` (not part of
Privicore): they read and change :class:`~privifs.engine.options.EngineOptions` at run time and
require the ``X-Engine-Admin`` header holding the secret in ``<data-dir>/admin-token``.
"""
from __future__ import annotations

import json
import logging
import os
import secrets
import signal
from pathlib import Path

import hypercorn.trio.tcp_server
import trio
from hypercorn.config import Config
from hypercorn.trio import serve
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from privifs.engine import (routes_datatoken, routes_device, routes_oauth, routes_profile, routes_utility,
                            routes_voting)
from privifs.engine.core import Engine
from privifs.engine.http import read_body
from privifs.engine.options import EngineOptions
from privifs.engine.streams import downstream_app, upstream_app
from privifs.engine.wsproxy import websocket_app

log = logging.getLogger("privifs.engine")

SERVERS = ("api", "ws", "upstream", "downstream")

# hypercorn reads sockets 64 KiB at a time; streamed payloads move far faster in 1 MiB reads
hypercorn.trio.tcp_server.MAX_RECV = 1024 * 1024


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
            except (ValueError, TypeError) as exc:
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


def api_app(engine: Engine) -> Starlette:
    routes = (routes_utility.routes(engine) + routes_profile.routes(engine) + routes_datatoken.routes(engine)
              + routes_oauth.routes(engine) + routes_device.routes(engine) + routes_voting.routes(engine)
              + admin_routes(engine))

    async def http_error(request: Request, exc: HTTPException) -> Response:
        message = {404: "Record Not Found", 405: "Method Not Allowed"}.get(exc.status_code, exc.detail)
        return JSONResponse({"status": exc.status_code, "message": message}, status_code=exc.status_code)

    return Starlette(routes=routes, exception_handlers={HTTPException: http_error})


def _config(host: str, port: int) -> Config:
    config = Config()
    config.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    config.accesslog = None  # query strings carry single-use stream tokens: never log them
    config.errorlog = logging.getLogger("hypercorn.error")
    config.keep_alive_timeout = 75
    config.keep_alive_max_requests = 2**31  # long-lived client connections are never cut mid-stream
    config.websocket_max_message_size = 1024 * 1024
    config.graceful_timeout = 3
    return config


def write_urls_file(path: Path, urls: dict[str, str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(urls, indent=2) + "\n")
    os.replace(tmp, path)


async def run_engine(data_dir: Path, host: str, ports: dict[str, int], opts: EngineOptions,
                     urls_file: Path | None = None, *, announce=print,
                     task_status: trio.TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
    engine = Engine(data_dir, opts)
    stop = trio.Event()
    apps = {"api": api_app(engine), "ws": websocket_app(engine),
            "upstream": upstream_app(engine), "downstream": downstream_app(engine)}
    try:
        async with trio.open_nursery() as nursery:
            engine.nursery = nursery
            await nursery.start(engine.runner.run)
            nursery.start_soon(engine.janitor)
            for task in engine.background:
                nursery.start_soon(task)
            engine.spawn(engine.storage.reconcile)
            nursery.start_soon(_watch_signals, stop)
            async with trio.open_nursery() as servers:
                for name in SERVERS:
                    binds = await servers.start(
                        lambda task_status, n=name: serve(apps[n], _config(host, ports[n]),
                                                          shutdown_trigger=stop.wait, task_status=task_status))
                    url = binds[0]
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


async def _watch_signals(stop: trio.Event) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for _ in signals:
            log.info("stopping")
            stop.set()
            return

"""Utility group: server health and command status (both documented paths and shapes)."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from privifs.engine.commands import STATUS_WORDS
from privifs.engine.core import Engine
from privifs.engine.http import guarded, not_found


def routes(engine: Engine) -> list[Route]:
    opts = engine.opts

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def health_with_token(request: Request) -> Response:
        engine.principal(request, require_key=False)
        return JSONResponse({"status": "ok"})

    def lookup(request: Request):
        who = engine.optional_principal(request)
        row = engine.runner.status(request.path_params["command_id"])
        # another profile's command is indistinguishable from an unknown one
        if row is None or (who is not None and row["profile_id"] not in (None, who.profile_id)):
            raise not_found()
        return row

    async def status_word(request: Request) -> Response:
        row = lookup(request)
        word = STATUS_WORDS.get(row["status"], "unknown")
        return JSONResponse([word] if opts.status_shape == "array" else word)

    async def status_object(request: Request) -> Response:
        row = lookup(request)
        return JSONResponse({"commandId": row["id"], "command_status": row["status"], "body": row["body"]})

    return [
        Route("/health", guarded(opts, health), methods=["GET"]),
        Route("/utility/check-server-health", guarded(opts, health_with_token), methods=["GET"]),
        Route("/request-status/{command_id}", guarded(opts, status_word), methods=["GET", "POST"]),
        Route("/utility/request-command-id-status/{command_id}", guarded(opts, status_object), methods=["GET", "POST"]),
    ]

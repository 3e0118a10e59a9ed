"""Data-token group: reserve, temporary token, inline exchange, file meta (promotion to a
permanent ``dtk-…`` token), request data (inline or via the downstream server), listing with
paging and filters, update, risk meta and delete."""

from __future__ import annotations

import base64
import binascii
import json
import logging
import secrets
import sqlite3
import time
import uuid
from functools import partial
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from privifs.engine.blobs import BlobStore
from privifs.engine.commands import Outcome, Rejected
from privifs.engine.core import Engine
from privifs.engine.http import (
    Form,
    command_accepted,
    guarded,
    invalid,
    iso,
    not_found,
    owned_row,
    query_form,
    read_form,
)
from privifs.engine.options import EngineOptions
from privifs.engine.pages import PageMemo
from privifs.engine.storage import StorageDevices

LIST_FILTERS = {
    "filters[context]": "context",
    "filters[token]": "token",
    "filters[meta.file.fileName]": "file_name",
    "filters[meta.file.extension]": "extension",
    "filters[meta.data.type]": "data_type",
}
NAME_MAX = 1024
# a context or path longer than this is a 422 (the reference gives no limit): long enough for any
# path a program can name (PATH_MAX, 4096 bytes, from a working directory anywhere in a drive),
# bounded so that a request cannot make the engine store and list arbitrary amounts per token
CONTEXT_MAX = 16384

log = logging.getLogger("privifs.engine")


def item(row: sqlite3.Row) -> dict[str, Any]:
    """One listing item: the flat fields of the guides plus the nested ``meta`` of the API."""
    risk = json.loads(row["risk"])
    file_meta = {
        "fileName": row["file_name"],
        "extension": row["extension"],
        "context": row["context"],
        "size": row["size"],
        "path": row["path"],
    }
    return {
        "token": row["token"],
        "context": row["context"],
        "fileName": row["file_name"],
        "extension": row["extension"],
        "size": row["size"],
        "path": row["path"],
        "createdAt": iso(row["created_at"]),
        "updatedAt": iso(row["updated_at"]),
        "meta": {"file": file_meta, "data": {"type": row["data_type"]}, "information_security_risk": risk},
    }


def ttl_seconds(opts: EngineOptions, ttl: int) -> float:
    return ttl * (60.0 if opts.ttl_unit == "minutes" else 1.0)


# -- command appliers: run by the command runner inside its transaction; the collaborators before
# ``conn`` are bound where they are registered (privifs/engine/features.py) --------------------
def apply_reserve(opts: EngineOptions, conn, params, profile_id, cid) -> Outcome:
    now = time.time()
    conn.execute(
        "INSERT INTO reservations (command_id, profile_id, context, ttl, expires_at, temp_token,"
        " stream_auth, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        (
            cid,
            profile_id,
            params["context"],
            params["ttl"],
            now + ttl_seconds(opts, params["ttl"]),
            "tmp-" + secrets.token_hex(12),
            secrets.token_urlsafe(24),
            now,
        ),
    )
    return Outcome()


def apply_exchange(blobs: BlobStore, conn, params, profile_id, cid) -> Outcome:
    cur = conn.execute(
        "UPDATE reservations SET blob_id = ?, blob_size = ? WHERE temp_token = ? AND profile_id = ?"
        " AND blob_id IS NULL AND promoted_token IS NULL AND expires_at > ?",
        (params["blob_id"], params["size"], params["temp_token"], profile_id, time.time()),
    )
    if cur.rowcount == 0:
        blobs.delete(params["blob_id"])
        raise Rejected("data_token.temporary_token_invalid")
    return Outcome()


def request_event(opts: EngineOptions, request_id: str, status: int, output_type: int | None, body: Any) -> dict:
    if opts.request_data_layout == "nested" and output_type is not None:
        return {
            "data": {
                "type": "X-DPT-CAB-REQUEST-ID",
                "id": request_id,
                "command_status": status,
                "body": {"body": body, "output_type": output_type},
            }
        }
    data = {"type": "X-DPT-CAB-REQUEST-ID", "id": request_id, "command_status": status, "body": body}
    if output_type is not None:
        data["output_type"] = output_type
    return {"data": data}


def apply_request_data(opts: EngineOptions, blobs: BlobStore, conn, params, profile_id, cid) -> Outcome:
    rid = params["request_id"]
    row = conn.execute(
        "SELECT blob_id, blob_size FROM data_tokens WHERE token = ? AND profile_id = ?", (params["token"], profile_id)
    ).fetchone()
    if row is None:
        raise Rejected("data_token.not_found", [request_event(opts, rid, 3, None, "data_token.not_found")])
    out = Outcome()

    def data_missing() -> Rejected:
        """The data file is lost (a damaged store): the request fails now (an exception here was a
        traceback and no result, the client asked 4 times, 80 s; a downstream URL for it was a
        404 at the GET, which the client took for an expired authorization and asked again)."""
        log.error("token %s: its data file %s is missing", params["token"], blobs.path(row["blob_id"]))
        reason = "data_token.data_missing"
        return Rejected(reason, [request_event(opts, rid, 3, None, reason)])

    if row["blob_size"] <= opts.inline_threshold:
        try:
            data = blobs.path(row["blob_id"]).read_bytes()
        except FileNotFoundError:
            raise data_missing() from None
        out.events.append(request_event(opts, rid, 2, 0, base64.b64encode(data).decode()))
    else:
        if not blobs.path(row["blob_id"]).exists():
            raise data_missing()
        auth = secrets.token_urlsafe(24)
        conn.execute(
            "INSERT INTO downstream (auth, token, profile_id, expires_at) VALUES (?, ?, ?, ?)",
            (auth, params["token"], profile_id, time.time() + opts.downstream_ttl),
        )
        out.events.append(request_event(opts, rid, 2, 1, auth))
        out.events.append({"data": {"type": "STREAM-READY", "id": rid, "requestId": rid}})
    return out


def apply_update(conn, params, profile_id, cid) -> Outcome:
    changes = params["changes"]
    sets = ", ".join(f"{col} = ?" for col in changes)
    cur = conn.execute(
        f"UPDATE data_tokens SET {sets}, updated_at = ? WHERE token = ? AND profile_id = ?",
        (*changes.values(), time.time(), params["token"], profile_id),
    )
    if cur.rowcount == 0:
        raise Rejected("data_token.not_found")
    return Outcome()


def apply_risk(conn, params, profile_id, cid) -> Outcome:
    cur = conn.execute(
        "UPDATE data_tokens SET risk = ?, updated_at = ? WHERE token = ? AND profile_id = ?",
        (json.dumps(params["risk"]), time.time(), params["token"], profile_id),
    )
    if cur.rowcount == 0:
        raise Rejected("data_token.not_found")
    return Outcome()


def apply_delete(blobs: BlobStore, storage: StorageDevices, conn, params, profile_id, cid) -> Outcome:
    row = conn.execute(
        "SELECT blob_id FROM data_tokens WHERE token = ? AND profile_id = ?", (params["token"], profile_id)
    ).fetchone()
    if row is None:
        raise Rejected("data_token.not_found")
    conn.execute("DELETE FROM data_tokens WHERE token = ?", (params["token"],))
    conn.execute("DELETE FROM downstream WHERE token = ?", (params["token"],))
    out = Outcome()
    out.after_commit.append(lambda: blobs.delete(row["blob_id"]))
    out.after_commit.append(lambda: storage.remove_copies(profile_id, params["token"]))
    return out


class DataTokenApi:
    """The data-token group's handlers (one method each) and its route table."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.opts = engine.opts
        self.db = engine.db
        self.pages = PageMemo()

    def owned_reservation(self, profile_id: str, temp_token: str) -> sqlite3.Row:
        row = self.db.read(
            lambda c: c.execute(
                "SELECT * FROM reservations WHERE temp_token = ? AND profile_id = ?", (temp_token, profile_id)
            ).fetchone()
        )
        if row is None or (row["promoted_token"] is None and row["expires_at"] <= time.time()):
            raise not_found()
        return row

    def owned_token(self, profile_id: str, token: str) -> sqlite3.Row:
        return owned_row(self.db, "data_tokens", "token", token, profile_id)

    # -- reserve ---------------------------------------------------------------------------
    async def reserve(self, request: Request) -> Response:
        who = self.engine.principal(request)
        form = await read_form(request)
        context = form.required("context", max_len=CONTEXT_MAX)
        ttl = form.integer("ttl", default=self.opts.ttl_default, minimum=1, maximum=self.opts.ttl_max)
        meta = form.optional("meta", max_len=4096)
        cid = await self.engine.runner.submit(
            "reserve-token-space", who.profile_id, {"context": context, "ttl": ttl, "meta": meta}
        )
        return command_accepted(self.opts, "reserve-token-space", cid)

    async def retrieve_temporary(self, request: Request) -> Response:
        who = self.engine.principal(request)
        cid = request.path_params["command_id"]
        row = self.db.read(
            lambda c: c.execute(
                "SELECT * FROM reservations WHERE command_id = ? AND profile_id = ?", (cid, who.profile_id)
            ).fetchone()
        )
        if row is None or row["expires_at"] <= time.time() or row["promoted_token"] is not None:
            raise not_found()
        if self.opts.temporary_token_shape == "string":
            return JSONResponse(row["temp_token"])
        stream = f"auth={row['stream_auth']}"
        if self.opts.stream_shape == "url":
            stream = f"{self.engine.urls.get('upstream', '')}/?{stream}"
        if self.opts.temporary_token_shape == "guide":
            return JSONResponse({"token": row["temp_token"], "stream": stream})
        return JSONResponse(
            {
                "uuid": row["command_id"],
                "createdAt": iso(row["created_at"]),
                "token": row["temp_token"],
                "stream": stream,
                "context": row["context"],
                "ttl": str(row["ttl"]),
            }
        )

    # -- inline exchange -------------------------------------------------------------------
    async def exchange(self, request: Request) -> Response:
        who = self.engine.principal(request)
        cap = (self.opts.inline_limit + 2) // 3 * 4 * 3 + 8192  # base64, then worst-case percent-encoding
        form = await read_form(request, limit=cap, field="data")
        temp = form.required("temporaryTokenSpace", max_len=256)
        encoded = "".join(form.required("data", max_len=cap).split())
        try:
            data = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            raise invalid("data", "is not valid base64") from None
        if len(data) > self.opts.inline_limit:
            raise invalid(
                "data",
                f"payload exceeds the inline limit of {self.opts.inline_limit} bytes; use the upstream stream server",
            )
        row = self.owned_reservation(who.profile_id, temp)
        if self.opts.fail_context and row["context"] == self.opts.fail_context:
            return JSONResponse({"status": 500, "message": "injected failure for this context"}, status_code=500)
        if row["blob_id"] is not None or row["promoted_token"] is not None:
            raise invalid("temporaryTokenSpace", "data was already exchanged for this token")
        blob_id, size, blob_dir = await self.engine.blobs.write_bytes(data)
        cid = await self.engine.runner.submit(
            "exchange-data-for-token",
            who.profile_id,
            {"temp_token": temp, "blob_id": blob_id, "size": size},
            fsync_dirs=(blob_dir,),
        )
        return command_accepted(self.opts, "exchange-data-for-token", cid)

    # -- configure file meta (synchronous promotion) ---------------------------------------
    async def configure_file_meta(self, request: Request) -> Response:
        who = self.engine.principal(request)
        form = await read_form(request)
        temp = form.required("token", max_len=256)
        file_name = form.required("fileName", max_len=NAME_MAX)
        extension = form.optional("extension", max_len=255) or ""
        context = form.optional("context", max_len=CONTEXT_MAX)
        size = form.integer("size", minimum=0)
        path = form.optional("path", max_len=CONTEXT_MAX) or ""
        row = self.owned_reservation(who.profile_id, temp)
        if row["promoted_token"] is None:
            if row["blob_id"] is None:
                raise invalid("token", "no data has been exchanged or uploaded for this token yet")
            permanent = "dtk-" + str(uuid.uuid4())

            def promote(conn: sqlite3.Connection) -> str:
                cur = conn.execute(
                    "SELECT promoted_token FROM reservations WHERE command_id = ?", (row["command_id"],)
                ).fetchone()
                if cur["promoted_token"] is not None:
                    return cur["promoted_token"]
                now = time.time()
                conn.execute(
                    "INSERT INTO data_tokens (token, profile_id, context, file_name, extension, size, path,"
                    " blob_id, blob_size, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        permanent,
                        who.profile_id,
                        context if context is not None else row["context"],
                        file_name,
                        extension,
                        size,
                        path,
                        row["blob_id"],
                        row["blob_size"],
                        now,
                        now,
                    ),
                )
                conn.execute(
                    "UPDATE reservations SET promoted_token = ? WHERE command_id = ?", (permanent, row["command_id"])
                )
                return permanent

            token = await self.db.write(promote)
            self.engine.spawn(self.engine.storage.fan_out, who.profile_id, token, row["blob_id"])
        else:
            token = row["promoted_token"]
        return JSONResponse(token if self.opts.file_meta_shape == "string" else {"token": token})

    # -- request data ----------------------------------------------------------------------
    async def request_data(self, request: Request) -> Response:
        who = self.engine.principal(request)
        form = await read_form(request)
        token = form.required("token", max_len=256)
        self.owned_token(who.profile_id, token)
        request_id = str(uuid.uuid4())
        cid = await self.engine.runner.submit(
            "request-data", who.profile_id, {"token": token, "request_id": request_id}
        )
        return Response(
            "null",
            status_code=202,
            media_type="application/json",
            headers={"x-dpt-cab-id": cid, "x-dpt-cab-request-id": request_id},
        )

    # -- listing ---------------------------------------------------------------------------
    async def list_tokens(self, request: Request) -> Response:
        who = self.engine.principal(request)
        q = query_form(request)
        page = q.integer("page", default=1, minimum=1, maximum=10**9)
        per_page = min(
            q.integer("perPage", default=self.opts.per_page_default, minimum=1, maximum=10**9), self.opts.per_page_max
        )
        where, args = ["profile_id = ?"], [who.profile_id]
        for name, column in LIST_FILTERS.items():
            value = q.get(name)
            if value is not None:
                where.append(f"{column} = ?")
                args.append(value)
        cond = " AND ".join(where)

        total, rows = self.db.read(lambda conn: self.pages.read(conn, cond, args, page, per_page))
        count = len(rows) if self.opts.listing_count == "page" else total
        return JSONResponse(
            {"items": [item(r) for r in rows], "meta": {"count": count, "page": page, "perPage": per_page}}
        )

    # -- update, risk meta, delete ---------------------------------------------------------
    async def update(self, request: Request) -> Response:
        who = self.engine.principal(request)
        form = await read_form(request)
        token = form.required("token", max_len=256)
        changes = {}
        for field, column, limit in (
            ("fileName", "file_name", NAME_MAX),
            ("extension", "extension", 255),
            ("context", "context", CONTEXT_MAX),
        ):
            value = form.optional(field, max_len=limit, allow_empty=field == "extension")
            if value is not None:
                changes[column] = value
        if not changes:
            raise invalid("fileName", "at least one of fileName, extension, context is required")
        self.owned_token(who.profile_id, token)
        cid = await self.engine.runner.submit("update-data-token", who.profile_id, {"token": token, "changes": changes})
        return command_accepted(self.opts, "update-data-token", cid)

    async def risk_meta(self, request: Request) -> Response:
        who = self.engine.principal(request)
        form = await read_form(request)
        token = form.required("token", max_len=256)
        fields = {k: v[-1] for k, v in form.fields.items() if k != "token"}
        if not fields:
            raise invalid("classification", "at least one risk-meta field is required")
        if len(fields) > self.opts.risk_max_fields:
            raise invalid("token", f"at most {self.opts.risk_max_fields} risk-meta fields are allowed")
        for k, v in fields.items():
            if not k or len(k) > 128:
                raise invalid(k[:128] or "field", "field names must have 1 to 128 characters")
            Form._check(k, v, self.opts.risk_max_value, True)
        self.owned_token(who.profile_id, token)
        cid = await self.engine.runner.submit(
            "configure-information-security-risk-meta", who.profile_id, {"token": token, "risk": fields}
        )
        return command_accepted(self.opts, "configure-information-security-risk-meta", cid)

    async def delete(self, request: Request) -> Response:
        who = self.engine.principal(request)
        form = await read_form(request)
        token = form.required("token", max_len=256)
        self.owned_token(who.profile_id, token)
        cid = await self.engine.runner.submit("delete-data", who.profile_id, {"token": token})
        return command_accepted(self.opts, "delete-data", cid)

    def routes(self) -> list[Route]:
        g = partial(guarded, self.opts)
        return [
            Route("/data-token/reserve-token-space", g(self.reserve), methods=["POST"]),
            Route(
                "/data-token/retrieve-temporary-data-token/{command_id}", g(self.retrieve_temporary), methods=["GET"]
            ),
            Route("/data-token/exchange-data-for-token", g(self.exchange), methods=["POST"]),
            Route("/data-token/configure-file-meta", g(self.configure_file_meta), methods=["POST"]),
            Route("/data-token/request-data", g(self.request_data), methods=["POST"]),
            Route("/data-token/list-data-tokens", g(self.list_tokens), methods=["GET"]),
            Route("/data-token/update-data-token", g(self.update), methods=["POST"]),
            Route("/data-token/configure-information-security-risk-meta", g(self.risk_meta), methods=["POST"]),
            Route("/data-token/delete-data", g(self.delete), methods=["POST"]),
        ]


def routes(engine: Engine) -> list[Route]:
    return DataTokenApi(engine).routes()

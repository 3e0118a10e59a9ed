"""Nothing a client sends makes the engine answer 5xx, crash or log a traceback."""

from __future__ import annotations

import os
import random

import httpx
import pytest
from starlette.routing import Route

from privifs.engine.core import Engine
from privifs.engine.options import EngineOptions
from privifs.engine.server import api_app
from tests.enginekit import command_id


def api_routes(tmp_path_factory) -> list[tuple[str, str]]:
    engine = Engine(tmp_path_factory.mktemp("routes"), EngineOptions())
    try:
        out = []
        for r in api_app(engine).routes:
            if isinstance(r, Route) and not r.path.startswith("/_engine"):
                for m in sorted(r.methods - {"HEAD"}):
                    out.append((m, r.path.replace("{command_id}", "x").replace("{application_id}", "y")))
        return out
    finally:
        engine.db.close()


GARBAGE = [
    b"",
    b"\xff\xfe\x00garbage",
    b"token=%ZZ&data=%%%",
    b"a=" + b"x" * 300_000,
    b'{"token": [1, {}]}',
    b"token=dtk-x&fileName=\x00&size=1e9&ttl=99999999999999999999",
    b"&&&===&&&",
    b"[]",
    b"null",
    b"context=" + "ü".encode() * 5000 + b"&ttl=5",
    b"page=-1&perPage=0",
    b"[" * 100_000 + b"]" * 100_000,  # nested past the JSON parser's recursion limit
]
CONTENT_TYPES = [
    "application/x-www-form-urlencoded",
    "application/json",
    "multipart/form-data; boundary=x",
    "text/plain",
    "application/octet-stream",
]


@pytest.fixture(scope="module")
def routes(tmp_path_factory):
    return api_routes(tmp_path_factory)


async def test_no_request_gets_a_5xx(engine, routes, wire):
    await wire.provision()
    rng = random.Random(7)
    async with httpx.AsyncClient(base_url=engine.urls["api"], timeout=30) as c:
        for method, path in routes:
            for body in GARBAGE:
                for token in (None, wire.token, "T-bogus"):
                    headers = {"Content-Type": rng.choice(CONTENT_TYPES)}
                    if token:
                        headers["X-DPT-AUTHORIZATION"] = token
                    if rng.random() < 0.3:
                        headers["Authorization"] = "Basic " + rng.choice(["x", "!!!", "eDp5", "Zm9vOmJhcg=="])
                    r = await c.request(
                        method,
                        path,
                        content=body if method == "POST" else None,
                        params={"page": body[:50].decode("latin-1")} if method == "GET" else None,
                        headers=headers,
                    )
                    assert r.status_code < 500, (method, path, body[:40], r.status_code, r.text[:200])
        big = b"token=" + b"A" * 3_000_000
        for method, path in routes:
            if method == "POST":
                for token in (None, wire.token):
                    headers = {"X-DPT-AUTHORIZATION": token} if token else {}
                    r = await c.post(path, content=big, headers={**headers, "Content-Type": CONTENT_TYPES[0]})
                    assert 400 <= r.status_code < 500, (path, r.status_code)
        for path in ("/", "/nope", "/data-token", "/../../etc/passwd", "/request-status/"):
            assert (await c.get(path)).status_code == 404
    for server in ("upstream", "downstream"):
        async with httpx.AsyncClient(base_url=engine.urls[server], timeout=30) as c:
            for method in ("GET", "POST", "PUT", "DELETE"):
                for q in ("", "?auth=", "?auth=%ff%fe", "?auth=x&auth=y", "?" + "a" * 5000):
                    r = await c.request(method, "/" + q, content=os.urandom(100) if method != "GET" else None)
                    assert r.status_code < 500, (server, method, q, r.status_code)
    assert "Traceback" not in engine.log()
    assert (await wire.get("/health")).status_code == 200


async def test_json_a_client_sends_inside_a_field_or_nested_too_deep_gets_a_422(eng, wire):
    """A JSON body nested past the parser's recursion limit ([[[…]]]) answered 500 with a
    traceback in the log, and so did a voting configuration whose deviceIdentifiers field started
    with '[' but was not JSON; a WebSocket frame nested that deep ended the connection."""
    import json

    import trio
    from trio_websocket import open_websocket_url

    await wire.provision()
    deep = "[" * 100_000 + "]" * 100_000
    r = await wire.post("/profile/authenticate", content=deep.encode(), headers={"Content-Type": "application/json"})
    assert r.status_code == 422 and "body" in r.json()["errors"], r.text[:200]
    for devices in ("[not json", deep, '["ok", 1]'):
        r = await wire.post(
            "/verified-authenticator/voting-configuration/register", {"name": "v", "deviceIdentifiers": devices}
        )
        assert r.status_code == 422 and "deviceIdentifiers" in r.json()["errors"], (devices[:10], r.text[:200])
    with trio.fail_after(10):
        async with open_websocket_url(eng.urls["ws"]) as ws:
            await ws.send_message("[" * 30_000 + "]" * 30_000)  # within the proxy's frame limit
            await ws.send_message(
                json.dumps({"action": "joinChannel", "correlationId": "c1", "data": {"authorizationToken": wire.token}})
            )
            answer = json.loads(await ws.get_message())
    assert (answer["correlationId"], answer["status"]) == ("c1", 200)
    assert "Traceback" not in eng.log()


async def test_an_integer_field_past_64_bits_gets_a_422_not_a_500(eng, wire):
    """configure-file-meta with size=10**30 answered 500 with a traceback in the log (SQLite:
    "Python int too large to convert to SQLite INTEGER"); every integer field is now capped at
    what a column holds and a larger value is a 422 naming it."""
    import base64

    await wire.provision()
    async with wire.channel() as ch:
        r = await wire.post("/data-token/reserve-token-space", {"context": "/big", "ttl": "5"})
        reserve = command_id(r)
        assert (await ch.wait_for("X-DPT-CAB-ID", reserve))["command_status"] == 2
        temp = (await wire.get(f"/data-token/retrieve-temporary-data-token/{reserve}")).json()["token"]
        r = await wire.post(
            "/data-token/exchange-data-for-token",
            {"temporaryTokenSpace": temp, "data": base64.b64encode(b"x" * 40).decode()},
        )
        assert (await ch.wait_for("X-DPT-CAB-ID", command_id(r)))["command_status"] == 2
    meta = {"token": temp, "fileName": "f", "extension": "", "context": "/big", "path": "/big/f"}
    for size in (str(10**30), str(2**63)):
        r = await wire.post("/data-token/configure-file-meta", {**meta, "size": size})
        assert r.status_code == 422 and "size" in r.json()["errors"], r.text[:200]
    r = await wire.post("/data-token/configure-file-meta", {**meta, "size": str(2**63 - 1)})
    assert r.status_code == 200, r.text[:200]
    assert "Traceback" not in eng.log()


async def test_a_json_string_with_a_lone_surrogate_or_an_empty_list_gets_a_422(eng, wire):
    """A JSON body whose token (or context, fileName, …) was "\\ud800" answered 500 with a
    traceback (SQLite cannot store it; a reserve-token-space with such a context was accepted and
    then failed in the command runner), and risk meta with a field of [] answered 500 too."""
    await wire.provision()
    json_headers = {"Content-Type": "application/json"}
    for path, body in (
        ("/data-token/request-data", '{"token": "\\ud800"}'),
        ("/data-token/delete-data", '{"token": "dtk-\\udfff"}'),
        ("/data-token/reserve-token-space", '{"context": "/a\\ud800", "ttl": "5"}'),
        ("/data-token/update-data-token", '{"token": "dtk-x", "fileName": "\\ud800"}'),
        ("/data-token/configure-information-security-risk-meta", '{"token": "dtk-x", "\\ud800": "1"}'),
    ):
        r = await wire.post(path, content=body.encode(), headers=json_headers)
        assert r.status_code == 422, (path, r.status_code, r.text[:200])
    r = await wire.post(
        "/data-token/configure-information-security-risk-meta",
        content=b'{"token": "dtk-x", "privifs.mode": []}',
        headers=json_headers,
    )
    assert r.status_code < 500, r.text[:200]
    assert "Traceback" not in eng.log()


async def test_an_engine_out_of_file_descriptors_answers_503_with_retry_after_and_no_traceback(caplog):
    """A flood of connections used up the engine's descriptors: an upload whose blob file could
    not be opened (EMFILE) was dropped with a traceback in the log (helper hAM F4). It is an
    overload like the others: 503, Retry-After (the client retries), one log line."""
    import errno

    from starlette.requests import Request

    from privifs.engine.http import guarded

    async def handler(request: Request):
        raise OSError(errno.EMFILE, "Too many open files", "/data/tmp/blob")

    async def receive() -> dict:
        return {"type": "http.request", "body": b"", "more_body": False}

    scope = {"type": "http", "method": "POST", "path": "/data-token/exchange", "headers": [], "query_string": b""}
    response = await guarded(EngineOptions(), handler)(Request(scope, receive))
    assert response.status_code == 503 and response.headers["retry-after"] == "1"
    assert "no file descriptor left" in caplog.text and "Traceback" not in caplog.text


def test_overload_warnings_come_at_most_every_few_seconds_saying_how_many_they_stand_for(caplog, monkeypatch):
    """Every request on a full disk logged its own warning: about 2,000 lines a minute from a
    mount retrying its uploads, eating the space as it was freed (helper hAM F1)."""
    import logging

    from privifs.engine.http import log
    from privifs.ratelog import RateLimitedWarnings

    clock = [100.0]
    monkeypatch.setattr("privifs.ratelog.time.monotonic", lambda: clock[0])
    o = RateLimitedWarnings(log)
    with caplog.at_level(logging.WARNING, logger="privifs.engine"):
        for _ in range(50):
            o.warn("disk", "%s: the engine's disk is full; answered 507", "POST /x")
        o.warn("descriptors", "no file descriptor left")  # another kind: its own line
        clock[0] += o.every
        o.warn("disk", "%s: the engine's disk is full; answered 507", "POST /y")
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "POST /x: the engine's disk is full; answered 507",
        "no file descriptor left",
        "POST /y: the engine's disk is full; answered 507 (and 49 more like it in the last 10 s)",
    ]


def test_warnings_naming_different_ids_are_one_kind_and_a_bursts_count_is_said_once_it_ends(caplog, monkeypatch):
    """Write-back failures that named their command or token were each a kind of their own: none
    was rate-limited and every kind was kept for good; a burst's count waited for a next line
    of its own kind that might never come (hAT F4)."""
    import logging

    from privifs.fs.sync import _alike, log
    from privifs.ratelog import RateLimitedWarnings

    clock = [100.0]
    monkeypatch.setattr("privifs.ratelog.time.monotonic", lambda: clock[0])
    w = RateLimitedWarnings(log)
    with caplog.at_level(logging.WARNING, logger="privifs.fs"):
        for i in range(1000):
            text = f"command 3f2a{i:04x}-77 is still in flight after 30s"
            w.warn((TimeoutError, _alike(text)), "/f%d: %s", i, text)
        clock[0] += w.every
        w.warn("other", "another failure")
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3, lines
    assert lines[0] == "/f0: command 3f2a0000-77 is still in flight after 30s"
    assert (
        lines[1]
        == "999 more like this in the last 10 s, the last: /f999: command 3f2a03e7-77 is still in flight after 30s"
    )
    assert lines[2] == "another failure"
    assert len(w._last) == 1

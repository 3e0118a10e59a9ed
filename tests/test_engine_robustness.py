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

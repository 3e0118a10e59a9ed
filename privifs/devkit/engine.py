"""For tests and scripts: run a real engine as a subprocess on free loopback ports, talk raw wire
to it.

Nothing here mocks the engine: :class:`EngineProcess` starts ``python -m privifs engine`` with
the one engine starter (:mod:`privifs.engine_process`, which the embedded engine uses too) and
adds the admin endpoints; :class:`Wire` speaks HTTP with httpx and listens on the WebSocket with
trio-websocket, exactly as any Privicore client would.
"""

from __future__ import annotations

import base64
import json
import os
import time
import uuid
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import trio
from trio_websocket import open_websocket_url

from privifs import engine_process
from privifs.client.tls import shared_tls_context
from privifs.crypto.keys import generate_identity

_admin: tuple[int, httpx.Client] | None = None


def _admin_http() -> httpx.Client:
    """The client this process's admin calls share (a forked child makes its own): one made per
    call, as ``httpx.post`` does, took 40 ms of CPU for its TLS context, twice per test that
    uses the session engine (its options are reset after each)."""
    global _admin
    if _admin is None or _admin[0] != os.getpid():
        _admin = (os.getpid(), httpx.Client(timeout=10, verify=shared_tls_context()))
    return _admin[1]


class EngineProcess(engine_process.EngineProcess):
    """An engine for a test or a script: its URLs file and log beside (not in) the data directory,
    engine options set at start (``settings``) or at run time (:meth:`set_options`)."""

    def __init__(
        self,
        data_dir: Path,
        settings: dict[str, Any] | None = None,
        log_path: Path | None = None,
        ports: dict[str, int] | None = None,
    ):
        super().__init__(
            data_dir,
            ports=ports,
            settings=settings,
            urls_file=data_dir.parent / f"{data_dir.name}-urls.json",
            log_path=log_path or data_dir.parent / f"{data_dir.name}-engine.log",
        )

    def start(self) -> EngineProcess:
        """Start it (again, on the same ports once it has run); RuntimeError with its log's end if
        it cannot. A restart on a port another socket holds for the moment (a connection of another
        test took it as its own port while this engine was down: "Address already in use", once
        in a CI run) is tried again for up to 10 s."""
        deadline = time.monotonic() + 10
        while True:
            try:
                return super().start()
            except engine_process.EngineStartFailed as exc:
                if "Address already in use" in str(exc) and time.monotonic() < deadline:
                    time.sleep(0.5)
                    continue
                raise RuntimeError(f"{exc}: {exc.log_tail}") from None

    def blob_files(self, size: int) -> list[Path]:
        """The engine's data files of ``size`` bytes (a test finds its blob by a size no other
        test uses: a wire blob is its plaintext and 28 bytes)."""
        blobs = self.data_dir / "blobs"
        return [f for d in blobs.iterdir() if d.is_dir() for f in d.iterdir() if f.stat().st_size == size]

    @property
    def admin_secret(self) -> str:
        return (self.data_dir / "admin-token").read_text().strip()

    def set_options(self, **values: Any) -> dict:
        r = _admin_http().post(
            self.urls["api"] + "/_engine/options", json=values, headers={"X-Engine-Admin": self.admin_secret}
        )
        r.raise_for_status()
        return r.json()

    def reset_options(self, defaults: dict) -> None:
        values = {k: v for k, v in defaults.items() if k not in ("command_id_shapes",)}
        values.update(
            {f"command_id_shape.{k}": defaults["command_id_shape"] for k in self.set_options()["command_id_shapes"]}
        )
        self.set_options(**values)

    def admin(self, action: str) -> dict:
        r = _admin_http().post(self.urls["api"] + f"/_engine/{action}", headers={"X-Engine-Admin": self.admin_secret})
        r.raise_for_status()
        return r.json()


def command_id(resp: httpx.Response) -> str:
    body = resp.json() if resp.content else None
    if isinstance(body, dict):
        return body["commandId"]
    if isinstance(body, list):
        return body[0]
    if isinstance(body, str):
        return body
    return resp.headers["x-dpt-cab-id"]


class Channel:
    """A joined WebSocket channel that records every event it hears."""

    def __init__(self, ws):
        self.ws = ws
        self.events: list[dict] = []
        self._new = trio.Event()
        self.closed = False

    async def pump(self) -> None:
        try:
            while True:
                msg = json.loads(await self.ws.get_message())
                self.events.append(msg)
                self._new.set()
                self._new = trio.Event()
        except Exception:  # noqa: BLE001 - connection closed
            self.closed = True
            self._new.set()

    async def wait_for(self, type_: str, id_: str, timeout: float = 10) -> dict:
        """The first event of this type and id; for command results, the first *outcome*
        (status 1, "still in flight", is skipped)."""
        with trio.fail_after(timeout):
            while True:
                for m in self.events:
                    d = m.get("data") or {}
                    if d.get("type") == type_ and (d.get("id") == id_ or d.get("requestId") == id_):
                        if type_ == "X-DPT-CAB-ID" and d.get("command_status") == 1:
                            continue
                        return d
                if self.closed:
                    raise ConnectionError("channel closed")
                await self._new.wait()

    def seen(self, type_: str, id_: str) -> list[dict]:
        return [
            m["data"]
            for m in self.events
            if (m.get("data") or {}).get("type") == type_ and (m["data"].get("id") == id_)
        ]


class Wire:
    """Raw Privicore wire access for tests (httpx + trio-websocket), no privifs client code (only
    its process-wide TLS context, client/tls.py)."""

    def __init__(self, urls: dict[str, str]):
        self.urls = urls
        self.http = httpx.AsyncClient(base_url=urls["api"], timeout=30, verify=shared_tls_context())
        self.token: str | None = None

    async def aclose(self) -> None:
        await self.http.aclose()

    def _h(self, token: str | None) -> dict:
        t = token if token is not None else self.token
        return {"X-DPT-AUTHORIZATION": t} if t else {}

    async def post(self, path: str, data: dict | None = None, token: str | None = None, **kw) -> httpx.Response:
        return await self.http.post(path, data=data, headers={**self._h(token), **kw.pop("headers", {})}, **kw)

    async def get(self, path: str, token: str | None = None, **kw) -> httpx.Response:
        return await self.http.get(path, headers={**self._h(token), **kw.pop("headers", {})}, **kw)

    async def poll(self, cid: str, timeout: float = 10) -> str:
        with trio.fail_after(timeout):
            while True:
                r = await self.http.post(f"/request-status/{cid}", json={})
                word = r.json()
                word = word[0] if isinstance(word, list) else word
                if word != "started":
                    return word
                await trio.sleep(0.05)

    @asynccontextmanager
    async def channel(self, token: str | None = None):
        async with open_websocket_url(self.urls["ws"]) as ws:
            await ws.send_message(
                json.dumps({"action": "joinChannel", "data": {"authorizationToken": token or self.token}})
            )
            answer = json.loads(await ws.get_message())
            assert answer["status"] == 200, answer
            ch = Channel(ws)
            async with trio.open_nursery() as n:
                n.start_soon(ch.pump)
                yield ch
                n.cancel_scope.cancel()

    async def provision(self, username: str | None = None, password: str = "correct-horse-battery") -> dict:
        """Register a profile, its public key (guide order) and authenticate; returns credentials."""
        username = username or f"user-{uuid.uuid4().hex[:10]}@example.com"
        r = await self.post("/profile/register-profile", {"username": username, "password": password})
        assert r.status_code == 202, r.text
        assert await self.poll(command_id(r)) == "succeeded"
        _, pub = generate_identity()
        r = await self.post(
            "/public-key/register-public-key", {"username": username, "password": password, "publicKey": pub}, token=""
        )
        assert r.status_code == 202, r.text
        assert await self.poll(command_id(r)) == "succeeded"
        r = await self.post("/profile/authenticate", {"username": username, "password": password})
        assert r.status_code == 200, r.text
        self.token = r.json()["authorizationToken"]
        return {"username": username, "password": password, "token": self.token, "publicKey": pub}

    async def store(
        self,
        ch: Channel,
        payload: bytes,
        *,
        context: str = "tests",
        file_name: str = "f.bin",
        streamed: bool | None = None,
    ) -> str:
        """The full store chain on raw wire; returns the permanent token."""
        r = await self.post("/data-token/reserve-token-space", {"context": context, "ttl": "5"})
        assert r.status_code == 202, r.text
        reserve = command_id(r)
        assert (await ch.wait_for("X-DPT-CAB-ID", reserve))["command_status"] == 2
        r = await self.get(f"/data-token/retrieve-temporary-data-token/{reserve}")
        assert r.status_code == 200, r.text
        body = r.json()
        temp = body if isinstance(body, str) else body["token"]
        if streamed is None:
            streamed = len(payload) > 32 * 1024
        if streamed:
            stream = body["stream"]
            url = stream if stream.startswith("http") else f"{self.urls['upstream']}/?{stream}"
            async with httpx.AsyncClient(timeout=60, verify=shared_tls_context()) as up:
                r = await up.post(url, content=payload, headers={"Content-Type": "application/octet-stream"})
            assert r.status_code == 200, r.text
        else:
            r = await self.post(
                "/data-token/exchange-data-for-token",
                {"temporaryTokenSpace": temp, "data": base64.b64encode(payload).decode()},
            )
            assert r.status_code == 202, r.text
            assert (await ch.wait_for("X-DPT-CAB-ID", command_id(r)))["command_status"] == 2
        r = await self.post(
            "/data-token/configure-file-meta",
            {
                "token": temp,
                "fileName": file_name,
                "extension": file_name.rpartition(".")[2],
                "context": context,
                "size": str(len(payload)),
                "path": f"/{file_name}",
            },
        )
        assert r.status_code == 200, r.text
        body = r.json()
        return body if isinstance(body, str) else body["token"]

    async def retrieve(self, ch: Channel, token: str) -> bytes:
        r = await self.post("/data-token/request-data", {"token": token})
        assert r.status_code == 202, r.text
        rid = r.headers["x-dpt-cab-request-id"]
        d = await ch.wait_for("X-DPT-CAB-REQUEST-ID", rid)
        assert d["command_status"] == 2, d
        body, otype = d["body"], d.get("output_type")
        if isinstance(body, dict):
            body, otype = body["body"], body["output_type"]
        if otype == 0:
            return base64.b64decode(body)
        await ch.wait_for("STREAM-READY", rid)
        async with httpx.AsyncClient(timeout=60, verify=shared_tls_context()) as down:
            r = await down.get(f"{self.urls['downstream']}/", params={"auth": body})
        assert r.status_code == 200, r.text
        return r.content

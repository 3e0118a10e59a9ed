"""A client of the embedded engine sends nothing to a loopback port another user's program holds
(helper hAD F1: after the engine died, another user bound its ports and was sent the mount's
authorization token and, answering 401, its password). Real sockets; the other user's listener is
made with another effective uid, so these tests need root (as CI runs them)."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time

import pytest
import trio
from trio_websocket import DisconnectionTimeout

from privifs import sockowner
from privifs.client import peers
from privifs.client.events import websocket
from privifs.client.transport import ClientOptions, Endpoints, Transport
from privifs.errors import ServerUnreachable

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="making another user's socket needs root")

NOBODY = 65534
# the listener's Python: one another user may run (this one may live under /root)
PYTHON = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable


# A loopback listener, run as the user it is given: it keeps every byte sent to it and prints
# them (hex) when its standard input closes; it answers a WebSocket handshake and nothing else.
# The server's end of an accepted connection belongs to the process that accepted it.
LISTENER = r"""
import base64, hashlib, select, socket, sys
listener = socket.create_server(("127.0.0.1", 0))
print(listener.getsockname()[1], flush=True)
received, conns = b"", []
while True:
    ready, _, _ = select.select([sys.stdin, listener] + conns, [], [], 5)
    if sys.stdin in ready or not ready:
        break
    for r in ready:
        if r is listener:
            conns.append(listener.accept()[0])
            continue
        chunk = r.recv(65536)
        if not chunk:
            conns.remove(r)
            r.close()
            continue
        received += chunk
        if b"Sec-WebSocket-Key" in chunk:
            key = chunk.split(b"Sec-WebSocket-Key:")[1].split(b"\r\n")[0].strip()
            accept = base64.b64encode(hashlib.sha1(key + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest())
            r.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                      b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n")
print(received.hex(), flush=True)
"""


class Recorder:
    """:data:`LISTENER` as ``uid`` (this process's user if None)."""

    def __init__(self, uid: int | None = None):
        self.proc = subprocess.Popen([PYTHON, "-c", LISTENER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, user=uid)
        self.port = int(self.proc.stdout.readline())

    def received(self) -> bytes:
        out, _ = self.proc.communicate(timeout=20)
        return bytes.fromhex(out.decode().strip() or "")


class Token:
    def current_token(self) -> str:
        return "T-the-mounts-secret-token"

    async def recover(self, failed_token: str | None) -> None:
        raise AssertionError("no answer came to be refused")


def test_a_loopback_socket_of_another_user_is_told_apart_from_ours() -> None:
    for uid in (None, NOBODY):
        server = Recorder(uid)
        with socket.create_connection(("127.0.0.1", server.port)) as conn:
            for _ in range(100):  # until the listener accepted it
                owner = sockowner.server_end_owner(conn.getsockname(), conn.getpeername())
                if owner is not None:
                    break
                time.sleep(0.05)
            assert owner == (uid if uid is not None else os.geteuid())
            # the fallback where netlink cannot be used reads the same from /proc/net/tcp
            assert sockowner._listed_owner(conn.getsockname(), conn.getpeername()) == owner
            if uid is None:
                peers.check_socket(conn, os.geteuid())
            else:
                with pytest.raises(peers.ForeignServer, match="user 65534's"):
                    peers.check_socket(conn, os.geteuid())
            peers.check_socket(conn, None)  # not asked: nothing checked
        server.received()


def _call(port: int, server_uid: int | None) -> Exception | None:
    options = ClientOptions(server_uid=server_uid, retry_attempts=1, http_timeout=1, connect_timeout=2)

    async def main() -> Exception | None:
        transport = Transport(Endpoints(api=f"http://127.0.0.1:{port}"), options)
        transport.auth = Token()
        try:
            await transport.call("GET", "/data-token/list-data-tokens")
        except Exception as exc:  # noqa: BLE001 - returned to be looked at
            return exc
        finally:
            await transport.aclose()
        return None

    return trio.run(main)


def test_an_api_call_sends_no_token_to_another_users_program_on_the_engines_port() -> None:
    thief = Recorder(NOBODY)
    err = _call(thief.port, server_uid=0)
    assert isinstance(err, ServerUnreachable)
    assert "user 65534's" in str(err)
    assert thief.received() == b""
    # the same call without the check reaches it, token and all (so this test can fail)
    thief = Recorder(NOBODY)
    _call(thief.port, server_uid=None)
    assert b"T-the-mounts-secret-token" in thief.received()


def test_an_api_call_to_this_users_engine_is_sent() -> None:
    ours = Recorder()
    _call(ours.port, server_uid=0)
    assert b"T-the-mounts-secret-token" in ours.received()


def test_the_event_channel_is_refused_on_another_users_port_before_the_join() -> None:
    thief = Recorder(NOBODY)

    async def main(uid: int | None) -> None:
        async with websocket(f"ws://127.0.0.1:{thief.port}/", uid, connect_timeout=2, disconnect_timeout=1):
            pass

    with pytest.raises(peers.ForeignServer, match="user 65534's"):
        trio.run(main, 0)
    with contextlib.suppress(DisconnectionTimeout):  # (it does not answer the close)
        trio.run(main, None)  # unchecked, the same server is taken (so this test can fail)
    assert b"Sec-WebSocket-Key" in thief.received()


# another local user registering a profile on an engine (a plain form POST, as any client sends)
REGISTER = r"""
import sys, urllib.error, urllib.parse, urllib.request
body = urllib.parse.urlencode({"username": sys.argv[2], "password": "correct-horse-battery"}).encode()
try:
    with urllib.request.urlopen(sys.argv[1] + "/profile/register-profile", body, timeout=20) as r:
        print(r.status)
except urllib.error.HTTPError as exc:
    print(exc.code, exc.read().decode())
"""


def register(api: str, username: str, uid: int | None = None) -> str:
    """What another local user's (``uid``) or this user's registration of ``username`` got."""
    run = subprocess.run([PYTHON, "-c", REGISTER, api, username], capture_output=True, text=True, user=uid, timeout=60)
    return run.stdout + run.stderr


def test_the_embedded_engine_registers_profiles_for_its_own_user_only(tmp_path) -> None:
    """Every local user sees the embedded engine's loopback ports: another user registered a
    profile there and stored 64 MiB in the owner's home (helper hAO F3). With
    ``owner_registers_only`` (the embedded engine's setting) that is refused; the owner (and
    root) still register."""
    from privifs.embedded import EmbeddedEngine
    from tests.enginekit import EngineProcess

    embedded = EmbeddedEngine(tmp_path / "engine")
    api = embedded.start()["api"]
    try:
        theirs = register(api, "intruder@example.com", NOBODY)
        assert theirs.startswith("403") and "registration_closed" in theirs, theirs
        assert register(api, "owner@example.com").startswith("202")
        assert "refused a profile registration from user 65534" in embedded.process.log()
    finally:
        embedded.stop()
    open_engine = EngineProcess(tmp_path / "open").start()  # a separate server's default: open
    try:
        theirs = register(open_engine.urls["api"], "someone@example.com", NOBODY)
        assert theirs.startswith("202"), theirs
    finally:
        open_engine.stop()

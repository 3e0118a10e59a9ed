"""Who holds the server's end of a loopback connection: owns the check that a connection to the
embedded engine reached a program of this user before anything (a token, a password) is sent.

The embedded engine listens on loopback ports every local user can see. When it dies, another
user's program may take those ports before it is started again, and a client that sent its
authorization there gave that user the vault's listing and deletion (helper hAD F1). The owner
of the server's end comes from :mod:`privifs.sockowner`; the check is made on the connected
socket pair, so nothing can take the port between the check and the sending.
"""

from __future__ import annotations

import socket

from privifs.errors import ServerUnreachable
from privifs.sockowner import is_loopback, server_end_owner


class ForeignServer(ServerUnreachable):
    """The server's end of a loopback connection belongs to another user (or cannot be found):
    handled as a server that cannot be reached (retried; the engine's watcher starts it again)."""


def check_server_end(local: tuple[str, int], remote: tuple[str, int], uid: int | None) -> None:
    """Raise :class:`ForeignServer` unless the server's end of this loopback connection belongs
    to ``uid``. Nothing to check with ``uid`` None or a server that is not on loopback."""
    if uid is None or not is_loopback(remote[0]):
        return
    owner = server_end_owner(local, remote)
    if owner == uid:
        return
    who = "cannot be told" if owner is None else f"is user {owner}'s, not this user's ({uid})"
    raise ForeignServer(
        f"the program on port {remote[1]} {who}: the embedded engine is not the one answering there "
        "(it died and another program took its port?); nothing was sent to it"
    )


def check_socket(sock: socket.socket, uid: int | None) -> None:
    """:func:`check_server_end` for a connected socket (a trio or a standard one)."""
    if uid is None:
        return
    local, remote = sock.getsockname(), sock.getpeername()
    check_server_end((local[0], local[1]), (remote[0], remote[1]), uid)

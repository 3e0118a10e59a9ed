"""Who holds the server's end of a loopback connection: owns the check that a connection to the
embedded engine reached a program of this user before anything (a token, a password) is sent.

The embedded engine listens on loopback ports every local user can see. When it dies, another
user's program may take those ports before it is started again, and a client that sent its
authorization there gave that user the vault's listing and deletion (helper hAD F1). Linux lists
every TCP socket in ``/proc/net/tcp`` and ``/proc/net/tcp6`` with the user that owns it; the
server's end of an accepted connection belongs to the user whose program listened. The check is
made on the connected socket pair, so nothing can take the port between the check and the
sending.
"""

from __future__ import annotations

import ipaddress
import socket
import struct

from privifs.errors import ServerUnreachable

TABLES = ("/proc/net/tcp", "/proc/net/tcp6")


class ForeignServer(ServerUnreachable):
    """The server's end of a loopback connection belongs to another user (or cannot be found):
    handled as a server that cannot be reached (retried; the engine's watcher starts it again)."""


def _hex(ip: str, port: int) -> set[str]:
    """``ip:port`` as the kernel's tables spell it (each 32-bit word in host order), in the IPv4
    table's form and in the IPv6 one's (an IPv4 address mapped, for a dual-stack socket)."""
    addr = ipaddress.ip_address(ip.split("%", 1)[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    forms = set()
    if isinstance(addr, ipaddress.IPv4Address):
        forms.add(f"{struct.unpack('=I', addr.packed)[0]:08X}:{port:04X}")
        packed6 = ipaddress.IPv6Address(f"::ffff:{addr}").packed
    else:
        packed6 = addr.packed
    words = struct.unpack("=4I", packed6)
    forms.add("".join(f"{w:08X}" for w in words) + f":{port:04X}")
    return forms


def server_end_owner(local: tuple[str, int], remote: tuple[str, int]) -> int | None:
    """The uid owning the socket whose local end is ``remote`` and whose peer is ``local`` (the
    server's end of our connection), or None if no table lists it."""
    ours, theirs = _hex(*local), _hex(*remote)
    for table in TABLES:
        try:
            with open(table) as f:
                lines = f.readlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) > 7 and fields[1] in theirs and fields[2] in ours:
                try:
                    return int(fields[7])
                except ValueError:
                    return None
    return None


def is_loopback(ip: str) -> bool:
    try:
        addr = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr.is_loopback


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

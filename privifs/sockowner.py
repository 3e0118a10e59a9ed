"""Who owns a TCP socket on this machine, found by its addresses: the owner of the other end of
a loopback connection (the client checks the server's end, the embedded engine its client's).

Linux tells the user owning a TCP socket (the kernel's sock_diag netlink interface, which looks
one socket up by its addresses; ``/proc/net/tcp`` and ``tcp6`` list them all, the fallback:
reading those took 4 ms with a few hundred sockets, against 16 µs). The end of an accepted
connection belongs to the user whose program accepted it; the end that connected, to the user
whose program connected.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import struct

TABLES = ("/proc/net/tcp", "/proc/net/tcp6")
NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST = 1
NLMSG_ERROR = 2
NO_COOKIE = 0xFFFFFFFF


def _ip(ip: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    addr = ipaddress.ip_address(ip.split("%", 1)[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def _diag_owner(local: tuple[str, int], remote: tuple[str, int]) -> int | None:
    """The owner of the server's end by sock_diag (an exact look-up); None if there is none.
    Raises OSError where netlink cannot be used."""
    ours, theirs = _ip(local[0]), _ip(remote[0])
    family = socket.AF_INET if isinstance(theirs, ipaddress.IPv4Address) else socket.AF_INET6
    # inet_diag_req_v2 for the socket whose source is the server's address and port
    sockid = (
        struct.pack("!HH", remote[1], local[1])
        + theirs.packed.ljust(16, b"\0")
        + ours.packed.ljust(16, b"\0")
        + struct.pack("=III", 0, NO_COOKIE, NO_COOKIE)
    )
    request = struct.pack("=BBBBI", family, socket.IPPROTO_TCP, 0, 0, 0xFFFFFFFF) + sockid
    message = struct.pack("=IHHII", 16 + len(request), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST, 1, 0) + request
    with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_SOCK_DIAG) as nl:
        nl.settimeout(1)
        nl.sendto(message, (0, 0))
        answer = nl.recv(65536)
    if len(answer) < 20:
        raise OSError("a short sock_diag answer")
    kind = struct.unpack_from("=H", answer, 4)[0]
    if kind == NLMSG_ERROR:
        code = -struct.unpack_from("=i", answer, 16)[0]
        if code == errno.ENOENT:
            return None
        raise OSError(code, os.strerror(code))
    if len(answer) < 16 + 72:
        raise OSError("a short sock_diag answer")
    return struct.unpack_from("=I", answer, 16 + 64)[0]  # inet_diag_msg's idiag_uid


def _hex(ip: str, port: int) -> set[str]:
    """``ip:port`` as ``/proc/net/tcp*`` spell it (each 32-bit word in host order), in the IPv4
    table's form and in the IPv6 one's (an IPv4 address mapped, for a dual-stack socket)."""
    addr = _ip(ip)
    forms = set()
    if isinstance(addr, ipaddress.IPv4Address):
        forms.add(f"{struct.unpack('=I', addr.packed)[0]:08X}:{port:04X}")
        packed6 = ipaddress.IPv6Address(f"::ffff:{addr}").packed
    else:
        packed6 = addr.packed
    words = struct.unpack("=4I", packed6)
    forms.add("".join(f"{w:08X}" for w in words) + f":{port:04X}")
    return forms


def _listed_owner(local: tuple[str, int], remote: tuple[str, int]) -> int | None:
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


def server_end_owner(local: tuple[str, int], remote: tuple[str, int]) -> int | None:
    """The uid owning the socket whose local end is ``remote`` and whose peer is ``local`` (the
    other end of the connection whose ends are ``local`` and ``remote``), or None if the kernel
    knows none."""
    try:
        return _diag_owner(local, remote)
    except OSError:
        return _listed_owner(local, remote)


def is_loopback(ip: str) -> bool:
    try:
        return _ip(ip).is_loopback
    except ValueError:
        return False

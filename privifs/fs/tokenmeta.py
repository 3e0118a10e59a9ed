"""How the tree is written into tokens, and read back from tokens other applications wrote.

* ``context`` is the parent directory as an absolute path (``/`` for the root, ``/docs/2026``);
  contexts written by others are read leniently (``invoices/2026-Q1`` is ``/invoices/2026-Q1``).
* ``fileName`` is the full entry name, ``extension`` its last suffix without the dot; a token
  whose fileName lacks its extension (``README`` + ``md``) shows as ``README.md``.
* ``path`` is written as the full path at creation; it is informational (the reference does not
  let it be updated), so names are always derived from context and fileName.
* Risk meta carries the POSIX attributes next to the three official fields:
  ``privifs.type`` (file | dir | symlink | fifo | socket | chardev | blockdev), ``privifs.mode``
  (octal permission bits),
  ``privifs.mtime`` (nanoseconds), ``privifs.atime`` (nanoseconds, from creation or utimens;
  absent in older tokens, the access time reads as mtime), ``privifs.target`` (symlink target),
  ``privifs.uid`` and ``privifs.gid`` (only when not the mount's owner and group: after a chown,
  or made by another user of an ``--allow-other`` mount), ``privifs.xattrs`` (the entry's extended
  attributes, sealed: :mod:`privifs.fs.xattrs`). Any other field is kept (:data:`WRITTEN`):
  other applications', and a later privifs's.
* A FIFO, a socket or a device node (``mknod``, ``mkfifo``, ``bind``) is an empty token like a
  marker with its type; what passes through it stays in the kernel of the machine that opened it
  (a mount is ``nodev``: a device node in the vault opens no device anywhere).
* A directory that must exist on its own (made by mkdir, or left empty) is a *marker*: an empty
  token with ``privifs.type = dir`` at its parent's context under its name.
* ``/.privifs`` is reserved for privifs' own tokens (the key check, the parts of big files in
  ``/.privifs/parts``) and is not shown; ``privifs.parts`` marks a manifest (docs/format.md).
"""

from __future__ import annotations

import functools
import os
import re
import stat
from dataclasses import dataclass

from privifs.client.shapes import TokenInfo
from privifs.crypto import digest
from privifs.fs import xattrs
from privifs.fs.names import (
    display_name,
)

RESERVED_CONTEXT = "/.privifs"
KEYCHECK_NAME = "keycheck"
OFFICIAL_RISK = {"classification": "confidential", "label": "privifs", "handling": "client-side-encrypted"}
# privifs fields that belong to the token's content, kept through renames and attribute changes:
# a manifest stays a manifest, a content digest stays (docs/format.md); a content upload starts
# from the risk meta of its content alone
CARRIED = frozenset({"privifs.parts", digest.FIELD})
# the fields risk_fields writes from a node's attributes (present or left out); any other field is
# kept as the token has it: other applications', CARRIED, and those of a later privifs (an older
# one dropped every privifs field it did not know: a chmod there lost the extended attributes)
WRITTEN = frozenset(
    {
        "privifs.type",
        "privifs.mode",
        "privifs.mtime",
        "privifs.atime",
        "privifs.target",
        "privifs.rdev",
        "privifs.uid",
        "privifs.gid",
        xattrs.FIELD,
    }
)

KIND_FILE, KIND_DIR, KIND_SYMLINK = "file", "dir", "symlink"
KIND_FIFO, KIND_SOCKET, KIND_CHARDEV, KIND_BLOCKDEV = "fifo", "socket", "chardev", "blockdev"
# entries with no content of their own: only the name, the type and the attributes are stored
SPECIAL_KINDS = {
    KIND_FIFO: stat.S_IFIFO,
    KIND_SOCKET: stat.S_IFSOCK,
    KIND_CHARDEV: stat.S_IFCHR,
    KIND_BLOCKDEV: stat.S_IFBLK,
}
DEVICE_KINDS = frozenset({KIND_CHARDEV, KIND_BLOCKDEV})  # carry a device number (st_rdev)


def split_context(context: str) -> list[str]:
    """Path components of a context, leniently (no leading slash, doubled slashes, ``.``)."""
    return list(_context_parts(context))


@functools.lru_cache(maxsize=8192)
def _context_parts(context: str) -> tuple[str, ...]:
    # (a vault has few contexts, one per directory, and a merge of the listing splits each
    # token's: 0.7 of 3.5 s merging a 111,602-token listing, in 300 directories)
    return tuple(display_name(p) for p in context.split("/") if p not in ("", "."))


def join_context(parts: list[str]) -> str:
    return "/" + "/".join(parts)


def same_context(a: str | None, b: str | None) -> bool:
    return a is not None and b is not None and _context_parts(a) == _context_parts(b)


TIME_MIN, TIME_MAX = -(2**63), 2**63 - 1  # nanoseconds: what st_*time_ns and an index column hold
# a sealed xattrs field as privifs writes it (another application's junk reads as no attributes)
_BASE64 = re.compile(
    rf"(?:[A-Za-z0-9+/]{{4}}){{0,{xattrs.RISK_VALUE_MAX // 4 - 1}}}"
    r"(?:[A-Za-z0-9+/]{4}|[A-Za-z0-9+/]{3}=|[A-Za-z0-9+/]{2}==)"
)
ID_MAX = 2**32 - 2  # the largest uid_t / gid_t ((uid_t)-1 means "no owner change")


def clamp_time(ns: int) -> int:
    """A time set by utimens, within what the index and the kernel hold (as ext4 clamps to its
    range): ``touch -d 2500-01-01`` (or 1000-01-01) passed the kernel's 64-bit seconds on, the
    index could not record it, the touch failed with EIO and the file's write-back failed for ever."""
    return min(max(ns, TIME_MIN), TIME_MAX)


@dataclass
class Attributes:
    kind: str
    mode: int | None  # permission bits, None: default
    mtime_ns: int | None
    target: str | None
    uid: int | None
    gid: int | None
    atime_ns: int | None = None
    rdev: int = 0  # a device node's device number (os.makedev); 0 for every other kind
    xattrs: str | None = None  # the sealed extended attributes, as privifs.fs.xattrs stores them


def parse_rdev(text: str | None) -> int:
    """``major:minor`` as written by :func:`risk_fields`; anything else reads as device 0:0."""
    try:
        major, minor = (int(n) for n in (text or "").split(":"))
    except ValueError:
        return 0
    # Linux's device numbers: a 12-bit major, a 20-bit minor
    return os.makedev(major, minor) if 0 <= major < 1 << 12 and 0 <= minor < 1 << 20 else 0


def listed_kind(info: TokenInfo) -> str:
    """What a listed token is (the kind of its :func:`attributes`, alone: a merge of the listing
    asks it of every token)."""
    kind = info.risk.get("privifs.type", KIND_FILE)
    if kind not in (KIND_FILE, KIND_DIR, KIND_SYMLINK, *SPECIAL_KINDS):
        return KIND_FILE
    return KIND_FILE if kind == KIND_SYMLINK and not info.risk.get("privifs.target") else kind


def attributes(info: TokenInfo) -> Attributes:
    risk = info.risk
    kind = listed_kind(info)

    def num(name: str, base: int = 10, low: int = TIME_MIN, high: int = TIME_MAX) -> int | None:
        """The field's integer, or None when it is absent, not an integer, or outside what the
        index and the kernel hold (another application's meta: once a value past 64 bits made
        every listing fail and the directory unreadable)."""
        try:
            value = int(risk[name], base)
        except (KeyError, ValueError):
            return None
        return value if low <= value <= high else None

    mode = num("privifs.mode", 8, low=0, high=0o7777)  # (-1 read as 07777: set-user-ID and all)
    mtime = num("privifs.mtime")
    if mtime is None and info.created_at is not None:
        created = int(info.created_at * 1e9)
        mtime = created if TIME_MIN <= created <= TIME_MAX else None
    target = risk.get("privifs.target") if kind == KIND_SYMLINK else None
    rdev = parse_rdev(risk.get("privifs.rdev")) if kind in DEVICE_KINDS else 0
    uid, gid = num("privifs.uid", low=0, high=ID_MAX), num("privifs.gid", low=0, high=ID_MAX)
    sealed = risk.get(xattrs.FIELD)
    sealed = sealed if isinstance(sealed, str) and _BASE64.fullmatch(sealed) else None
    return Attributes(kind, mode, mtime, target, uid, gid, num("privifs.atime"), rdev, sealed)


def risk_fields(
    base: dict[str, str],
    kind: str,
    mode: int,
    mtime_ns: int,
    target: str | None,
    uid: int | None,
    gid: int | None,
    atime_ns: int | None = None,
    rdev: int = 0,
    sealed_xattrs: str | None = None,
) -> dict[str, str]:
    """The risk meta to send: what the token had (other applications' fields kept), the three
    official fields, and our attributes."""
    fields = {k: v for k, v in base.items() if k not in WRITTEN}
    for k, v in OFFICIAL_RISK.items():
        fields.setdefault(k, v)
    fields["privifs.type"] = kind
    fields["privifs.mode"] = f"{stat.S_IMODE(mode):o}"
    fields["privifs.mtime"] = str(mtime_ns)
    if atime_ns is not None:
        fields["privifs.atime"] = str(atime_ns)
    if target is not None:
        fields["privifs.target"] = target
    if kind in DEVICE_KINDS:
        fields["privifs.rdev"] = f"{os.major(rdev)}:{os.minor(rdev)}"
    if uid is not None:
        fields["privifs.uid"] = str(uid)
    if gid is not None:
        fields["privifs.gid"] = str(gid)
    if sealed_xattrs:
        fields[xattrs.FIELD] = sealed_xattrs
    return fields

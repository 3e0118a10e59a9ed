"""Extended attributes: which names a mount stores, how many bytes, and their sealed form.

A node's extended attributes travel as one value, sealed, that the index and the vault both hold
as they are (neither ever holds a name or value in plaintext):

* plaintext: for each attribute, in name order, one byte of name length, the name, four bytes
  (big-endian) of value length, the value;
* sealed: AES-256-GCM in the vault's wire format (``[12-byte IV][ciphertext][16-byte tag]``)
  under the *xattr key*, HKDF-SHA256 of the user's key with salt ``privifs-xattrs`` and info
  ``privifs extended attributes key v1``;
* stored: its base64 (standard alphabet, padded) in the risk-meta field ``privifs.xattrs``
  (docs/format.md); a node with none has no field.

Names in the ``user.``, ``trusted.`` and ``security.`` namespaces are stored (the kernel decides
who may read or write each); ``system.`` names are POSIX ACLs, which this mount would not enforce,
and are refused (``EOPNOTSUPP``) like names in no namespace. All of a node's attributes take at
most :data:`TOTAL_MAX` bytes of plaintext, so that the field fits the 8 KiB a risk-meta value may
hold; a change past it is ``ENOSPC``, as ext4 answers when an inode's attribute space is full.
"""

from __future__ import annotations

import base64
import binascii
from collections import OrderedDict

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from privifs.crypto import wire
from privifs.errors import IntegrityError

FIELD = "privifs.xattrs"
NAMESPACES = (b"user.", b"trusted.", b"security.")
RISK_VALUE_MAX = 8192  # characters in one risk-meta value (docs/engine.md)
# the largest plaintext whose sealed base64 fits RISK_VALUE_MAX: 4 * ceil((n + 28) / 3) <= 8192
TOTAL_MAX = RISK_VALUE_MAX // 4 * 3 - wire.OVERHEAD
ENTRY_OVERHEAD = 5  # the length bytes of one attribute
OPENED_KEPT = 64  # sealed sets kept opened (the kernel asks for security.capability before each write)

Attrs = dict[bytes, bytes]


def xattr_key(user_key: bytes) -> bytes:
    """The key of sealed extended attributes, derived from the user's AES key (HKDF-SHA256)."""
    return HKDF(
        algorithm=hashes.SHA256(), length=32, salt=b"privifs-xattrs", info=b"privifs extended attributes key v1"
    ).derive(user_key)


def stored(name: bytes) -> bool:
    """Whether a mount stores the attribute ``name`` (a namespace of :data:`NAMESPACES` and a name in it)."""
    return name.startswith(NAMESPACES) and name not in NAMESPACES


def fits(attrs: Attrs) -> bool:
    """Whether a node may hold ``attrs``: their plaintext takes at most :data:`TOTAL_MAX` bytes."""
    return sum(ENTRY_OVERHEAD + len(k) + len(v) for k, v in attrs.items()) <= TOTAL_MAX


def encode(attrs: Attrs) -> bytes:
    out = bytearray()
    for name in sorted(attrs):
        value = attrs[name]
        out += len(name).to_bytes(1, "big") + name + len(value).to_bytes(4, "big") + value
    return bytes(out)


def decode(plain: bytes) -> Attrs:
    attrs: Attrs = {}
    at = 0
    while at < len(plain):
        n = plain[at]
        name = plain[at + 1 : at + 1 + n]
        at += 1 + n
        if len(name) != n or at + 4 > len(plain):
            raise IntegrityError("sealed extended attributes are cut short")
        size = int.from_bytes(plain[at : at + 4], "big")
        value = plain[at + 4 : at + 4 + size]
        at += 4 + size
        if len(value) != size or not n:
            raise IntegrityError("sealed extended attributes are cut short")
        attrs[name] = value
    return attrs


class Sealer:
    """Seals and opens a node's attributes with the mount's xattr key."""

    def __init__(self, key: bytes):
        self.key = key
        # the last sets opened, by their sealed form: opening one of 190 attributes took 0.2 ms,
        # asked before every write(2) (20,000 pwrites of 100 bytes: 10-15 s against 3.7-5.2 s)
        self._opened: OrderedDict[str, Attrs] = OrderedDict()

    def open(self, stored: str | None) -> Attrs:
        """The attributes ``stored`` (a node's ``xattrs``) holds (a dict of the caller's own);
        :class:`IntegrityError` when it does not open (altered, or sealed under another key)."""
        if not stored:
            return {}
        attrs = self._opened.get(stored)
        if attrs is None:
            try:
                sealed = base64.b64decode(stored, validate=True)
            except (binascii.Error, ValueError):
                raise IntegrityError("the extended attributes' field is not base64") from None
            attrs = decode(wire.open_sealed(self.key, sealed))
            self._opened[stored] = attrs
            if len(self._opened) > OPENED_KEPT:
                self._opened.popitem(last=False)
        else:
            self._opened.move_to_end(stored)
        return dict(attrs)

    def seal(self, attrs: Attrs) -> str | None:
        """What a node's ``xattrs`` holds for ``attrs`` (None: no attributes; see :func:`fits`)."""
        if not attrs:
            return None
        return base64.b64encode(wire.seal(self.key, encode(attrs))).decode("ascii")

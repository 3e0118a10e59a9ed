"""The vault's payload format: ``[12-byte IV][AES-256-GCM ciphertext][16-byte tag]``, no AAD.

One-shot helpers for small payloads and streaming sealer/opener objects for large ones, so a
1 GiB payload is encrypted or verified in bounded memory. :class:`StreamOpener` hands out
plaintext as it decrypts, but that plaintext is *unverified* until :meth:`StreamOpener.finalize`
returns; callers must not publish it before then.
"""

from __future__ import annotations

import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from privifs.errors import IntegrityError

IV_SIZE = 12
TAG_SIZE = 16
OVERHEAD = IV_SIZE + TAG_SIZE
SLACK = 15  # room past its output that ``update_into`` of a block cipher mode asks for


def seal(key: bytes, plaintext: bytes) -> bytes:
    """Encrypt ``plaintext`` into the wire format with a fresh random IV."""
    iv = os.urandom(IV_SIZE)
    return iv + AESGCM(key).encrypt(iv, plaintext, None)


def open_sealed(key: bytes, wire: bytes) -> bytes:
    """Decrypt and verify a wire-format blob; raise :class:`IntegrityError` if it does not verify."""
    if len(wire) < OVERHEAD:
        raise IntegrityError(f"ciphertext is truncated ({len(wire)} bytes, at least {OVERHEAD} needed)")
    try:
        return AESGCM(key).decrypt(wire[:IV_SIZE], wire[IV_SIZE:], None)
    except InvalidTag:
        raise IntegrityError("ciphertext failed authentication (tampered, truncated or wrong key)") from None


def plaintext_size(wire_size: int) -> int:
    return wire_size - OVERHEAD


UPDATE_SLACK = 15  # what cryptography's update_into asks beyond the input (block size - 1)


class StreamSealer:
    """Encrypt a stream: emit :attr:`header` (the IV), then :meth:`update` output, then :meth:`finalize`."""

    def __init__(self, key: bytes, iv: bytes | None = None):
        self.header = iv if iv is not None else os.urandom(IV_SIZE)
        self._enc = Cipher(algorithms.AES(key), modes.GCM(self.header)).encryptor()

    def update(self, data: bytes) -> bytes:
        return self._enc.update(data)

    def update_into(self, data: bytes | memoryview, out: bytearray | memoryview) -> int:
        """Encrypt ``data`` into ``out`` (at least ``len(data) + UPDATE_SLACK`` bytes); returns
        how many bytes it wrote."""
        return self._enc.update_into(data, out)

    def finalize(self) -> bytes:
        tail = self._enc.finalize()
        return tail + self._enc.tag


class StreamOpener:
    """Decrypt a wire-format stream fed in arbitrary pieces.

    The last 16 bytes seen are held back as the candidate tag. Output of :meth:`update` is
    unverified plaintext; :meth:`finalize` verifies the tag and raises :class:`IntegrityError`.
    """

    def __init__(self, key: bytes):
        self._key = key
        self._head = b""
        self._dec = None
        self._tail = b""
        self._out = bytearray()
        self.wire_bytes = 0

    def update(self, data: bytes | memoryview) -> bytes | memoryview:
        """Decrypt what ``data`` completes. The result may be a view of a buffer this opener
        reuses: it is valid until the next call (copy what you keep)."""
        self.wire_bytes += len(data)
        if self._dec is None:
            self._head += data
            if len(self._head) < IV_SIZE:
                return b""
            iv, data = self._head[:IV_SIZE], self._head[IV_SIZE:]
            self._head = b""
            self._dec = Cipher(algorithms.AES(self._key), modes.GCM(iv)).decryptor()
        if len(data) <= TAG_SIZE:
            buf = self._tail + bytes(data)
            if len(buf) <= TAG_SIZE:
                self._tail = buf
                return b""
            self._tail = buf[-TAG_SIZE:]
            return self._dec.update(buf[:-TAG_SIZE])
        # the held-back tail is ciphertext after all; the last 16 bytes of ``data`` are held now.
        # Both parts decrypt into one reused buffer: no allocation, no concatenation per piece.
        view = memoryview(data)
        need = len(self._tail) + len(view) - TAG_SIZE + 15  # update_into wants a block of slack
        if len(self._out) < need:
            self._out = bytearray(max(need, 2 * len(self._out)))
        out = memoryview(self._out)
        n = self._dec.update_into(self._tail, out) if self._tail else 0
        n += self._dec.update_into(view[:-TAG_SIZE], out[n:])
        self._tail = bytes(view[-TAG_SIZE:])
        return out[:n]

    def update_into(self, data: bytes | memoryview, out: memoryview) -> int:
        """:meth:`update`, the plaintext written into ``out`` (room for ``len(data) + SLACK``
        bytes at least) instead of returned; returns its length."""
        if self._dec is None or len(data) <= TAG_SIZE:
            piece = self.update(data)
            out[: len(piece)] = piece
            return len(piece)
        self.wire_bytes += len(data)
        view = memoryview(data)
        n = self._dec.update_into(self._tail, out) if self._tail else 0
        n += self._dec.update_into(view[:-TAG_SIZE], out[n:])
        self._tail = bytes(view[-TAG_SIZE:])
        return n

    def finalize(self) -> bytes:
        if self._dec is None or len(self._tail) < TAG_SIZE:
            raise IntegrityError(f"ciphertext is truncated ({self.wire_bytes} bytes, at least {OVERHEAD} needed)")
        try:
            return self._dec.finalize_with_tag(self._tail)
        except InvalidTag:
            raise IntegrityError("ciphertext failed authentication (tampered, truncated or wrong key)") from None

"""The keyed digest of a whole-token file's content, kept in its token's risk meta.

A file stored as one token (docs/format.md) carries ``privifs.digest``: the hex of
HMAC-SHA256(content key, plaintext), where the content key is HKDF-SHA256(user key, salt
``privifs-content``, info ``privifs content digest key v1``). AES-GCM already refuses a blob
altered without the key; the digest also refuses a *well-formed* blob that is not this token's
content: a server answering a download with another token's data, or blobs swapped between
tokens of the same vault, which would otherwise decrypt and be served as the file. Tokens
without the field (written by other applications or older privifs) are read as before. The
field is a statement of the token's content: it is kept through renames and attribute changes
(tokenmeta.CARRIED), and a token's content never changes.
"""

from __future__ import annotations

import hashlib
import hmac

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from privifs.errors import IntegrityError

FIELD = "privifs.digest"


def content_key(user_key: bytes) -> bytes:
    """The key of content digests, derived from the user's AES key (HKDF-SHA256)."""
    return HKDF(
        algorithm=hashes.SHA256(), length=32, salt=b"privifs-content", info=b"privifs content digest key v1"
    ).derive(user_key)


def hasher(key: bytes) -> hmac.HMAC:
    """An HMAC to feed the plaintext piece by piece; ``hexdigest()`` is the field's value."""
    return hmac.new(key, digestmod=hashlib.sha256)


def expected(risk: dict[str, str]) -> bytes | None:
    """The digest a token's risk meta states (None: it states none, or one that cannot be a digest)."""
    text = risk.get(FIELD)
    if not isinstance(text, str) or len(text) != 64:
        return None
    try:
        return bytes.fromhex(text)
    except ValueError:
        return None


class ContentCheck:
    """A download's tap (see privifs.fs.cache.Tap) that digests the plaintext as it arrives;
    :meth:`verify` raises IntegrityError unless it is the content ``want`` states."""

    def __init__(self, key: bytes, want: bytes):
        self._key, self._want = key, want
        self._h = hasher(key)

    def block(self, offset: int, data: memoryview) -> None:
        self._h.update(data)

    def restart(self) -> None:
        self._h = hasher(self._key)

    def target(self, block: int) -> bytearray | None:
        return None

    def verify(self) -> None:
        if not hmac.compare_digest(self._h.digest(), self._want):
            raise IntegrityError(
                "the content does not match the digest its token states (the server sent another "
                "token's data, or the data was swapped)"
            )


def check_for(key: bytes, risk: dict[str, str]) -> ContentCheck | None:
    """The check of a download of the token whose risk meta is ``risk`` (None: it states no digest)."""
    want = expected(risk)
    return None if want is None else ContentCheck(key, want)


def stated(key: bytes, data: bytes | memoryview) -> dict[str, str]:
    """The risk meta that states ``data``'s digest (for content at hand in one piece)."""
    return {FIELD: hmac.new(key, data, hashlib.sha256).hexdigest()}


def check_whole(key: bytes, risk: dict[str, str], data: bytes | memoryview) -> None:
    """IntegrityError if ``risk`` states a digest and ``data`` is not that content."""
    check = check_for(key, risk)
    if check is not None:
        check.block(0, memoryview(data))
        check.verify()

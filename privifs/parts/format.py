"""The manifest of a file stored as parts, and the keyed digest of each part.

A big file is a sequence of *part tokens* (each an ordinary wire-format blob, see
:mod:`privifs.crypto.wire`) plus one *manifest token* at the file's place. The manifest token's
plaintext (itself encrypted like any blob) is, all integers little-endian::

    offset 0   magic      8  b"PVFSMNFT"
           8   version    1  1, or 2 when an entry is a hole
           9   reserved   3  zero
          12   part size  4  nominal plaintext bytes per part (every part but the last has it)
          16   total size 8  plaintext bytes of the whole file
          24   count      4  number of parts (= ceil(total / part size))
          28   reserved   4  zero
          32   count entries, each:
                 token length 1 (1..255) | token (ASCII, printable, no space) |
                 part size 4 | digest 32
               or, version 2 only, a *hole* (the part is all zeros and has no token):
                 token length 1 (0) | part size 4 | digest 32 (zero)
    no trailing bytes.

A hole is what a sparse file's never-written ranges become (``truncate -s 100G``, a write far
past the end): nothing is uploaded for them. A manifest without holes stays version 1, so
readers of version 1 read every file that has none.

The digest of part ``i`` is HMAC-SHA256(part key, ``i`` (8 bytes LE) ‖ part plaintext) where the
part key is HKDF-SHA256(user key, salt ``privifs-parts``, info ``privifs part digest key v1``):
it binds the part's content and position to this manifest, so a part swapped, reordered or
replaced by another blob encrypted with the same key is refused.

:func:`decode` validates strictly: anything else (another magic, a newer version, non-zero
reserved bytes, sizes that do not add up, a short or long body) raises
:class:`~privifs.errors.IntegrityError` (a newer version says so, naming both versions).
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from collections.abc import Callable
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from privifs.errors import IntegrityError, PrivifsError

MAGIC = b"PVFSMNFT"
VERSION = 2  # the newest version read and written (1: no holes; 2: holes allowed)
READABLE = frozenset({1, 2})
HEADER = struct.Struct("<8sB3sIQI4s")  # 32 bytes
ENTRY_TAIL = struct.Struct("<I32s")
DIGEST_SIZE = 32
TOKEN_MAX = 255
PART_SIZE_MAX = 1 << 30
MARK = "privifs.parts"  # risk meta field on a manifest token: its manifest version
PARTS_CONTEXT = "/.privifs/parts"  # where part tokens live (hidden: the reserved context)
PEEK = 16 * 1024 * 1024  # the largest content looked at as a manifest that lost its mark (2.8 TiB of file)


def part_key(user_key: bytes) -> bytes:
    """The key of part digests, derived from the user's AES key (HKDF-SHA256)."""
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=b"privifs-parts", info=b"privifs part digest key v1").derive(
        user_key
    )


def part_hasher(key: bytes, index: int) -> hmac.HMAC:
    """An HMAC to feed part ``index``'s plaintext piece by piece; its digest is :func:`part_digest`."""
    return hmac.new(key, struct.pack("<Q", index), hashlib.sha256)


def part_digest(key: bytes, index: int, data: bytes | memoryview) -> bytes:
    """HMAC-SHA256(part key, index as 8 bytes LE ‖ data)."""
    mac = part_hasher(key, index)
    mac.update(data)
    return mac.digest()


@dataclass(frozen=True)
class Part:
    token: str  # "" for a hole
    size: int
    digest: bytes

    @property
    def is_hole(self) -> bool:
        return not self.token


ZERO_DIGEST = bytes(DIGEST_SIZE)
_holes: dict[int, Part] = {}


def hole(size: int) -> Part:
    """A hole of ``size`` bytes (one shared object per size: a sparse file of a terabyte has
    hundreds of thousands of them)."""
    part = _holes.get(size)
    if part is None:
        part = Part("", size, ZERO_DIGEST)
        if len(_holes) < 64:  # (the sizes of whole parts and a few last parts; not one per manifest)
            _holes[size] = part
    return part


@dataclass(frozen=True)
class Manifest:
    part_size: int
    total: int
    parts: tuple[Part, ...]

    def span(self, index: int) -> tuple[int, int]:
        """The plaintext range [start, end) of part ``index``."""
        start = index * self.part_size
        return start, start + self.parts[index].size

    def tokens(self) -> list[str]:
        """The part tokens it names (holes have none)."""
        return [p.token for p in self.parts if p.token]

    @property
    def version(self) -> int:
        """The version it is encoded in: 2 if it has a hole, else 1."""
        return 2 if any(p.is_hole for p in self.parts) else 1

    def touched(self, offset: int, length: int) -> range:
        """Indices of the parts a read of ``length`` bytes at ``offset`` needs."""
        if length <= 0 or offset >= self.total:
            return range(0)
        end = min(offset + length, self.total)
        return range(offset // self.part_size, (end - 1) // self.part_size + 1)


def parts_needed(total: int, part_size: int) -> int:
    return -(-total // part_size)


def _valid_token(token: str) -> bool:
    return 0 < len(token) <= TOKEN_MAX and token.isascii() and token.isprintable() and " " not in token


def validate(manifest: Manifest) -> None:
    ps, total, parts = manifest.part_size, manifest.total, manifest.parts
    if not 0 < ps <= PART_SIZE_MAX:
        raise IntegrityError(f"manifest part size {ps} is out of range (1..{PART_SIZE_MAX})")
    if len(parts) != parts_needed(total, ps):
        raise IntegrityError(
            f"manifest lists {len(parts)} parts; {total} bytes in parts of {ps} need {parts_needed(total, ps)}"
        )
    for i, part in enumerate(parts):
        want = ps if i < len(parts) - 1 else total - ps * (len(parts) - 1)
        if part.size != want:
            raise IntegrityError(f"manifest part {i} has {part.size} bytes, {want} expected")
        if part.is_hole:
            if part.digest != ZERO_DIGEST:
                raise IntegrityError(f"manifest part {i} is a hole with a digest")
        elif not _valid_token(part.token):
            raise IntegrityError(f"manifest part {i} names an invalid token")
        if len(part.digest) != DIGEST_SIZE:
            raise IntegrityError(f"manifest part {i} has a digest of {len(part.digest)} bytes")


def encode(manifest: Manifest) -> bytes:
    validate(manifest)
    version = manifest.version
    out = [HEADER.pack(MAGIC, version, bytes(3), manifest.part_size, manifest.total, len(manifest.parts), bytes(4))]
    for part in manifest.parts:
        token = part.token.encode("ascii")
        out.append(bytes([len(token)]) + token + ENTRY_TAIL.pack(part.size, part.digest))
    return b"".join(out)


def decode(data: bytes) -> Manifest:
    if len(data) < HEADER.size:
        raise IntegrityError(f"manifest is truncated ({len(data)} bytes, at least {HEADER.size} needed)")
    magic, version, res1, part_size, total, count, res2 = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise IntegrityError("not a privifs manifest (wrong magic)")
    if version not in READABLE:
        raise IntegrityError(
            f"manifest version {version} is not readable by this privifs (it reads versions up to {VERSION}); "
            "upgrade privifs"
        )
    if res1 != bytes(3) or res2 != bytes(4):
        raise IntegrityError("manifest has non-zero reserved bytes")
    if not 0 < part_size <= PART_SIZE_MAX or count != parts_needed(total, part_size):
        raise IntegrityError(f"manifest header is inconsistent (part size {part_size}, total {total}, {count} parts)")
    pos, parts = HEADER.size, []
    for i in range(count):
        if pos >= len(data):
            raise IntegrityError(f"manifest is truncated in entry {i}")
        n = data[pos]
        end = pos + 1 + n + ENTRY_TAIL.size
        if (n == 0 and version < 2) or end > len(data):
            raise IntegrityError(f"manifest is truncated or damaged in entry {i}")
        if n == 0:
            size, digest = ENTRY_TAIL.unpack_from(data, pos + 1)
            parts.append(hole(size) if digest == ZERO_DIGEST else Part("", size, digest))  # validate refuses the latter
            pos = end
            continue
        raw = data[pos + 1 : pos + 1 + n]
        try:
            token = raw.decode("ascii")
        except UnicodeDecodeError:
            raise IntegrityError(f"manifest entry {i} names an invalid token") from None
        size, digest = ENTRY_TAIL.unpack_from(data, pos + 1 + n)
        parts.append(Part(token, size, digest))
        pos = end
    if pos != len(data):
        raise IntegrityError(f"manifest has {len(data) - pos} trailing bytes")
    manifest = Manifest(part_size, total, tuple(parts))
    validate(manifest)
    if manifest.version != version:
        raise IntegrityError(f"manifest says version {version}, its entries are version {manifest.version}")
    return manifest


def unmarked(size: int, stated: int | None, read: Callable[[], bytes]) -> Manifest | None:
    """The manifest that a token's whole content (``size`` bytes, ``read()``) is, though the token
    is not marked as one: its meta states the size of the file it describes (``stated``), not the
    content's, and the content decodes as a manifest of that size (it decrypted with the vault's
    key). A mark goes missing when the token is listed between its writer's configure-file-meta
    and its risk-meta write, or when another application replaced the risk meta. None otherwise
    (content of up to :data:`PEEK` bytes is looked at)."""
    if stated is None or size == stated or size > PEEK:
        return None
    try:
        manifest = decode(read())
    except PrivifsError:
        return None
    return manifest if manifest.total == stated else None


def is_manifest_risk(risk: dict[str, str]) -> bool:
    """Whether a token's risk meta marks it as a manifest."""
    return MARK in risk

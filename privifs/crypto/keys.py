"""Key material: the user's AES-256 key file and the signed Curve25519 public key format.

The AES key file holds 64 hex characters and is created with mode 0600. The signed public key
is ``31 42 05 00`` + a 32-byte X25519 public key + the 64-byte BLAKE2b digest of those 36
bytes, sent as 200 lowercase hex characters (reference section 6.2).
"""

from __future__ import annotations

import errno
import hashlib
import os
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from privifs.errors import KeyFileError
from privifs.paths import private_dir, read_small

AES_KEY_SIZE = 32
SIGNED_KEY_TAG = bytes([0x31, 0x42, 0x05, 0x00])
SIGNED_KEY_HEX_LEN = 200


NO_HARD_LINKS = (errno.EPERM, errno.EOPNOTSUPP, errno.ENOSYS, errno.EXDEV)


def _write_new(path: Path, data: bytes) -> None:
    """Create ``path`` 0600 (failing if it exists) and write ``data`` to disk; a file it made and
    could not fill is removed again."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException:
        path.unlink(missing_ok=True)
        raise


def write_secret_file(path: Path, data: bytes) -> None:
    """Create ``path`` with mode 0600 atomically (fails if it already exists): written beside it
    and linked in place. On a file system without hard links (vfat, exFAT, some FUSE file
    systems, a privifs mount: helper hAD F6, init failed there) it is created in place instead,
    still never over an existing file; a partial one left by a crash is refused when read."""
    private_dir(path.parent)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    _write_new(tmp, data)
    try:
        os.link(tmp, path)
    except OSError as exc:
        if exc.errno not in NO_HARD_LINKS:
            raise
        _write_new(path, data)
    finally:
        os.unlink(tmp)


def generate_aes_key_file(path: Path) -> bytes:
    key = os.urandom(AES_KEY_SIZE)
    if path.exists():
        raise KeyFileError(f"refusing to overwrite the existing key file {path}")
    write_secret_file(path, key.hex().encode() + b"\n")
    return key


def load_aes_key(path: Path) -> bytes:
    """Read a 64-hex-character AES-256 key file, refusing world- or group-readable files."""
    try:
        text = read_small(path, private=True).decode("ascii").strip()
    except FileNotFoundError:
        raise KeyFileError(
            f"AES key file {path} does not exist; restore it (or run 'privifs init --force "
            f"--key-file YOUR_KEY', or point aes_key_file in the config at it)"
        ) from None
    except OSError as exc:
        raise KeyFileError(f"cannot read AES key file {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise KeyFileError(f"AES key file {path} must hold exactly 64 hex characters") from None
    if len(text) != 2 * AES_KEY_SIZE:
        raise KeyFileError(f"AES key file {path} must hold exactly 64 hex characters")
    try:
        return bytes.fromhex(text)
    except ValueError:
        raise KeyFileError(f"AES key file {path} must hold exactly 64 hex characters") from None


def key_id(key: bytes) -> str:
    """A short public fingerprint of an AES key (safe to store and log)."""
    return hashlib.blake2b(key, digest_size=8, person=b"privifs-keyid").hexdigest()


def signed_public_key(public_raw: bytes) -> str:
    if len(public_raw) != 32:
        raise ValueError("an X25519 public key has 32 bytes")
    head = SIGNED_KEY_TAG + public_raw
    return (head + hashlib.blake2b(head, digest_size=64).digest()).hex()


def verify_signed_public_key(hexkey: str) -> bytes:
    """Return the raw X25519 key of a signed public key, or raise ValueError saying why not."""
    if not isinstance(hexkey, str) or len(hexkey) != SIGNED_KEY_HEX_LEN:
        raise ValueError(f"must be {SIGNED_KEY_HEX_LEN} hex characters")
    try:
        raw = bytes.fromhex(hexkey)
    except ValueError:
        raise ValueError("must be hexadecimal") from None
    if raw[:4] != SIGNED_KEY_TAG:
        raise ValueError("has an unknown version tag (expected 31420500)")
    if hashlib.blake2b(raw[:36], digest_size=64).digest() != raw[36:]:
        raise ValueError("BLAKE2b hash does not match the key")
    return raw[4:36]


def generate_identity() -> tuple[bytes, str]:
    """A new X25519 key pair: (private key raw bytes, signed public key hex)."""
    sk = X25519PrivateKey.generate()
    priv = sk.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())
    pub = sk.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return priv, signed_public_key(pub)


def identity_public_key(private_raw: bytes) -> str:
    sk = X25519PrivateKey.from_private_bytes(private_raw)
    pub = sk.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return signed_public_key(pub)

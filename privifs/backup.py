"""Backups of a vault's account: one file from which ``privifs restore`` rebuilds a working
vault on a clean machine.

The file is a tar archive, mode 0600:

* ``privifs-backup.json`` (clear): format version, creation time, whether the vault is on the
  embedded engine, and the parameters of the passphrase's key derivation (scrypt, with a random
  salt) and of the encryption (AES-256-GCM nonce);
* ``secrets.bin``: AES-256-GCM, under the key scrypt derives from the passphrase (the clear
  header is its associated data), of a small tar holding ``account.json`` (server, username,
  key fingerprint, mount settings, the AES key, password, identity key or OAuth tokens, the
  engine's own secrets and the list of blobs) and, for the embedded engine, ``engine.sqlite3``
  (a consistent copy made with SQLite's backup API);
* ``engine/blobs/<xx>/<id>``: the embedded engine's blob files as they are: the vault's
  ciphertext, already encrypted and authenticated with the vault's AES key;
* ``digests.bin`` (after the blobs): AES-GCM under the same key (its own nonce, in the header;
  the clear header is its associated data) of the SHA-256 of each blob file, taken as it was
  copied, so a restore finds a damaged blob instead of restoring it silently (a backup
  without it, made before, is restored unchecked; one whose header names the digests' nonce
  and that lacks them was cut short and is refused; damaged ones are restored with exit 6, as
  a damaged blob). A blob whose tar header is damaged is
  skipped (reading goes on to the next good header) and, in a backup whose digests are there
  (it reached its end), reported like a damaged one; without them the backup may be cut short
  and is refused.

A backup of the embedded engine holds the engine's lock while it copies, so no engine runs and
the database and blobs match. A restore writes nothing over an existing configuration, secret
or engine database.
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
import io
import json
import os
import re
import sqlite3
import stat
import tarfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from privifs import paths
from privifs.config import SECRET_NAMES, Config, load, place_secret, restoring_marker, save
from privifs.errors import ConfigError, LocalStoreError, output_failed

FORMAT = 1
HEADER = "privifs-backup.json"
SECRETS = "secrets.bin"
DIGESTS = "digests.bin"
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**17, 8, 1
MIN_PASSPHRASE = 8
ENGINE_SECRETS = ("admin-token", "cab-identity.key")
BLOB_NAME = re.compile(r"^engine/blobs/([0-9a-f]{2})/([0-9a-f]{8,128})$")
COPY_BLOCK = 1024 * 1024


class BackupError(ConfigError):
    """A backup cannot be made or restored (wrong passphrase, damaged file, engine running)."""


class BackupFileError(LocalStoreError):
    """The backup file named cannot be used as asked: missing, unreadable, already there, or in a
    directory that does not exist (exit 4, a local file, as for 'token put' and 'token get'; as a
    BackupError, a ConfigError, these exited 3)."""


def _derive(passphrase: str, kdf: dict) -> bytes:
    if kdf.get("name") != "scrypt":
        raise BackupError(f"this backup uses an unknown key derivation {kdf.get('name')!r}")
    return Scrypt(salt=bytes.fromhex(kdf["salt"]), length=32, n=int(kdf["n"]), r=int(kdf["r"]), p=int(kdf["p"])).derive(
        passphrase.encode()
    )


def check_passphrase(passphrase: str) -> str:
    if len(passphrase) < MIN_PASSPHRASE:
        raise BackupError(f"the backup passphrase must have at least {MIN_PASSPHRASE} characters")
    return passphrase


@contextmanager
def engine_locked(data_dir: Path) -> Iterator[None]:
    """Hold the embedded engine's lock: no engine runs on ``data_dir`` meanwhile."""
    paths.private_dir(data_dir)
    with open(data_dir / "lock", "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise BackupError(
                f"the embedded engine is running on {data_dir} (a mount or a token command); "
                f"unmount ('privifs umount DIR') and try again"
            ) from None
        yield


def _read(path: Path | None, what: str, *, private: bool = True) -> str | None:
    """A secret file's content (base64): a small regular file, private unless told otherwise (a
    FIFO or /dev/zero is refused, never read for ever)."""
    if path is None:
        return None
    try:
        return base64.b64encode(paths.read_small(path, private=private)).decode()
    except OSError as exc:
        raise ConfigError(f"cannot read the {what} {path}: {exc.strerror}") from None


@dataclass
class Summary:
    username: str | None
    embedded: bool
    blobs: int
    blob_bytes: int
    missing: int = 0  # data files the engine had already lost: not in the backup (the vault was damaged)
    damaged: list[str] = field(default_factory=list)  # restore: data files that do not match their digest
    lost: list[str] = field(default_factory=list)  # restore: data files a damaged header lost (not restored)
    unchecked: bool = False  # restore: the data files could not be checked (no digests, or they are damaged)
    digests_damaged: bool = False  # restore: the backup's digests are there and damaged


def _tar_bytes(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o600, int(time.time())
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _account_doc(cfg: Config) -> dict:
    from privifs.account import aes_key

    aes_key(cfg)  # the key every command checks: a backup of another file as the key would be useless
    secrets = {}
    for attr, name in SECRET_NAMES.items():
        value = _read(getattr(cfg, attr), name)
        if value is not None:
            secrets[name] = value
    if "aes.key" not in secrets:
        raise ConfigError(f"no AES key is configured in {cfg.path}; nothing to back up")
    return {
        "server": cfg.server_section(),
        "username": cfg.username,
        "key_id": cfg.key_id,
        "mount": cfg.mount,
        "secrets": secrets,
    }


def _engine_snapshot(data_dir: Path, doc: dict) -> tuple[bytes, list[tuple[Path, str]]]:
    """The engine's database (SQLite backup API), its secrets and its blob files (by name)."""
    db = data_dir / "engine.sqlite3"
    if not db.exists():
        raise BackupError(f"the embedded engine has no database in {data_dir}; nothing to back up")
    src = sqlite3.connect(db)
    try:
        mem = sqlite3.connect(":memory:")
        src.backup(mem)
        referenced = {r[0] for r in mem.execute("SELECT blob_id FROM data_tokens WHERE blob_id IS NOT NULL")}
        image = mem.serialize()
        mem.close()
    except sqlite3.Error as exc:
        raise BackupError(f"cannot copy the engine's database {db}: {exc}") from None
    finally:
        src.close()
    doc["engine"] = {
        name: _read(data_dir / name, f"engine's {name}", private=False)
        for name in ENGINE_SECRETS
        if (data_dir / name).exists()
    }
    blobs, missing = [], 0
    for blob_id in sorted(referenced):
        path = data_dir / "blobs" / blob_id[:2] / blob_id
        if not path.is_file():  # lost before this backup: the rest is still worth keeping
            missing += 1
            continue
        blobs.append((path, f"engine/blobs/{blob_id[:2]}/{blob_id}"))
    doc["blobs"] = {arc: path.stat().st_size for path, arc in blobs}
    doc["missing_blobs"] = missing
    return image, blobs


Progress = Callable[[int, int], None]


def check_backup_target(out: Path) -> None:
    """A backup is written only to a new file in an existing directory."""
    if out.exists():
        raise BackupFileError(f"{out} already exists; choose another name (a backup is never overwritten)")
    if not out.parent.is_dir():
        raise BackupFileError(f"the directory {out.parent} does not exist")


def write_backup(
    cfg: Config, out: Path, passphrase: str, *, engine_dir: Path | None = None, progress: Progress | None = None
) -> Summary:
    """Write a backup of ``cfg``'s account (and embedded engine) to ``out`` (which must not exist);
    ``progress(done, total)`` follows the bytes of data copied."""
    check_passphrase(passphrase)
    check_backup_target(out)
    doc = _account_doc(cfg)
    engine_dir = engine_dir or paths.embedded_engine_dir()
    header = {
        "format": FORMAT,
        "created": time.time(),
        "embedded": cfg.embedded,
        "kdf": {"name": "scrypt", "n": SCRYPT_N, "r": SCRYPT_R, "p": SCRYPT_P, "salt": os.urandom(16).hex()},
        "cipher": {"name": "AES-256-GCM", "nonce": os.urandom(12).hex(), "digests_nonce": os.urandom(12).hex()},
    }
    header_bytes = json.dumps(header, sort_keys=True).encode()
    key = _derive(passphrase, header["kdf"])
    tmp = out.with_name(f".{out.name}.{os.getpid()}.partial")
    lock = engine_locked(engine_dir) if cfg.embedded else _nothing()
    with lock:
        members: dict[str, bytes] = {}
        blobs: list[tuple[Path, str]] = []
        if cfg.embedded:
            members["engine.sqlite3"], blobs = _engine_snapshot(engine_dir, doc)
        members["account.json"] = json.dumps(doc).encode()
        sealed = AESGCM(key).encrypt(bytes.fromhex(header["cipher"]["nonce"]), _tar_bytes(members), header_bytes)
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError as exc:
            raise output_failed(out, exc, "the backup") from None
        try:
            with os.fdopen(fd, "wb") as f:
                with tarfile.open(fileobj=f, mode="w") as tar:
                    for name, data in ((HEADER, header_bytes), (SECRETS, sealed)):
                        info = tarfile.TarInfo(name)
                        info.size, info.mode, info.mtime = len(data), 0o600, int(header["created"])
                        tar.addfile(info, io.BytesIO(data))
                    total, done = sum(doc.get("blobs", {}).values()), 0
                    digests = {}
                    for path, arc in blobs:
                        info = tarfile.TarInfo(arc)
                        info.size, info.mode, info.mtime = doc["blobs"][arc], 0o600, int(header["created"])
                        with open(path, "rb") as blob:
                            reader = _NamedReader(blob, path)
                            tar.addfile(info, reader)
                        digests[arc] = reader.sha256.hexdigest()
                        done += info.size
                        if progress is not None:
                            progress(done, total)
                    if cfg.embedded:
                        sealed_digests = AESGCM(key).encrypt(
                            bytes.fromhex(header["cipher"]["digests_nonce"]), json.dumps(digests).encode(), header_bytes
                        )
                        info = tarfile.TarInfo(DIGESTS)
                        info.size, info.mode, info.mtime = len(sealed_digests), 0o600, int(header["created"])
                        tar.addfile(info, io.BytesIO(sealed_digests))
                f.flush()
                os.fsync(f.fileno())
            os.link(tmp, out)
        except FileExistsError:
            raise BackupFileError(f"{out} appeared meanwhile; choose another name") from None
        except OSError as exc:
            if exc.filename is not None and exc.filename not in (str(tmp), tmp):  # reading a blob: names it
                raise
            raise output_failed(out, exc, "the backup") from None
        finally:
            tmp.unlink(missing_ok=True)
    return Summary(
        cfg.username, cfg.embedded, len(blobs), sum(doc.get("blobs", {}).values()), doc.get("missing_blobs", 0)
    )


class _NamedReader:
    """A file tarfile copies from, whose read errors name it (a write error of the backup
    names nothing, and is told apart by that)."""

    def __init__(self, f, path: Path):
        self.f, self.path = f, path
        self.sha256 = hashlib.sha256()  # of what was read: what went into the backup

    def read(self, size: int = -1) -> bytes:
        try:
            data = self.f.read(size)
        except OSError as exc:
            raise OSError(exc.errno, exc.strerror, str(self.path)) from None
        self.sha256.update(data)
        return data


@contextmanager
def _nothing() -> Iterator[None]:
    yield


@dataclass
class _Opened:
    header: dict
    header_bytes: bytes
    key: bytes
    members: dict[str, bytes]

    def digests(self, sealed: bytes) -> dict[str, str] | None:
        """The blob digests ``digests.bin`` holds; None when they do not decrypt (damaged)."""
        try:
            nonce = bytes.fromhex(self.header["cipher"]["digests_nonce"])
            doc = json.loads(AESGCM(self.key).decrypt(nonce, sealed, self.header_bytes))
        except (InvalidTag, KeyError, TypeError, ValueError, AttributeError, RecursionError):
            return None
        return doc if isinstance(doc, dict) else None


def _open_secrets(tar: tarfile.TarFile, passphrase: str, src: Path) -> _Opened:
    try:
        header_bytes = tar.extractfile(HEADER).read()
        sealed = tar.extractfile(SECRETS).read()
        header = json.loads(header_bytes)
    except tarfile.ReadError as exc:
        if "unexpected end of data" in str(exc):  # (tarfile reads every member's header first)
            raise BackupError(
                f"{src} is cut short (it ends in the middle of its data): a copy that did not finish, or a "
                "full disk when it was written; use a complete backup"
            ) from None
        raise BackupError(f"{src} is not a privifs backup (or it is damaged)") from None
    except (KeyError, AttributeError, ValueError, RecursionError, tarfile.TarError):
        raise BackupError(f"{src} is not a privifs backup (or it is damaged)") from None
    if not isinstance(header, dict):
        raise BackupError(f"{src} is not a privifs backup (or it is damaged)")
    if header.get("format") != FORMAT:
        raise BackupError(f"this backup has format {header.get('format')!r}; this privifs reads format {FORMAT}")
    try:
        key = _derive(passphrase, header["kdf"])
        nonce = bytes.fromhex(header["cipher"]["nonce"])
        plain = AESGCM(key).decrypt(nonce, sealed, header_bytes)
    except InvalidTag:
        raise BackupError("wrong passphrase, or the backup is damaged") from None
    except BackupError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, OverflowError, MemoryError):
        # the clear header cannot be authenticated before its own parameters are used
        raise BackupError("the backup's header is damaged (its key derivation or cipher parameters)") from None
    with tarfile.open(fileobj=io.BytesIO(plain)) as inner:
        members = {m.name: inner.extractfile(m).read() for m in inner.getmembers() if m.isfile()}
    return _Opened(header, header_bytes, key, members)


def check_restore(src: Path, cfg_path: Path) -> None:
    """What a restore can tell before its passphrase is asked for: no configuration is in the
    way, and ``src`` opens as a backup (it said "does not exist" only after the passphrase)."""
    _check_no_config(cfg_path)
    with _open_backup(src):
        pass


def _check_no_config(cfg_path: Path) -> None:
    if cfg_path.exists():
        raise BackupError(
            f"{cfg_path} already exists: restore onto a clean home (HOME=/a/new/home privifs restore …; "
            f"a backup of a separate server's vault may also go to another configuration with --config "
            f"NEW_FILE, one of the embedded engine needs a home whose engine holds no vault); privifs never "
            f"overwrites a configuration or a secret"
        )


def _open_backup(src: Path) -> tarfile.TarFile:
    try:
        mode: int | None = os.stat(src).st_mode
    except OSError:
        mode = None  # said by the open below
    if mode is not None and not stat.S_ISREG(mode) and not stat.S_ISDIR(mode):
        raise BackupFileError(f"{src} is not a regular file, so not a backup")  # (a FIFO blocked the open)
    try:
        # ignore_zeros: a damaged member header is skipped, block by block, to the next good
        # one (tar reading otherwise ends there, as if the backup ended: one changed byte lost
        # every data file after it)
        return tarfile.open(src, ignore_zeros=True)
    except FileNotFoundError:
        raise BackupFileError(f"{src} does not exist") from None
    except IsADirectoryError:
        raise BackupFileError(f"{src} is a directory, not a backup file") from None
    except tarfile.TarError:
        raise BackupError(f"{src} is not a privifs backup (or it is damaged)") from None
    except OSError as exc:
        raise BackupFileError(f"cannot read the backup {src}: {exc.strerror or exc}") from None


def restore_backup(
    src: Path, passphrase: str, cfg_path: Path, *, engine_dir: Path | None = None, progress: Progress | None = None
) -> Summary:
    """Rebuild the configuration, secrets and (embedded) engine data of a backup onto a machine
    that has none of them; a wrong passphrase, a damaged file or anything already in place stops
    it before it writes anything."""
    _check_no_config(cfg_path)
    marker = restoring_marker(cfg_path)
    interrupted = marker.exists()  # a restore killed before: its engine data may be in place already
    made = [d for d in (marker.parent, *marker.parent.parents) if not d.exists()]  # (deepest first)
    paths.private_dir(marker.parent)
    # while the marker is there, 'privifs init' and a first 'privifs mount' make no vault here;
    # the restore holds a lock on it, so the marker of one that was killed (SIGTERM, power
    # loss) is told from a running one's and taken over: restoring again is all it takes
    fd = _lock_marker(marker)
    done = False
    try:
        summary = _restore(
            src, passphrase, cfg_path, engine_dir or paths.embedded_engine_dir(), progress, interrupted=interrupted
        )
        done = True
        return summary
    finally:
        marker.unlink(missing_ok=True)
        os.close(fd)
        if not done:  # a restore that stopped leaves no directory it made for the marker
            for d in made:
                try:
                    d.rmdir()
                except OSError:
                    break


def _lock_marker(marker: Path) -> int:
    """Make (or take over, from a restore that was killed) the restore's marker and hold its lock;
    refuse while another restore holds it."""
    while True:
        fd = os.open(marker, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise BackupError(f"another restore into {marker.parent} is running: wait for it to end") from None
        try:
            if os.stat(marker, follow_symlinks=False).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)  # the restore that held it ended and removed it meanwhile: make a new one


def _restore(
    src: Path, passphrase: str, cfg_path: Path, engine_dir: Path, progress: Progress | None, *, interrupted: bool
) -> Summary:
    with _open_backup(src) as tar:
        opened = _open_secrets(tar, passphrase, src)
        members = opened.members
        doc = json.loads(members["account.json"])
        cfg_dir = cfg_path.parent
        secrets = {name: base64.b64decode(v) for name, v in doc["secrets"].items() if name in SECRET_NAMES.values()}
        for name, data in secrets.items():  # refuse before writing anything
            target = cfg_dir / name
            if target.exists() and target.read_bytes().strip() != data.strip():
                raise BackupError(
                    f"{target} already holds a different secret; privifs never overwrites a "
                    f"secret: move it away (or restore into a clean home)"
                )
        embedded = bool(doc["server"].get("embedded"))
        blobs = doc.get("blobs", {})
        damaged: list[str] = []
        lost: list[str] = []
        unchecked = digests_damaged = False
        if embedded:
            db = engine_dir / "engine.sqlite3"
            # a restore of this backup killed after it put the engine's database in place (before
            # the configuration) left that database as the backup holds it: it is run again
            resumed = interrupted and db.exists() and _same_content(db, members["engine.sqlite3"])
            if db.exists() and not resumed:
                raise BackupError(
                    f"the embedded engine's data in {engine_dir} already holds a vault; move it "
                    f"away to restore this backup"
                )
            made = paths.missing_dirs(engine_dir)
            written: list[Path] = []  # taken back if the restore fails before the database is in place
            with engine_locked(engine_dir):
                try:
                    seen, sealed_digests = _restore_blobs(tar, engine_dir, blobs, progress, written)
                    missing = sorted(set(blobs) - set(seen))
                    stated = opened.digests(sealed_digests) if sealed_digests is not None else None
                    if missing and stated is None:  # cut short (or made without digests): refused
                        raise BackupError(
                            f"the backup lacks {len(missing)} of its {len(blobs)} data files "
                            f"(e.g. {missing[0]}); it is damaged"
                        )
                    if sealed_digests is None and "digests_nonce" in opened.header.get("cipher", {}):
                        # its header says it has them: a copy stopped after its last data file
                        # (within its last few hundred bytes) was restored as a whole one
                        raise BackupError(
                            "the backup ends before its digests of the data files (the last thing "
                            "it holds): it was cut short; it is damaged"
                        )
                    # a damaged data file is restored all the same (it reads as EIO, as in the vault,
                    # and the rest of the vault is worth having); the restore says which. So is the
                    # rest of a backup that reached its end (its digests) but lost a data file to a
                    # damaged header: that file reads as EIO too
                    unchecked = stated is None
                    digests_damaged = sealed_digests is not None and stated is None
                    if stated is not None:
                        damaged = sorted(arc for arc, sha in seen.items() if stated.get(arc) != sha)
                        lost = missing
                    for name, value in doc.get("engine", {}).items():
                        if name in ENGINE_SECRETS:
                            if not (engine_dir / name).exists():
                                written.append(engine_dir / name)
                            place_secret(engine_dir / name, base64.b64decode(value), f"engine {name}")
                    db_tmp = engine_dir / ".engine.sqlite3.restoring"
                    _write_private(db_tmp, members["engine.sqlite3"])
                except BaseException:
                    if not resumed:  # (the database in place stays with the data files it names)
                        _take_back(engine_dir, made, written)
                    raise
                os.replace(db_tmp, engine_dir / "engine.sqlite3")
    paths.private_dir(cfg_dir)
    cfg = Config(
        path=cfg_path,
        embedded=embedded,
        api=doc["server"].get("api"),
        ws=doc["server"].get("ws"),
        upstream=doc["server"].get("upstream"),
        downstream=doc["server"].get("downstream"),
        username=doc.get("username"),
        key_id=doc.get("key_id"),
        mount=dict(doc.get("mount") or {}),
    )
    for attr, name in SECRET_NAMES.items():
        if name in secrets:
            setattr(cfg, attr, place_secret(cfg_dir / name, secrets[name], name))
    save(cfg)
    load(cfg_path)
    return Summary(
        cfg.username,
        embedded,
        len(blobs),
        sum(blobs.values()),
        damaged=damaged,
        lost=lost,
        unchecked=unchecked,
        digests_damaged=digests_damaged,
    )


def _same_content(path: Path, data: bytes) -> bool:
    try:
        return path.stat().st_size == len(data) and path.read_bytes() == data
    except OSError:
        return False


def _write_private(path: Path, data: bytes) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:
        path.unlink(missing_ok=True)
        raise output_failed(path, exc, "the restored engine data", elsewhere=False) from None


def _take_back(engine_dir: Path, made: list[Path], written: list[Path]) -> None:
    """Remove what a restore that failed before the engine's database was in place wrote: the
    data files, then the directories it made (each only if empty) and, if it made the engine's
    directory, its lock; a restore that fails leaves no half-made engine behind."""
    for path in written:
        path.unlink(missing_ok=True)
    blobs = engine_dir / "blobs"
    for d in sorted({p.parent for p in written}, reverse=True):
        paths.remove_made([d])
    paths.remove_made([blobs])
    if engine_dir in made:
        (engine_dir / "lock").unlink(missing_ok=True)
    paths.remove_made(made)


def _restore_blobs(
    tar: tarfile.TarFile,
    engine_dir: Path,
    expected: dict[str, int],
    progress: Progress | None,
    written: list[Path],
) -> tuple[dict[str, str], bytes | None]:
    """Write the backup's blob files into ``engine_dir`` (each file made is added to ``written``
    first): the SHA-256 of each one written, by name, and the sealed ``digests.bin`` (None in a
    backup made without it)."""
    seen: dict[str, str] = {}
    sealed_digests = None
    total, done = sum(expected.values()), 0
    for member in tar:
        if member.name == DIGESTS and member.isfile():
            sealed_digests = tar.extractfile(member).read()
            continue
        m = BLOB_NAME.match(member.name)
        if m is None or not member.isfile() or member.name not in expected:
            continue
        if member.size != expected[member.name]:
            raise BackupError(
                f"{member.name} in the backup has {member.size} bytes, not {expected[member.name]}; "
                f"the backup is damaged"
            )
        target_dir = paths.private_dir(engine_dir / "blobs" / m.group(1))
        target = target_dir / m.group(2)
        source = tar.extractfile(member)
        sha = hashlib.sha256()
        written.append(target)
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            with os.fdopen(fd, "wb") as f:
                while block := source.read(COPY_BLOCK):
                    sha.update(block)
                    f.write(block)
                f.flush()
                os.fsync(f.fileno())
        except OSError as exc:  # a full disk: the restore can be run again once there is room
            target.unlink(missing_ok=True)
            raise output_failed(target, exc, "the restored data file", elsewhere=False) from None
        seen[member.name] = sha.hexdigest()
        done += member.size
        if progress is not None:
            progress(done, total)
    return seen, sealed_digests

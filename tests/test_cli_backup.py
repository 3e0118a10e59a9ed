"""Backup and restore as a user meets them: a vault on the embedded engine made through a real
mount, backed up, restored on a clean home (its own XDG directories) and mounted again; and a
copied vault without its configuration, which must be reused, never replaced by an empty one."""

from __future__ import annotations

import hashlib
import io
import os
import re
import shutil
import sqlite3
import stat
import subprocess
import tarfile
import time

import pytest

from privifs.backup import HEADER, SECRETS
from tests.mountkit import Mount, privifs

PASS = "correct horse battery staple"
FILES = {
    "notes.txt": b"remember the milk\n",
    "photos/big.bin": os.urandom(700_000),
    "photos/small.bin": os.urandom(10_000),
    "empty": b"",
}


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def original(tmp_path_factory) -> Mount:
    """An embedded vault with FILES, made through a real mount (uploaded, unmounted)."""
    m = Mount(tmp_path_factory.mktemp("vault") / "home", None)
    with m.mounted():
        (m.dir / "photos").mkdir()
        (m.dir / "emptydir").mkdir()
        for name, data in FILES.items():
            (m.dir / name).write_bytes(data)
        m.umount()
    return m


@pytest.fixture(scope="module")
def vault(original):
    """The vault and a backup of it."""
    backup = original.root.parent / "vault.backup"
    privifs(dict(original.env, PRIVIFS_BACKUP_PASSPHRASE=PASS), "backup", str(backup))
    return original, backup


def config_dir(m: Mount):
    return m.root / "config" / "privifs"


def engine_dir(m: Mount):
    return m.root / "data" / "privifs" / "engine"


def profiles(m: Mount) -> list[str]:
    with sqlite3.connect(engine_dir(m) / "engine.sqlite3") as conn:
        return [r[0] for r in conn.execute("SELECT username FROM profiles")]


def assert_every_file(m: Mount) -> None:
    for name, data in FILES.items():
        assert digest((m.dir / name).read_bytes()) == digest(data), name
    assert (m.dir / "emptydir").is_dir()


def test_backup_restores_every_file_on_a_clean_home(vault, tmp_path):
    _, backup = vault
    assert stat.S_IMODE(backup.stat().st_mode) == 0o600
    raw = backup.read_bytes()
    for secret in ("aes.key", "password"):
        assert (config_dir(vault[0]) / secret).read_text().strip().encode() not in raw
    fresh = Mount(tmp_path / "fresh", None)
    env = dict(fresh.env, PRIVIFS_BACKUP_PASSPHRASE=PASS)
    out = privifs(env, "restore", str(backup)).stdout
    assert "restored the vault" in out
    for name in ("config.toml", "aes.key", "password"):
        assert stat.S_IMODE((config_dir(fresh) / name).stat().st_mode) == 0o600, name
    with fresh.mounted():
        assert_every_file(fresh)
    assert profiles(fresh) == profiles(vault[0])


def test_restore_refuses_a_wrong_passphrase_and_existing_secrets(vault, tmp_path):
    _, backup = vault
    fresh = Mount(tmp_path / "fresh", None)
    wrong = privifs(
        dict(fresh.env, PRIVIFS_BACKUP_PASSPHRASE="not the passphrase"), "restore", str(backup), check=False
    )
    assert wrong.returncode == 3 and "wrong passphrase" in wrong.stderr and "Traceback" not in wrong.stderr
    assert not (tmp_path / "fresh" / "config").exists() and not (tmp_path / "fresh" / "data").exists()
    other_key = os.urandom(32).hex() + "\n"
    config_dir(fresh).mkdir(parents=True)
    (config_dir(fresh) / "aes.key").write_text(other_key)
    r = privifs(dict(fresh.env, PRIVIFS_BACKUP_PASSPHRASE=PASS), "restore", str(backup), check=False)
    assert r.returncode == 3 and "never overwrites a secret" in r.stderr
    assert (config_dir(fresh) / "aes.key").read_text() == other_key
    assert not (config_dir(fresh) / "config.toml").exists()


def test_mount_reuses_a_copied_embedded_vault_and_never_overwrites_its_password(original, tmp_path):
    """The old defect: a copy of aes.key, password and the engine's data without config.toml
    registered a new profile, overwrote the password and mounted an empty drive."""
    copy = Mount(tmp_path / "copy", None)
    config_dir(copy).mkdir(parents=True)
    for name in ("aes.key", "password"):
        shutil.copy2(config_dir(original) / name, config_dir(copy) / name)
    shutil.copytree(engine_dir(original), engine_dir(copy))
    password = (config_dir(copy) / "password").read_bytes()
    with copy.mounted():
        assert_every_file(copy)
    assert (config_dir(copy) / "password").read_bytes() == password
    assert profiles(copy) == profiles(original)


def test_mount_refuses_a_copied_embedded_vault_without_its_key_or_password(original, tmp_path):
    copy = Mount(tmp_path / "copy", None)
    shutil.copytree(engine_dir(original), engine_dir(copy))
    r = copy.mount(check=False)
    assert r.returncode == 3 and "already holds a vault" in r.stderr and "password" in r.stderr
    assert not (config_dir(copy) / "config.toml").exists() and not (config_dir(copy) / "password").exists()
    config_dir(copy).mkdir(parents=True, exist_ok=True)
    shutil.copy2(config_dir(original) / "password", config_dir(copy) / "password")
    r = copy.mount(check=False)
    assert r.returncode == 3 and "no AES key" in r.stderr
    assert not (config_dir(copy) / "aes.key").exists()
    assert profiles(copy) == profiles(original)


def test_backup_refuses_while_the_embedded_engine_runs(original, tmp_path):
    out = tmp_path / "while-mounted.backup"
    with original.mounted():
        r = privifs(dict(original.env, PRIVIFS_BACKUP_PASSPHRASE=PASS), "backup", str(out), check=False)
        assert r.returncode == 3 and "engine is running" in r.stderr and "umount" in r.stderr
        assert not out.exists() and not list(tmp_path.glob(".while-mounted*"))
        original.umount()


def test_backup_of_a_server_account_restores_its_access(eng, tmp_path):
    """With a real server the data stays there: the backup carries the key and the account."""
    user = Mount(tmp_path / "user", eng.urls)
    src = tmp_path / "a.txt"
    src.write_text("kept on the server")
    token = privifs(user.env, "token", "put", str(src)).stdout.strip()
    backup = tmp_path / "account.backup"
    r = privifs(dict(user.env, PRIVIFS_BACKUP_PASSPHRASE="short"), "backup", str(backup), check=False)
    assert r.returncode == 3 and "at least 8 characters" in r.stderr and not backup.exists()
    privifs(dict(user.env, PRIVIFS_BACKUP_PASSPHRASE=PASS), "backup", str(backup))
    again = privifs(dict(user.env, PRIVIFS_BACKUP_PASSPHRASE=PASS), "backup", str(backup), check=False)
    assert again.returncode == 4 and "already exists" in again.stderr  # a local file, as for token get
    fresh = Mount(tmp_path / "fresh", None)
    privifs(dict(fresh.env, PRIVIFS_BACKUP_PASSPHRASE=PASS), "restore", str(backup))
    privifs(fresh.env, "token", "get", token, str(tmp_path / "back.txt"))
    assert (tmp_path / "back.txt").read_text() == "kept on the server"
    assert not (tmp_path / "fresh" / "data").exists()


def test_a_configuration_without_its_embedded_engine_data_is_refused(original, tmp_path):
    """config.toml and the key restored by hand, the engine's data forgotten: no empty vault."""
    copy = Mount(tmp_path / "copy", None)
    shutil.copytree(config_dir(original), config_dir(copy))
    cfg = config_dir(copy) / "config.toml"
    cfg.write_text(cfg.read_text().replace(str(config_dir(original)), str(config_dir(copy))))
    r = copy.mount(check=False)
    assert r.returncode == 3 and "does not hold this vault" in r.stderr and r.stderr.count("\n") == 1
    r = privifs(copy.env, "token", "ls", check=False)
    assert r.returncode == 3 and "does not hold this vault" in r.stderr and "HOME" not in r.stderr
    assert not (engine_dir(copy) / "engine.sqlite3").exists()
    # the configuration of another home (an fstab line's config=, mount(8) running without HOME):
    # told to restore a vault that is there all along (helper hK); now told about the home
    theirs = config_dir(original) / "config.toml"
    r = privifs(copy.env, "--config", str(theirs), "token", "ls", check=False)
    assert r.returncode == 3 and f"{theirs} is not in this home's configuration" in r.stderr, r.stderr
    assert r.stderr.count("\n") == 1 and "mount it with that HOME" in r.stderr
    assert not (engine_dir(copy) / "engine.sqlite3").exists()


def test_backup_and_restore_report_progress_in_bytes(original, tmp_path, monkeypatch):
    from privifs.backup import restore_backup, write_backup
    from privifs.config import load

    for k in ("XDG_CONFIG_HOME", "XDG_DATA_HOME", "XDG_STATE_HOME", "XDG_CACHE_HOME"):
        monkeypatch.setenv(k, original.env[k])
    blobs = sum(f.stat().st_size for f in (engine_dir(original) / "blobs").rglob("*") if f.is_file())
    seen: list[tuple[int, int]] = []
    out = tmp_path / "progress.backup"
    write_backup(
        load(config_dir(original) / "config.toml"), out, PASS, progress=lambda done, total: seen.append((done, total))
    )
    assert seen and seen[-1] == (blobs, blobs)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)
    fresh = tmp_path / "fresh"
    for k, sub in (("XDG_CONFIG_HOME", "config"), ("XDG_DATA_HOME", "data"), ("XDG_STATE_HOME", "state")):
        monkeypatch.setenv(k, str(fresh / sub))
    restored: list[tuple[int, int]] = []
    restore_backup(
        out,
        PASS,
        fresh / "config" / "privifs" / "config.toml",
        progress=lambda done, total: restored.append((done, total)),
    )
    assert restored[-1] == (blobs, blobs)
    assert (
        sum(f.stat().st_size for f in (fresh / "data" / "privifs" / "engine" / "blobs").rglob("*") if f.is_file())
        == blobs
    )


def flip_byte(path, offset: int, mask: int) -> None:
    """Damage ``path`` by one byte at ``offset`` (xor ``mask``)."""
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ mask]))


def assert_all_but_big_bin_restored(fresh: Mount) -> None:
    """The restored vault reads photos/big.bin (whose backup copy was damaged) as EIO, never other
    bytes, and every other file whole (and the empty directory)."""
    with fresh.mounted():
        with pytest.raises(OSError) as info:
            (fresh.dir / "photos" / "big.bin").read_bytes()
        assert info.value.errno == 5
        for name, data in FILES.items():
            if name != "photos/big.bin":
                assert digest((fresh.dir / name).read_bytes()) == digest(data), name
        assert (fresh.dir / "emptydir").is_dir()


def test_restore_of_a_backup_with_a_damaged_data_file_names_it_and_restores_the_rest(vault, tmp_path):
    """A byte changed inside a data file of the backup (a bad disk, a bad copy) was restored
    silently (exit 0); the file it holds then failed to read with nothing said. The restore now
    checks each data file against the digest the backup recorded: it restores the vault all the
    same (the rest is readable) and says which data file is damaged, with exit 6."""
    import tarfile

    _, backup = vault
    damaged = tmp_path / "damaged.backup"
    shutil.copy(backup, damaged)
    with tarfile.open(damaged) as tar:
        biggest = max((m for m in tar.getmembers() if m.name.startswith("engine/blobs/")), key=lambda m: m.size)
    flip_byte(damaged, biggest.offset_data + biggest.size // 2, 0xFF)  # photos/big.bin's ciphertext
    fresh = Mount(tmp_path / "fresh", None)
    r = privifs(dict(fresh.env, PRIVIFS_BACKUP_PASSPHRASE=PASS), "restore", str(damaged), check=False)
    assert r.returncode == 6, (r.stdout, r.stderr)
    assert "restored the vault" in r.stdout and "Traceback" not in r.stderr
    assert "1 of the backup's" in r.stderr and biggest.name in r.stderr and "verify --data" in r.stderr
    assert_all_but_big_bin_restored(fresh)


def test_restore_of_a_backup_with_a_damaged_member_header_restores_the_rest(vault, tmp_path):
    """One byte changed in the tar header of one data file of the backup (not in its data) made
    the whole restore fail: tar reading stopped at that header, so every data file after it
    counted as missing ("the backup lacks 3 of its 4 data files"), exit 3, nothing restored, all
    of the vault lost for one byte. The restore now reads on past a damaged header; a backup that
    reached its end (its sealed digests are there) restores everything else, names the data file
    it lost and exits 6, as for a damaged data file."""
    import tarfile

    _, backup = vault
    damaged = tmp_path / "damaged-header.backup"
    shutil.copy(backup, damaged)
    with tarfile.open(damaged) as tar:
        blobs = [m for m in tar.getmembers() if m.name.startswith("engine/blobs/")]
    biggest = max(blobs, key=lambda m: m.size)  # photos/big.bin's ciphertext
    assert len(blobs) >= 3
    flip_byte(damaged, biggest.offset + 20, 0x55)  # in its header's name field: its checksum no longer matches
    fresh = Mount(tmp_path / "fresh", None)
    r = privifs(dict(fresh.env, PRIVIFS_BACKUP_PASSPHRASE=PASS), "restore", str(damaged), check=False)
    assert r.returncode == 6, (r.stdout, r.stderr)
    assert "restored the vault" in r.stdout and "Traceback" not in r.stderr
    assert biggest.name in r.stderr and "verify --data" in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert_all_but_big_bin_restored(fresh)


def test_restore_to_another_configuration_names_it_in_the_mount_it_suggests(vault, tmp_path):
    """'privifs --config FILE restore' ended with "Mount it with 'privifs mount DIR'": that
    command reads the default configuration, which is not there, and stopped with "... there is
    no password file ...: restore it, or move the engine's data away to start a new vault". The
    command it suggests now names the configuration, and works."""
    _, backup = vault
    fresh = Mount(tmp_path / "fresh", None)
    cfg = tmp_path / "elsewhere" / "vault.toml"
    env = dict(fresh.env, PRIVIFS_BACKUP_PASSPHRASE=PASS)
    r = privifs(env, "--config", str(cfg), "restore", str(backup))
    assert f"privifs --config {cfg} mount DIR" in r.stdout, r.stdout
    privifs(env, "--config", str(cfg), "mount", str(fresh.dir))
    try:
        assert_every_file(fresh)
    finally:
        privifs(env, "--config", str(cfg), "umount", str(fresh.dir))


def test_a_restore_killed_after_placing_the_engine_data_is_finished_by_running_it_again(vault, tmp_path):
    """A restore killed (or a power loss) after it put the engine's database in place but before
    it wrote the configuration left the marker, the engine data and part of the secrets; running
    it again, as its own message says, stopped with 'the embedded engine's data ... already holds
    a vault; move it away', and a mount with 'there is no password file'. Running it again now
    finishes it (the database in place is the backup's own), and the vault mounts whole."""
    _, backup = vault
    fresh = Mount(tmp_path / "fresh", None)
    env = dict(fresh.env, PRIVIFS_BACKUP_PASSPHRASE=PASS)
    privifs(env, "restore", str(backup))
    cfg = config_dir(fresh)
    for name in ("config.toml", "password", "identity.key"):  # what the killed run had not written yet
        (cfg / name).unlink(missing_ok=True)
    (cfg / ".restore-in-progress").write_bytes(b"")  # the killed run's marker
    assert (engine_dir(fresh) / "engine.sqlite3").exists()
    r = privifs(env, "restore", str(backup), check=False)
    assert r.returncode == 0, (r.stdout, r.stderr)
    assert not (cfg / ".restore-in-progress").exists()
    with fresh.mounted():
        assert_every_file(fresh)
    # a database that is not the backup's is never taken for a killed restore's
    other = Mount(tmp_path / "other", None)
    privifs(dict(other.env, PRIVIFS_BACKUP_PASSPHRASE=PASS), "restore", str(backup))
    with sqlite3.connect(engine_dir(other) / "engine.sqlite3") as conn:
        conn.execute("CREATE TABLE other_vault (x)")
    conn.close()
    for name in ("config.toml", "password", "identity.key"):
        (config_dir(other) / name).unlink(missing_ok=True)
    (config_dir(other) / ".restore-in-progress").write_bytes(b"")
    r = privifs(dict(other.env, PRIVIFS_BACKUP_PASSPHRASE=PASS), "restore", str(backup), check=False)
    assert r.returncode == 3 and "already holds a vault" in r.stderr, r.stderr


def test_restore_of_something_that_is_not_a_backup_says_so_in_one_line(tmp_path):
    """An empty file, random bytes or a file cut inside its first header printed tarfile's
    four-line 'file could not be opened successfully: - method gz: …' report."""
    fresh = Mount(tmp_path / "fresh", None)
    env = dict(fresh.env, PRIVIFS_BACKUP_PASSPHRASE=PASS)
    for name, data in (("empty", b""), ("random", os.urandom(5000)), ("cut", b"privifs-backup.json" + bytes(80))):
        path = tmp_path / f"{name}.backup"
        path.write_bytes(data)
        r = privifs(env, "restore", str(path), check=False)
        assert r.returncode == 3, (name, r.stderr)
        assert r.stderr.count("\n") == 1 and "not a privifs backup" in r.stderr, (name, r.stderr)
    deep = tmp_path / "deep.backup"  # a header nested past the parser's limit (helper hAM F2: exit 70)
    with tarfile.open(deep, "w") as tar:
        for member, data in ((HEADER, b"[" * 100_000 + b"]" * 100_000), (SECRETS, bytes(64))):
            info = tarfile.TarInfo(member)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    r = privifs(env, "restore", str(deep), check=False)
    assert r.returncode == 3 and r.stderr.count("\n") == 1 and "not a privifs backup" in r.stderr, r.stderr
    r = privifs(env, "restore", str(tmp_path), check=False)  # a directory
    assert r.returncode in (3, 4) and r.stderr.count("\n") == 1 and "directory" in r.stderr, r.stderr
    # said before any passphrase is asked for (none is at hand here): the restore asked for it
    # first, and a FIFO named as the backup blocked the command
    os.mkfifo(tmp_path / "fifo.backup")
    for name, says in (("missing.backup", "does not exist"), ("fifo.backup", "not a regular file")):
        r = privifs(fresh.env, "restore", str(tmp_path / name), check=False, timeout=30)
        assert r.returncode == 4 and r.stderr.count("\n") == 1 and says in r.stderr, (name, r.stderr)
    assert not (tmp_path / "fresh" / "config").exists() and not (tmp_path / "fresh" / "data").exists()


def test_backup_and_restore_onto_a_full_disk_name_the_file_and_what_to_do(vault, tmp_path):
    """A backup, or a restore, whose disk filled up said only 'No space left on device'."""
    from tests.test_fs_fulldisk import small_filesystem

    original, backup = vault
    env = dict(original.env, PRIVIFS_BACKUP_PASSPHRASE=PASS)
    with small_filesystem(tmp_path / "small", "256k") as small:
        r = privifs(env, "backup", str(small / "vault.backup"), check=False)
        assert r.returncode == 4 and r.stderr.count("\n") == 1, r.stderr
        assert f"cannot write the backup {small / 'vault.backup'}: No space left on device" in r.stderr
        assert "free some space there or name a file on another disk" in r.stderr
        assert list(small.iterdir()) == []
        fresh = Mount(tmp_path / "fresh", None)
        data = small / "data"
        env = dict(fresh.env, PRIVIFS_BACKUP_PASSPHRASE=PASS, XDG_DATA_HOME=str(data))
        r = privifs(env, "restore", str(backup), check=False)
        assert r.returncode == 4 and r.stderr.count("\n") == 1, r.stderr
        assert "cannot write the restored data file " + str(data / "privifs" / "engine" / "blobs") in r.stderr
        assert "No space left on device" in r.stderr and "free some space there, then run" in r.stderr
        assert not (config_dir(fresh) / "config.toml").exists()
        subprocess.run(["mount", "-o", "remount,size=16m", str(small)], check=True, timeout=30)
        assert "restored the vault" in privifs(env, "restore", str(backup)).stdout
        fresh.env = env
        with fresh.mounted():
            assert_every_file(fresh)


def test_restore_of_a_backup_with_a_damaged_header_says_so_in_one_line(tmp_path):
    """The clear header's key derivation and cipher parameters are read before anything can be
    authenticated: a damaged one was an 'internal error' (exit 70) naming a ValueError,
    KeyError, AttributeError or MemoryError."""
    import io
    import json
    import tarfile

    good = {
        "format": 1,
        "created": 0,
        "embedded": True,
        "kdf": {"name": "scrypt", "n": 2**14, "r": 8, "p": 1, "salt": "00" * 16},
        "cipher": {"name": "AES-256-GCM", "nonce": "00" * 12},
    }
    damaged = {
        "n not a number": {**good, "kdf": {**good["kdf"], "n": "abc"}},
        "n not a power of 2": {**good, "kdf": {**good["kdf"], "n": 3}},
        "n too big": {**good, "kdf": {**good["kdf"], "n": 2**40}},
        "salt not hex": {**good, "kdf": {**good["kdf"], "salt": "zz"}},
        "kdf a list": {**good, "kdf": [1]},
        "no kdf": {k: v for k, v in good.items() if k != "kdf"},
        "nonce not hex": {**good, "cipher": {"nonce": "q"}},
        "no nonce": {**good, "cipher": {}},
        "header a list": [1, 2],
        "header a string": "x",
    }
    fresh = Mount(tmp_path / "fresh", None)
    env = dict(fresh.env, PRIVIFS_BACKUP_PASSPHRASE=PASS)
    for what, header in damaged.items():
        path = tmp_path / "damaged.backup"
        path.unlink(missing_ok=True)
        with tarfile.open(path, "w") as tar:
            for name, data in (("privifs-backup.json", json.dumps(header).encode()), ("secrets.bin", bytes(64))):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        r = privifs(env, "restore", str(path), check=False)
        assert r.returncode == 3, (what, r.stderr)
        assert r.stderr.count("\n") == 1 and "damaged" in r.stderr, (what, r.stderr)
    assert not (tmp_path / "fresh" / "config").exists() and not (tmp_path / "fresh" / "data").exists()


@pytest.mark.slow
def test_backup_warns_of_changes_not_uploaded_and_of_data_the_vault_already_lost(tmp_path):
    """A mount killed before its uploads: the changes are staged on this machine only, and a
    backup of the vault does not hold them (it said nothing, exit 0). A blob gone from the
    engine's data (the vault damaged): every backup failed until the damaged file was deleted,
    so the intact files could not be backed up at all."""
    m = Mount(tmp_path / "home", None, mount_args=("--write-back-delay", "3600"))
    env = dict(m.env, PRIVIFS_BACKUP_PASSPHRASE=PASS)
    fresh = Mount(tmp_path / "fresh", None)
    try:
        m.mount()
        (m.dir / "uploaded.txt").write_bytes(b"in the vault")
        (m.dir / "lost.txt").write_bytes(b"its blob goes")
        m.wait_idle()
        lost = next(t["token"] for t in m.tokens() if t["fileName"] == "lost.txt")
        m.umount()
        clean = privifs(env, "backup", str(tmp_path / "clean.backup"))
        assert "warning" not in clean.stderr
        with sqlite3.connect(engine_dir(m) / "engine.sqlite3") as conn:
            (blob,) = conn.execute("SELECT blob_id FROM data_tokens WHERE token = ?", (lost,)).fetchone()
        (engine_dir(m) / "blobs" / blob[:2] / blob).unlink()
        m.mount()
        (m.dir / "staged.txt").write_bytes(b"only on this machine")
        m.kill9()
        for _ in range(150):  # until the embedded engine, left without its mount, has stopped
            r = privifs(env, "backup", str(tmp_path / "staged.backup"), check=False)
            if "is running" not in r.stderr:
                break
            time.sleep(0.2)
        assert r.returncode == 0, r.stderr
        assert "1 change made in the mount is not in the vault yet" in r.stderr, r.stderr
        assert "1 data files of the vault were already missing" in r.stderr, r.stderr
        assert "Traceback" not in r.stderr
        privifs(dict(fresh.env, PRIVIFS_BACKUP_PASSPHRASE=PASS), "restore", str(tmp_path / "staged.backup"))
        with fresh.mounted():
            assert (fresh.dir / "uploaded.txt").read_bytes() == b"in the vault"
            with pytest.raises(OSError):  # damaged, as it was in the vault: never wrong bytes
                (fresh.dir / "lost.txt").read_bytes()
            assert not (fresh.dir / "staged.txt").exists()
    finally:
        fresh.cleanup()
        m.cleanup()


def test_a_first_mount_during_a_restore_makes_no_vault_of_its_own(vault, tmp_path):
    """A first mount (which makes a vault when there is no configuration) run while a restore
    writes one: it registered a new, empty profile and mounted an empty drive, and the restore
    then failed. Now the restore's marker stops it, and a second restore, until the first ends."""
    _, backup = vault
    fresh = Mount(tmp_path / "fresh", None)
    import fcntl

    marker = config_dir(fresh) / ".restore-in-progress"
    config_dir(fresh).mkdir(parents=True)
    running = open(marker, "w")  # what a running restore keeps: the marker, locked
    fcntl.flock(running, fcntl.LOCK_EX)
    try:
        r = fresh.mount(check=False)
        assert r.returncode != 0 and "a restore into" in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert not (engine_dir(fresh) / "engine.sqlite3").exists()
        assert not (config_dir(fresh) / "config.toml").exists()
        env = dict(fresh.env, PRIVIFS_BACKUP_PASSPHRASE=PASS)
        r = privifs(env, "restore", str(backup), check=False)
        assert r.returncode == 3 and "another restore" in r.stderr, r.stderr
    finally:
        running.close()  # the restore was killed (SIGTERM, power loss): its marker stays, unlocked
    assert marker.exists()
    r = fresh.mount(check=False)  # a first mount still makes no vault there
    assert r.returncode != 0 and "privifs restore FILE' again" in r.stderr, r.stderr
    privifs(env, "restore", str(backup))  # restoring again is all it takes (the marker was removed by hand)
    assert not marker.exists()
    with fresh.mounted():
        assert_every_file(fresh)
    assert profiles(fresh) == profiles(vault[0])


def test_a_restore_of_a_truncated_backup_fails_and_leaves_nothing_behind(vault, tmp_path):
    """A backup cut between two of its data files (a copy that stopped, a full disk) is refused
    ("lacks N of its data files"), but the data files before the cut stayed in the engine's data
    directory (with its lock and directories): a failed restore left a half-made engine there."""
    import tarfile

    _, backup = vault
    with tarfile.open(backup) as tar:
        blobs = [m for m in tar.getmembers() if m.name.startswith("engine/blobs/")]
    assert len(blobs) >= 2
    cut = tmp_path / "cut.backup"
    with open(backup, "rb") as src, open(cut, "wb") as dst:
        dst.write(src.read(blobs[-1].offset))  # every data file but the last, then the end
    fresh = Mount(tmp_path / "fresh", None)
    r = privifs(dict(fresh.env, PRIVIFS_BACKUP_PASSPHRASE=PASS), "restore", str(cut), check=False)
    assert r.returncode == 3 and "lacks 1 of its" in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert not (tmp_path / "fresh" / "config").exists() and not (tmp_path / "fresh" / "data").exists()
    # cut in the middle of a data file: "this is not a privifs backup", naming no file (helper hK)
    with open(backup, "rb") as src, open(cut, "wb") as dst:
        dst.write(src.read(blobs[-1].offset_data + blobs[-1].size // 2))
    r = privifs(dict(fresh.env, PRIVIFS_BACKUP_PASSPHRASE=PASS), "restore", str(cut), check=False)
    assert r.returncode == 3 and f"{cut} is cut short" in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert not (tmp_path / "fresh" / "config").exists() and not (tmp_path / "fresh" / "data").exists()
    # cut after the last data file, within the digests' tar header: restored with exit 0 and a
    # warning that nothing could be checked (helper hW), though the header says it has digests
    with tarfile.open(backup) as tar:
        digests = tar.getmember("digests.bin")
    with open(backup, "rb") as src, open(cut, "wb") as dst:
        dst.write(src.read(digests.offset + 100))
    r = privifs(dict(fresh.env, PRIVIFS_BACKUP_PASSPHRASE=PASS), "restore", str(cut), check=False)
    assert r.returncode == 3 and "cut short" in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert not (tmp_path / "fresh" / "config").exists() and not (tmp_path / "fresh" / "data").exists()
    r = privifs(dict(fresh.env, PRIVIFS_BACKUP_PASSPHRASE=PASS), "restore", str(backup))
    with fresh.mounted():
        assert_every_file(fresh)


def test_restore_of_a_backup_whose_digests_are_damaged_says_nothing_could_be_checked(vault, tmp_path):
    """One byte changed in the backup's digests (and one in a data file) was restored with exit
    0 and a warning (helper hW): damage that the restore cannot rule out is exit 6, as for a
    damaged data file it finds; the vault is restored all the same."""
    import tarfile

    _, backup = vault
    damaged = tmp_path / "damaged-digests.backup"
    shutil.copy(backup, damaged)
    with tarfile.open(damaged) as tar:
        digests = tar.getmember("digests.bin")
    flip_byte(damaged, digests.offset_data + digests.size // 2, 0xFF)
    fresh = Mount(tmp_path / "fresh", None)
    r = privifs(dict(fresh.env, PRIVIFS_BACKUP_PASSPHRASE=PASS), "restore", str(damaged), check=False)
    assert r.returncode == 6, (r.stdout, r.stderr)
    assert "restored the vault" in r.stdout and "Traceback" not in r.stderr
    assert "digests" in r.stderr and "damaged" in r.stderr and "verify --data" in r.stderr
    with fresh.mounted():
        assert_every_file(fresh)


@pytest.mark.timeout(120)  # without the fix, the backup of /dev/zero as the key reads for ever
def test_backup_refuses_a_key_that_is_not_the_vaults_and_writes_no_useless_backup(original, tmp_path):
    """A configuration whose aes_key_file named another file (/etc/hostname) was backed up with
    that file as the vault's key, exit 0 and 'backup written': a backup that can never decrypt
    the vault, found out only when it is needed. /dev/zero there read for ever (memory filling).
    The backup now checks the key as every command does (format, mode, fingerprint)."""
    env = dict(original.env, PRIVIFS_BACKUP_PASSPHRASE=PASS)
    # (the secrets beside the configuration are named relative to it: named in full here, so a
    # copy elsewhere finds them)
    text = re.sub(
        r'_file = "([^"/]+)"',
        lambda m: f'_file = "{config_dir(original) / m.group(1)}"',
        (config_dir(original) / "config.toml").read_text(),
    )
    real_key = str(config_dir(original) / "aes.key")
    other = tmp_path / "other.key"
    other.write_text(os.urandom(32).hex() + "\n")
    other.chmod(0o600)
    hostname = tmp_path / "hostname.txt"
    hostname.write_text("myhost\n")
    hostname.chmod(0o600)
    for name, key_file, says in (
        ("other", other, "not the key this configuration was created with"),
        ("hostname", hostname, "64 hex characters"),
        ("zero", "/dev/zero", "not a regular file"),
    ):
        cfg = tmp_path / name / "config.toml"
        cfg.parent.mkdir(mode=0o700)
        cfg.write_text(text.replace(f'"{real_key}"', f'"{key_file}"'))
        cfg.chmod(0o600)
        out = tmp_path / f"{name}.backup"
        r = privifs(env, "--config", str(cfg), "backup", str(out), check=False, timeout=60)
        assert r.returncode == 3 and says in r.stderr and r.stderr.count("\n") == 1, (name, r.stderr)
        assert not out.exists()

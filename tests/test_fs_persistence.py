"""What the vault keeps: persistence across remounts with nothing local left, crash recovery
after ``kill -9``, changes by other clients as a mount shows them, tampering, the wrong key, and
plaintext never on local disk. Conflict names, directory renames as meta updates and renames
over a directory's only entry are namespace logic, tested in-process in test_fs_api*.py."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import mmap
import os
import shutil
import signal
import sqlite3
import stat
import subprocess
import threading
import time
from pathlib import Path

import pytest

from privifs.fs.cache import REOPEN_EVERY
from tests.mountkit import Mount, is_mounted, privifs
from tests.test_cli_verify import blob_of_token


def manifest(root) -> dict:
    """Everything a user would compare: type, mode, mtime (files and links), size, content."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            rel = os.path.relpath(p, root)
            if stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", stat.S_IMODE(st.st_mode))
            elif stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", os.readlink(p))
            else:
                with open(p, "rb") as f:
                    digest = hashlib.sha256(f.read()).hexdigest()
                out[rel] = ("file", stat.S_IMODE(st.st_mode), st.st_mtime_ns, st.st_size, digest)
    return out


def build_tree(root) -> None:
    (root / "docs" / "deep" / "deeper").mkdir(parents=True)
    (root / "empty" / "nested-empty").mkdir(parents=True)
    (root / "docs" / "a.txt").write_text("alpha\n")
    (root / "docs" / "deep" / "b.bin").write_bytes(os.urandom(200_000))
    (root / "docs" / "deep" / "deeper" / "c").write_bytes(b"")
    (root / "exec.sh").write_text("#!/bin/sh\n")
    os.chmod(root / "exec.sh", 0o750)
    os.chmod(root / "empty", 0o711)
    os.symlink("docs/a.txt", root / "link")
    os.symlink("../../nowhere", root / "docs" / "dangling")
    os.utime(root / "docs" / "a.txt", ns=(1_234_567_890_123_456_789, 1_234_567_890_123_456_789))
    (root / "ünïcødé 文件.txt").write_text("names survive")


def fresh_remount(m: Mount) -> None:
    m.umount()
    shutil.rmtree(m.root / "state")
    shutil.rmtree(m.root / "cache")
    m.mount()


def test_everything_persists_across_a_remount_with_no_local_state(engine, tmp_path):
    with Mount(tmp_path, engine.urls).mounted() as m:
        build_tree(m.dir)
        before = manifest(m.dir)
        fresh_remount(m)
        assert manifest(m.dir) == before
        assert (m.dir / "docs" / "a.txt").stat().st_mtime_ns == 1_234_567_890_123_456_789


def test_crash_recovery_after_kill_9_loses_nothing_closed(engine, tmp_path):
    with Mount(tmp_path, engine.urls, mount_args=("--write-back-delay", "3600")).mounted() as m:
        (m.dir / "replaced.txt").write_text("version 1")
        m.wait_idle()
        (m.dir / "replaced.txt").write_text("version 2")  # committed v1, staged v2
        (m.dir / "new").mkdir()
        for i in range(20):
            (m.dir / "new" / f"f{i}").write_bytes(f"file {i}".encode() * (i * 500 + 1))
        os.rename(m.dir / "new" / "f0", m.dir / "new" / "renamed")
        os.unlink(m.dir / "new" / "f1")
        unclosed = open(m.dir / "new" / "still-open", "wb")
        unclosed.write(b"not closed yet")
        expected = manifest(m.dir)
        m.kill9()
        try:
            unclosed.close()
        except OSError:
            pass  # its mount died with the daemon
        m.mount()
        got = manifest(m.dir)
        expected.pop("new/still-open")
        got.pop("new/still-open", None)
        assert got == expected
        m.wait_idle()
        tokens = m.tokens()
        paths = [(t["context"], t["fileName"]) for t in tokens if not t["context"].startswith("/.privifs")]
        assert len(paths) == len(set(paths)), "a path has two tokens"
        assert ("/", "replaced.txt") in paths and ("/new", "renamed") in paths and ("/new", "f1") not in paths
        fresh_remount(m)
        assert (m.dir / "replaced.txt").read_text() == "version 2"
        final = manifest(m.dir)
        final.pop("new/still-open", None)  # created but never closed: present, content not promised
        assert final == got


def test_a_close_returns_without_the_daemon_and_what_it_closed_survives_kill_9(engine, tmp_path):
    """privifs answers no FLUSH, so close(2) does not wait for the daemon; what was written is
    durable when the write returns, though the release (queued by the kernel) never arrives."""
    with Mount(tmp_path, engine.urls, mount_args=("--write-back-delay", "3600")).mounted() as m:
        (m.dir / "first").write_bytes(b"1")  # the first close tells the kernel there is no flush
        data = os.urandom(123_456)  # not 100,000: the tampering test finds its blob by that size
        fd = os.open(m.dir / "closed", os.O_WRONLY | os.O_CREAT, 0o644)
        os.write(fd, data[:70_000])
        os.write(fd, data[70_000:])
        mtime = os.fstat(fd).st_mtime_ns
        os.kill(m.pid, signal.SIGSTOP)
        closer = threading.Thread(target=os.close, args=(fd,), daemon=True)
        closer.start()
        closer.join(60)
        closed = not closer.is_alive()
        m.kill9()  # stopped, then killed: the release never reached it
        assert closed, "close(2) waited for the daemon"
        m.mount()
        assert (m.dir / "closed").read_bytes() == data
        assert (m.dir / "closed").stat().st_mtime_ns == mtime
        assert (m.dir / "first").read_bytes() == b"1"


@pytest.mark.slow
def test_kill_9_during_an_upload_neither_duplicates_nor_loses(eng, tmp_path):
    with Mount(tmp_path, eng.urls, mount_args=("--write-back-delay", "0")).mounted() as m:
        eng.set_options(stream_bytes_per_second=8 * 1024 * 1024)  # the 32 MiB upload takes about 4 s
        data = os.urandom(32 * 1024 * 1024)
        (m.dir / "big.bin").write_bytes(data)
        deadline = time.monotonic() + 30
        while not any(p["state"] == "uploading" for p in m.control({"cmd": "status"})[0]["status"]["pending"]):
            assert time.monotonic() < deadline, "the upload never started"
            time.sleep(0.02)
        time.sleep(1.0)
        m.kill9()
        eng.set_options(stream_bytes_per_second=0)
        m.mount()
        assert (m.dir / "big.bin").read_bytes() == data
        m.wait_idle()
        mine = [t for t in m.tokens() if t["fileName"] == "big.bin"]
        assert len(mine) == 1 and mine[0]["size"] == len(data)
        fresh_remount(m)
        assert hashlib.sha256((m.dir / "big.bin").read_bytes()).digest() == hashlib.sha256(data).digest()


def test_changes_by_a_second_client_appear(engine, tmp_path):
    with Mount(tmp_path, engine.urls).mounted() as m:
        os.listdir(m.dir)
        assert not (m.dir / "from-cli.txt").exists()  # a negative lookup the kernel may cache
        src = tmp_path / "src.txt"
        src.write_text("put by privifs token")
        token = m.token("put", str(src), "--name", "from-cli.txt", "--context", "/inbox").stdout.strip()
        m.refresh()
        assert (m.dir / "inbox" / "from-cli.txt").read_text() == "put by privifs token"
        m.token("mv", token, "--name", "moved.txt", "--context", "/archive/2026")
        m.refresh()
        assert not (m.dir / "inbox").exists()
        assert (m.dir / "archive" / "2026" / "moved.txt").read_text() == "put by privifs token"
        m.token("rm", token)
        m.refresh()
        assert not (m.dir / "archive" / "2026" / "moved.txt").exists()


@pytest.mark.slow
def test_two_mounts_of_one_vault_see_each_others_changes(engine, tmp_path):
    a = Mount(tmp_path / "a", engine.urls)
    b = Mount(tmp_path / "b", engine.urls, username=a.username, register=False, key_file=a.key_file)
    try:
        a.mount()
        b.mount()
        (a.dir / "shared").mkdir()
        (a.dir / "shared" / "note.txt").write_text("from A")
        a.wait_idle()
        b.refresh()
        assert (b.dir / "shared" / "note.txt").read_text() == "from A"
        (b.dir / "shared" / "note.txt").write_text("edited in B")
        os.rename(b.dir / "shared", b.dir / "common")
        b.wait_idle()
        a.refresh()
        assert (a.dir / "common" / "note.txt").read_text() == "edited in B"
        assert not (a.dir / "shared").exists()
    finally:
        a.cleanup()
        b.cleanup()


def test_tampered_ciphertext_gives_eio_never_wrong_bytes(engine, tmp_path):
    with Mount(tmp_path, engine.urls).mounted() as m:
        (m.dir / "victim.bin").write_bytes(os.urandom(100_000))
        (m.dir / "bystander.txt").write_text("untouched")
        m.wait_idle()
        token = next(t["token"] for t in m.tokens() if t["fileName"] == "victim.bin")
        m.umount()
        shutil.rmtree(m.root / "cache")
        # (its own blob: the first of that size in the shared engine was sometimes another test's)
        blob = blob_of_token(engine, token)
        raw = bytearray(blob.read_bytes())
        raw[5000] ^= 0x40
        blob.write_bytes(bytes(raw))
        m.mount()
        with pytest.raises(OSError) as info:
            (m.dir / "victim.bin").read_bytes()
        assert info.value.errno == errno.EIO
        assert (m.dir / "bystander.txt").read_text() == "untouched"
        assert "victim.bin" in m.log() and "integrity" in m.log()
        status = privifs(m.env, "status", str(m.dir)).stdout  # the failed read shows there too
        assert "fetch failed:" in status and "victim.bin: integrity failure" in status


def test_wrong_key_is_detected_at_mount(engine, tmp_path):
    a = Mount(tmp_path / "a", engine.urls)
    b = Mount(tmp_path / "b", engine.urls, username=a.username, register=False, key_file=a.key_file)
    # then a key of its own, behind init's back (init itself refuses a wrong key)
    b.key_file.write_text(os.urandom(32).hex() + "\n")
    cfg = b.root / "config" / "privifs" / "config.toml"
    cfg.write_text("".join(line for line in cfg.read_text().splitlines(True) if not line.startswith("key_id")))
    try:
        a.mount()
        (a.dir / "f").write_text("x")
        a.wait_idle()
        a.umount()
        r = b.mount(check=False)
        assert r.returncode == 3
        assert "does not decrypt this vault" in r.stderr and r.stderr.count("\n") == 1
        assert not os.path.ismount(b.dir)
    finally:
        b.cleanup()
        a.cleanup()


def test_plaintext_never_touches_cache_staging_or_logs(engine, tmp_path):
    m = Mount(tmp_path, engine.urls, mount_args=("--write-back-delay", "0"))
    canary = b"CANARY-" + os.urandom(6).hex().encode()
    try:
        m.mount()
        (m.dir / "a.txt").write_bytes(canary * 10)
        (m.dir / "big.bin").write_bytes((canary + b"\n") * 100_000)
        with open(m.dir / "pending.txt", "wb") as f:
            f.write(canary)
            f.flush()
            assert (m.dir / "pending.txt").read_bytes() == canary
            m.wait_idle()
            assert (m.dir / "big.bin").read_bytes().count(canary) == 100_000
            dirs = [m.root / "state", m.root / "cache", m.root / "config", m.root / "run", engine.data_dir]
            for d in dirs:
                for dirpath, _, files in os.walk(d):
                    for name in files:
                        p = os.path.join(dirpath, name)
                        if os.path.islink(p) or not os.path.isfile(p):
                            continue
                        with open(p, "rb") as fh:
                            assert canary not in fh.read(), p
    finally:
        m.cleanup()
    assert privifs(m.env, "status", check=False).returncode == 0


@pytest.mark.slow
def test_a_failed_first_mount_leaves_no_state_and_a_later_failure_keeps_the_earlier_state(engine, tmp_path):
    """A first mount refused for a wrong key left its vault's state directory (index, staging,
    lock, mount.log) and cache directory behind, as if the vault had been mounted here; a
    failure after a successful mount must not touch what that mount made."""
    a = Mount(tmp_path / "a", engine.urls)
    b = Mount(tmp_path / "b", engine.urls, username=a.username, register=False, key_file=a.key_file)
    right = b.key_file.read_text()
    cfg = b.root / "config" / "privifs" / "config.toml"
    cfg.write_text("".join(line for line in cfg.read_text().splitlines(True) if not line.startswith("key_id")))
    state, cache = b.root / "state" / "privifs", b.root / "cache" / "privifs"

    def leftovers() -> list[str]:
        dirs = [d for d in (state / "vaults", cache / "vaults") if d.exists()]
        return sorted(str(p.relative_to(b.root)) for d in dirs for p in d.rglob("*"))

    try:
        a.mount()
        (a.dir / "f").write_text("x")
        a.wait_idle()
        a.umount()
        b.key_file.write_text(os.urandom(32).hex() + "\n")
        for extra in ((), ("--foreground",)):
            r = b.mount(*extra, check=False)
            assert r.returncode == 3 and "does not decrypt this vault" in r.stderr, r.stderr
            assert leftovers() == [], (extra, leftovers())
            assert not os.path.ismount(b.dir)
        b.key_file.write_text(right)
        b.mount()
        assert (b.dir / "f").read_text() == "x"
        b.umount()
        made = leftovers()
        assert any(p.endswith("index.sqlite3") for p in made) and any(p.endswith("vault-checked") for p in made)
        b.key_file.write_text(os.urandom(32).hex() + "\n")
        r = b.mount(check=False)
        assert r.returncode == 3 and "does not decrypt this vault" in r.stderr, r.stderr
        assert set(made) <= set(leftovers()), set(made) - set(leftovers())
    finally:
        b.cleanup()
        a.cleanup()


def test_a_damaged_key_check_is_told_from_a_wrong_key(engine, tmp_path):
    """A key-check token that fails authentication locked the vault out ("use the key this vault
    was created with") although the key was right and every file intact: the vault's own files
    now prove the key, the damage is logged and reported by verify, and a wrong key still fails."""
    m = Mount(tmp_path / "a", engine.urls)
    try:
        m.mount()
        for n in range(3):
            (m.dir / f"f{n}.txt").write_text("kept " * (n + 10))
        m.wait_idle()
        (check,) = [
            t["token"]
            for t in map(json.loads, m.token("ls", "--json", "--all").stdout.splitlines())
            if t["context"].strip("/") == ".privifs"
        ]
        m.umount()
        with sqlite3.connect(engine.data_dir / "engine.sqlite3") as conn:  # (the engine serves other tests too)
            (blob_id,) = conn.execute("SELECT blob_id FROM data_tokens WHERE token = ?", (check,)).fetchone()
        blob = engine.data_dir / "blobs" / blob_id[:2] / blob_id
        raw = bytearray(blob.read_bytes())
        raw[40] ^= 0x01
        blob.write_bytes(bytes(raw))
        m.mount()
        m.wait_online()  # (a vault mounted here before starts at once; the key check follows)
        assert (m.dir / "f2.txt").read_text() == "kept " * 12
        assert f"key-check token {check} fails authentication although this key decrypts" in m.log()
        m.umount()
        r = privifs(m.env, "verify", check=False)
        assert r.returncode != 0 and "damaged: /.privifs/keycheck: the key-check token" in r.stdout
        key = os.urandom(32).hex() + "\n"
        m.key_file.write_text(key)
        cfg = m.root / "config" / "privifs" / "config.toml"
        cfg.write_text("".join(line for line in cfg.read_text().splitlines(True) if not line.startswith("key_id")))
        r = m.mount(check=False)
        assert r.returncode == 3 and "does not decrypt this vault" in r.stderr
    finally:
        m.cleanup()


def written_here_and_elsewhere(m: Mount, tmp_path) -> Path:
    """kept.txt written through the mount and uploaded; new.txt stored by another application
    (in the vault, not cached) and listed; returns new.txt's source file."""
    (m.dir / "kept.txt").write_text("written here")
    m.wait_idle()
    src = tmp_path / "new.txt"
    src.write_text("from another application")
    m.token("put", str(src))
    m.refresh()
    return src


def test_a_cache_directory_removed_while_mounted_is_made_again(engine, tmp_path):
    """`rm -rf ~/.cache` while mounted (to free space; a cleaner) made every read of a file not
    cached yet EIO ('No such file or directory: .../cache/...') until the next mount: the cache
    is now made again and the file downloaded."""
    with Mount(tmp_path, engine.urls).mounted() as m:
        written_here_and_elsewhere(m, tmp_path)
        shutil.rmtree(m.root / "cache")
        assert (m.dir / "new.txt").read_text() == "from another application"
        assert "was removed while mounted: it is made again" in m.log()
        (m.dir / "later.txt").write_text("written after")
        m.wait_idle()
        m.umount()
        shutil.rmtree(m.root / "cache")
        m.mount()
        assert (m.dir / "later.txt").read_text() == "written after"
        assert (m.dir / "kept.txt").read_text() == "written here"


def vault_cache_dir(m: Mount):
    (state,) = (m.root / "state").glob("privifs/vaults/*")
    return m.root / "cache" / "privifs" / "vaults" / state.name


def test_a_cache_that_cannot_be_made_again_yet_fails_no_fsync_and_no_read(engine, tmp_path):
    """`rm -rf ~/.cache` of a big cache takes seconds, and the mount makes the cache again while
    it runs: opening the new table then failed (the removal took its files) and that failure
    reached the programs. Seen: an fsync loop during one `rm -rf ~/.cache` got EIO for every
    fsync until rm ended, reads of files not cached EIO, 'OperationalError: attempt to write a
    readonly database' / 'no such table: Cache' as unexpected failures in status, the token
    deletion task restarted. A table that cannot be opened now (here: its file's name taken by a
    directory) is only a cache that is not there: uploads land, reads go through memory, and the
    cache is made once it can be."""
    with Mount(tmp_path, engine.urls).mounted() as m:
        src = written_here_and_elsewhere(m, tmp_path)
        cache = vault_cache_dir(m)
        shutil.rmtree(m.root / "cache")
        (cache / "entries" / "cache.db").mkdir(parents=True)
        with open(m.dir / "synced.txt", "wb") as f:
            f.write(b"fsynced while the cache cannot be opened")
            f.flush()
            os.fsync(f.fileno())
        assert (m.dir / "new.txt").read_text() == "from another application"
        status = privifs(m.env, "status", str(m.dir)).stdout
        assert "UNAVAILABLE: cannot be opened again" in status, status
        (cache / "entries" / "cache.db").rmdir()
        time.sleep(REOPEN_EVERY)  # the table is tried again at most this often
        src.write_text("read once the cache can be made")
        m.token("put", str(src), "--name", "later.txt")
        m.refresh()
        assert (m.dir / "later.txt").read_text() == "read once the cache can be made"
        assert (cache / "entries" / "cache.db").is_file()
        assert "UNAVAILABLE" not in privifs(m.env, "status", str(m.dir)).stdout
        assert "failed unexpectedly" not in m.log()
        m.umount()
        shutil.rmtree(m.root / "cache")
        m.mount()
        assert (m.dir / "synced.txt").read_bytes() == b"fsynced while the cache cannot be opened"


def test_fsync_and_reads_work_while_rm_rf_removes_the_cache(engine, tmp_path):
    """The race itself: the cache directory removed again and again (a long `rm -rf`, a
    cleaner) while a program writes and fsyncs files and reads files that are not cached
    (O_DIRECT: through the mount, not the page cache). Every call succeeds."""
    with Mount(tmp_path, engine.urls).mounted() as m:
        names = [f"old{i}.bin" for i in range(20)]
        for name in names:
            (m.dir / name).write_bytes(name.encode() * 1000)
        m.wait_idle()
        stop = threading.Event()

        def remove() -> None:
            while not stop.is_set():
                shutil.rmtree(m.root / "cache", ignore_errors=True)

        remover = threading.Thread(target=remove)
        remover.start()
        failures = []
        buf = mmap.mmap(-1, 1 << 16)
        try:
            for i, name in enumerate(names):
                try:
                    with open(m.dir / f"new{i}.bin", "wb") as f:
                        f.write(os.urandom(30_000))
                        f.flush()
                        os.fsync(f.fileno())
                    fd = os.open(m.dir / name, os.O_RDONLY | os.O_DIRECT)
                    try:
                        n = os.preadv(fd, [buf], 0)
                    finally:
                        os.close(fd)
                    assert buf[:n] == name.encode() * 1000
                except OSError as exc:
                    failures.append((i, exc))
        finally:
            stop.set()
            remover.join(timeout=60)
        assert failures == []
        assert "failed unexpectedly" not in m.log()


def test_changes_staged_under_a_deleted_index_come_back_in_lost_and_found(engine, tmp_path):
    """Deleting the local index (the obvious remedy once it was reported damaged) deleted every
    staged file no upload had taken yet, without a word, and the damage was logged as a full
    disk, its reserve deleted (helper hX). The refusal says what to do now; once it is done,
    each staged file comes back as a file of /lost+found, with its content, and is uploaded;
    the uploaded tree is read again."""
    with Mount(tmp_path, engine.urls, mount_args=("--write-back-delay", "3600")).mounted() as m:
        (m.dir / "uploaded.txt").write_text("in the vault")
        m.wait_idle()
        (m.dir / "d").mkdir()
        staged = {f"d/f{i}": os.urandom(i * 70_000 + 1) for i in range(3)}
        for name, data in staged.items():
            (m.dir / name).write_bytes(data)
        m.kill9()
        index = next((m.root / "state").rglob("index.sqlite3"))
        for wal in index.parent.glob("index.sqlite3-*"):
            wal.unlink()  # (its copy of the first page would stand in for the damaged one)
        index.write_bytes(b"junk" * 2048)  # damaged: refused, with what to do (not taken for a full disk)
        r = m.mount(check=False)
        assert r.returncode != 0 and "cannot be opened" in r.stderr and "/lost+found" in r.stderr, r.stderr
        assert "is full" not in m.log() and index.with_name("index.sqlite3.reserve").exists()
        for damaged in index.parent.glob("index.sqlite3*"):
            if not damaged.name.endswith(".reserve"):
                damaged.unlink()  # as the message says
        m.mount("--read-only")  # keeps them for a writable mount (helper hZ: they were deleted)
        assert not (m.dir / "lost+found").exists()
        m.umount()
        r = m.mount(check=False)
        assert r.returncode == 0, m.log()[-3000:]
        # said where the user looks, not only in the log (helper hK)
        said = f"3 files staged here that it no longer names are in {m.dir}/lost+found"
        assert said in r.stdout + r.stderr, r.stdout + r.stderr
        assert (
            f"3 files staged here that the local index (made anew at the start) no longer named, in {m.dir}/lost+found"
            in (privifs(m.env, "status", str(m.dir)).stdout)
        )
        found = sorted((m.dir / "lost+found").iterdir())
        assert sorted(p.read_bytes() for p in found) == sorted(staged.values())
        found[0].rename(m.dir / "moved-out")  # status counts what is still there
        assert "2 files staged here" in privifs(m.env, "status", str(m.dir)).stdout
        (m.dir / "moved-out").rename(found[0])
        assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in found)
        assert (m.dir / "uploaded.txt").read_text() == "in the vault"
        assert found[0].name in m.log() and "no entry of the local index names" in m.log()
        m.wait_idle()
        assert {t["fileName"] for t in m.tokens() if t["context"] == "/lost+found"} == {p.name for p in found}
        m.umount()
        m.mount()  # nothing found again: the next start removes nothing and adds nothing
        assert sorted((m.dir / "lost+found").iterdir()) == found


def _staged_files(m: Mount) -> list[Path]:
    return [p for p in (m.root / "state").glob("privifs/vaults/*/staging/*") if p.is_file()]


def test_umount_names_damaged_staged_content_not_a_failing_server(engine, tmp_path):
    """A staged file whose chunk no longer authenticates can never be uploaded: umount said
    'the server keeps failing 1 changes … uploaded once the server takes them' after a minute
    (helper hX). It says what is wrong as soon as the retry met the damage again."""
    with Mount(tmp_path, engine.urls, mount_args=("--write-back-delay", "3600")).mounted() as m:
        (m.dir / "f.bin").write_bytes(os.urandom(300_000))
        (staged,) = _staged_files(m)
        with open(staged, "r+b") as f:
            f.seek(70_000)
            byte = f.read(1)
            f.seek(70_000)
            f.write(bytes([byte[0] ^ 1]))
        r = m.umount("--timeout", "240", check=False)
        assert r.returncode == 7 and "cannot be uploaded" in r.stderr and "authentication" in r.stderr, r.stderr
        assert "server" not in r.stderr and not is_mounted(m.dir)
        m.mount()
        with pytest.raises(OSError) as exc:
            (m.dir / "f.bin").read_bytes()
        assert exc.value.errno == errno.EIO
        (m.dir / "f.bin").write_bytes(b"written again")  # the remedy it names
        m.umount()
        m.mount()
        assert (m.dir / "f.bin").read_bytes() == b"written again"


def test_an_index_with_a_page_zeroed_is_refused_with_what_to_do(engine, tmp_path):
    """An index with a page zeroed on the disk opened, and reading that page later was an
    internal error (DatabaseError) of the mount, of status and umount, or of a task, depending on
    the page (helper hZ: pages 1, 3-5 and 7-14 of 15). SQLite's quick check at open refuses it,
    saying what to do, as a junk index is."""
    with Mount(tmp_path, engine.urls, mount_args=("--write-back-delay", "3600")).mounted() as m:
        for i in range(3):
            (m.dir / f"f{i}").write_bytes(os.urandom(5000))
        m.kill9()
        index = next((m.root / "state").glob("privifs/vaults/*/index.sqlite3"))
        db = sqlite3.connect(index)
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        page, pages = (db.execute(f"PRAGMA {p}").fetchone()[0] for p in ("page_size", "page_count"))
        db.close()
        intact = index.read_bytes()
        for number in sorted({1, 3, 4, 7, pages - 1}):  # (each a different failure before: hZ)
            with open(index, "r+b") as f:
                f.seek(number * page)
                f.write(bytes(page))
            r = m.mount(check=False)
            assert r.returncode == 4 and "cannot be opened" in r.stderr and "/lost+found" in r.stderr, (number, r)
            index.write_bytes(intact)
        m.mount()
        assert sorted(p.name for p in m.dir.iterdir()) == ["f0", "f1", "f2"]


def test_a_staging_directory_removed_while_mounted_is_made_again_and_status_still_answers(engine, tmp_path):
    """With the staging directory removed while mounted, every create was EIO until a remount,
    and 'privifs status' called the daemon "not answering … busy or hung" with kill -9 as the
    remedy: it had answered, with the error of its staging usage (helper hX)."""
    with Mount(tmp_path, engine.urls).mounted() as m:
        (m.dir / "before.txt").write_text("uploaded")
        m.wait_idle()
        staging = next((m.root / "state").glob("privifs/vaults/*/staging"))
        shutil.rmtree(staging)
        r = privifs(m.env, "status", str(m.dir), check=False)
        assert r.returncode == 0 and "not answering" not in r.stdout + r.stderr, (r.stdout, r.stderr)
        (m.dir / "after.txt").write_text("staged again")
        assert staging.is_dir()
        m.wait_idle()
        assert (m.dir / "before.txt").read_text() == "uploaded"
        m.umount()
        m.mount()
        assert (m.dir / "after.txt").read_text() == "staged again"


def test_a_staged_file_whose_header_size_was_edited_is_served_and_uploaded_whole(engine, tmp_path):
    """An edited size in a staged file's header was served and uploaded as the file's: cut
    short, or with zeros added (helper hX). The header no longer authenticates; the file's size
    is taken from its last chunk, and what was written is what is read and uploaded."""
    with Mount(tmp_path, engine.urls, mount_args=("--write-back-delay", "3600")).mounted() as m:
        data = os.urandom(150_000)
        (m.dir / "f.bin").write_bytes(data)
        m.kill9()
        (staged,) = _staged_files(m)
        with open(staged, "r+b") as f:
            f.seek(32)
            f.write((100_000).to_bytes(8, "little"))
        m.mount()
        assert (m.dir / "f.bin").read_bytes() == data
        assert "did not authenticate" in m.log()
        m.wait_idle()
        token = next(t["token"] for t in m.tokens() if t["fileName"] == "f.bin")
        m.token("get", token, str(tmp_path / "out"))
        assert (tmp_path / "out").read_bytes() == data


def test_cache_entries_or_staged_files_swapped_on_disk_are_never_served_or_uploaded_as_each_other(engine, tmp_path):
    """Two cache entries' files swapped served each file's content as the other's, and a
    staged file copied over another's name was uploaded as that file (helper hX: D1, D2). Each
    is bound to its place: the entries are misses, fetched again, and the copied staged file is
    damage (its file shows its last upload), never another file's bytes."""
    with Mount(tmp_path, engine.urls, mount_args=("--write-back-delay", "3600")).mounted() as m:
        one, two = os.urandom(1000), os.urandom(1000)
        (m.dir / "s1").write_bytes(one)
        (m.dir / "s2").write_bytes(two)
        m.umount()  # uploaded: their staged files became their cache entries
        entries = sorted((m.root / "cache").rglob("*.val"), key=lambda p: p.stat().st_mtime_ns)
        assert len(entries) == 2
        a, b = (p.read_bytes() for p in entries)
        entries[0].write_bytes(b)
        entries[1].write_bytes(a)
        m.mount()
        assert (m.dir / "s1").read_bytes() == one and (m.dir / "s2").read_bytes() == two
        (m.dir / "s1").write_bytes(b"v2 of s1, staged")
        (m.dir / "s2").write_bytes(b"v2 of s2, staged, longer")
        m.kill9()
        s1, s2 = sorted(_staged_files(m), key=lambda p: p.stat().st_size)  # (told apart by their sizes)
        s2.write_bytes(s1.read_bytes())  # s1's staged file copied over s2's
        m.mount()
        assert (m.dir / "s1").read_bytes() == b"v2 of s1, staged"
        assert (m.dir / "s2").read_bytes() == two  # its last upload; never s1's bytes
        assert "is bound to another place" in m.log()
        m.wait_idle()
        m.umount()
        m.mount()
        assert (m.dir / "s2").read_bytes() == two


def test_a_token_command_beside_a_mount_leaves_the_embedded_engines_wal_and_a_kill_loses_nothing(tmp_path):
    """Making the engine's database 0600 opened and closed its file beside the engine's own
    connection, which dropped the engine's POSIX locks on it: 'privifs token ls' (or verify)
    then took itself for the database's last user, folded the WAL in and deleted it, the engine
    went on committing into the deleted file, and a kill -9 of daemon and engine lost every
    file uploaded since (helper hB: 20 of 40)."""
    m = Mount(tmp_path, None)
    try:
        m.mount()
        engine_dir = m.root / "data" / "privifs" / "engine"
        for i in range(5):
            (m.dir / f"a{i}").write_bytes(os.urandom(1000 + i))
        m.wait_idle()
        assert (engine_dir / "engine.sqlite3-wal").exists()
        m.token("ls")
        assert (engine_dir / "engine.sqlite3-wal").exists()
        for i in range(5):
            (m.dir / f"b{i}").write_bytes(os.urandom(2000 + i))
        m.wait_idle()
        expected = {p.name: p.read_bytes() for p in m.dir.iterdir()}
        engines = subprocess.run(
            ["pgrep", "-f", f"engine --data-dir {engine_dir}"], capture_output=True, text=True, timeout=30
        ).stdout.split()
        assert engines
        m.kill9()
        for pid in engines:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
        m.mount()
        assert {p.name: p.read_bytes() for p in m.dir.iterdir()} == expected
    finally:
        m.cleanup()

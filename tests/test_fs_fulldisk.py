"""A full local disk: the staging area, the index and the read cache share a small tmpfs. Writes
get ENOSPC (never EIO, never a dead mount); cached and staged files stay readable; the cache
evicts before the disk fills and leaves the staging reserve alone; once space is freed
everything written reaches the vault."""

from __future__ import annotations

import errno
import hashlib
import os
import subprocess
import time
from contextlib import contextmanager, suppress
from pathlib import Path

import pytest
import trio

from privifs.account import embedded_usernames
from privifs.devkit.mount import privifs
from privifs.engine.db import Database
from privifs.errors import DiskFullError, VaultFull
from privifs.fs.cache import ContentCache, footprint
from privifs.fs.namespace import Index
from privifs.fs.sync import VAULT_FULL_RETRY
from tests.enginekit import EngineProcess
from tests.fskit import CACHE_KEY as KEY
from tests.fskit import sealed_file
from tests.mountkit import Mount

MiB = 1024 * 1024


@contextmanager
def small_filesystem(path: Path, size: str):
    path.mkdir(parents=True)
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)], capture_output=True, timeout=30
    )
    assert r.returncode == 0, f"cannot make a small filesystem for the test: {r.stderr!r}"
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False, timeout=30)


def read_uncached(path: Path) -> bytes:
    """The file's content as the daemon serves it now (the kernel's page cache dropped first)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        chunks = []
        while chunk := os.read(fd, MiB):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def fill(path: Path) -> int:
    """Write random MiBs to ``path`` until the mount says ENOSPC; returns the bytes written."""
    written = 0
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        with pytest.raises(OSError) as info:
            for _ in range(256):
                written += os.write(fd, os.urandom(MiB))
        assert info.value.errno == errno.ENOSPC, info.value
    finally:
        try:
            os.close(fd)
        except OSError as exc:  # the close (flush) may report the full disk too, never anything else
            assert exc.errno == errno.ENOSPC, exc
    return written


def fill_outside(path: Path) -> Path:
    """Fill the disk to the last byte from outside the mount."""
    with open(path, "wb", buffering=0) as f:
        with pytest.raises(OSError) as info:
            while True:
                f.write(bytes(64 * 1024))
        assert info.value.errno == errno.ENOSPC
        with suppress(OSError):
            while True:
                f.write(bytes(4096))
    assert os.statvfs(path.parent).f_bavail == 0
    return path


def vault_content(m: Mount, name: str, out: Path) -> bytes:
    token = next(t["token"] for t in m.tokens() if t["context"] == "/" and t["fileName"] == name)
    m.token("get", token, str(out))
    return out.read_bytes()


@pytest.mark.slow
def test_full_disk_writes_get_enospc_reads_of_cached_staged_and_uncached_files_work(engine, tmp_path):
    with small_filesystem(tmp_path / "small", "64m") as small:
        m = Mount(
            tmp_path / "user",
            engine.urls,
            mount_args=(
                "--state-dir",
                str(small / "state"),
                "--cache-dir",
                str(small / "cache"),
                "--write-back-delay",
                "3600",
            ),
        )
        try:
            m.mount()
            cached = os.urandom(3 * MiB + 5)
            (m.dir / "cached.bin").write_bytes(cached)
            m.wait_idle()  # uploaded: its sealed file moved into the cache
            staged = os.urandom(MiB + 7)
            (m.dir / "staged.bin").write_bytes(staged)  # stays staged (write-back in an hour)
            remote = os.urandom(6 * MiB + 3)  # another client's file: in the vault, not in the cache
            (tmp_path / "remote.bin").write_bytes(remote)
            m.token("put", str(tmp_path / "remote.bin"))
            m.refresh()
            assert (m.dir / "remote.bin").exists()

            fill(m.dir / "huge.bin")
            filler = fill_outside(small / "filler")  # another program takes the last bytes
            assert read_uncached(m.dir / "cached.bin") == cached
            assert read_uncached(m.dir / "staged.bin") == staged
            with pytest.raises(OSError) as info:
                (m.dir / "more.txt").write_bytes(os.urandom(2 * MiB))
            assert info.value.errno == errno.ENOSPC
            assert os.statvfs(m.dir).f_bavail * os.statvfs(m.dir).f_frsize < 2 * MiB  # statfs says so
            assert read_uncached(m.dir / "cached.bin") == cached  # still, after more failed writes
            assert m.status()["pending"]  # the daemon answers, and says the disk was full
            shown = privifs(m.env, "status", str(m.dir)).stdout  # (mount.log, on that disk, loses lines)
            assert "disk full:" in shown and "write" in shown and "MiB free on its disk" in shown, shown
            # not cached and no room to download it: read through memory (it gave ENOSPC before),
            # without emptying the cache first for a download that would not fit anyway (the
            # writes that filled the disk had the cache drop its copies first: they are in the
            # vault, and cached.bin read above through memory)
            cached_before = m.status()["cache"]["size"]
            assert read_uncached(m.dir / "remote.bin") == remote
            assert m.status()["cache"]["size"] >= cached_before

            filler.unlink()
            os.unlink(m.dir / "huge.bin")
            (m.dir / "more.txt").unlink(missing_ok=True)  # its creation may have failed already
            after = os.urandom(2 * MiB)
            (m.dir / "after.bin").write_bytes(after)
            assert "disk full:" not in privifs(m.env, "status", str(m.dir)).stdout  # a write succeeded since
            m.wait_idle()
            assert "unexpectedly" not in m.log()
            for name, data in (("cached.bin", cached), ("staged.bin", staged), ("after.bin", after)):
                got = vault_content(m, name, tmp_path / name)
                assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest(), name
        finally:
            m.cleanup()


def put_in_the_vault(m: Mount, tmp_path: Path, count: int, size: int) -> dict[str, bytes]:
    """``count`` files of ``size`` random bytes stored in the vault as another client would
    (``token put``), the mount refreshed to show them; their contents by name."""
    contents = {}
    for i in range(count):
        src = tmp_path / f"remote{i}.bin"
        contents[src.name] = os.urandom(size)
        src.write_bytes(contents[src.name])
        m.token("put", str(src), "--name", src.name)
    m.refresh()
    return contents


def state_and_cache_on(small: Path, tmp_path: Path, engine) -> Mount:
    """A mount (not mounted yet) whose state and cache live on ``small``, the cache limit above it."""
    return Mount(
        tmp_path / "user",
        engine.urls,
        mount_args=("--state-dir", str(small / "state"), "--cache-dir", str(small / "cache"), "--cache-size", "1G"),
    )


@pytest.mark.slow
def test_the_cache_evicts_before_the_disk_fills_and_keeps_room_for_staging(engine, tmp_path):
    with small_filesystem(tmp_path / "small", "64m") as small:
        m = state_and_cache_on(small, tmp_path, engine)
        try:
            m.mount()
            contents = put_in_the_vault(m, tmp_path, 8, 10 * MiB)  # more than the whole disk
            for name, data in contents.items():
                assert read_uncached(m.dir / name) == data, name
                st = os.statvfs(small)
                assert st.f_bavail * st.f_frsize >= 6 * MiB, f"the cache ate the staging reserve at {name}"
            assert m.status()["cache"]["size"] < 64 * MiB
            written = os.urandom(6 * MiB)
            (m.dir / "local.bin").write_bytes(written)  # the reserve (and evicting) makes room for this
            assert read_uncached(m.dir / "local.bin") == written
            mounted, disk = os.statvfs(m.dir), os.statvfs(small)
            # statfs: the disk's free space less the floor kept for the index (2 % of 64 MiB here)
            assert 0 <= disk.f_bavail * disk.f_frsize - mounted.f_bavail * mounted.f_frsize <= 2 * MiB
            m.wait_idle()
            assert vault_content(m, "local.bin", tmp_path / "local.out") == written
        finally:
            m.cleanup()


@pytest.mark.slow
def test_a_write_on_a_disk_another_program_filled_gets_the_room_the_cache_holds(engine, tmp_path):
    """Another program took the disk's free space: closed files got ENOSPC while the read cache
    kept its copies there until the next upload or download trimmed it (helper hAA: 8 of 10
    files of 1 MiB, beside 118 MiB of cache). A write that finds no room has the cache drop
    least recently used copies first (they are in the vault), and what it dropped reads again."""
    with small_filesystem(tmp_path / "small", "64m") as small:
        m = state_and_cache_on(small, tmp_path, engine)
        try:
            m.mount()
            contents = put_in_the_vault(m, tmp_path, 3, 8 * MiB)
            for name, data in contents.items():
                assert read_uncached(m.dir / name) == data, name  # cached now
            assert m.status()["cache"]["size"] >= 20 * MiB
            fill_outside(small / "other-program.bin")
            written = os.urandom(2 * MiB)
            (m.dir / "local.bin").write_bytes(written)
            assert read_uncached(m.dir / "local.bin") == written
            (small / "other-program.bin").unlink()
            for name, data in contents.items():
                assert read_uncached(m.dir / name) == data, name
            m.wait_idle()
            assert vault_content(m, "local.bin", tmp_path / "local.out") == written
        finally:
            m.cleanup()


# -- the cache in-process (no mount) --------------------------------------------------------------


def test_a_cache_hit_writes_nothing_to_the_cache_database(tmp_path):
    cache = ContentCache(tmp_path / "cache", 1 << 30, KEY)
    try:
        assert cache.adopt("tok", sealed_file(tmp_path / "a", b"content"))
        db = cache.cache.directory
        files = {p: p.stat().st_mtime_ns for p in Path(db).glob("cache.db*")}
        changes = cache.cache._con.total_changes
        for _ in range(20):
            f = cache.open("tok")
            assert f.read(0, 100) == b"content"
            f.close()
        assert cache.cache._con.total_changes == changes
        assert {p: p.stat().st_mtime_ns for p in Path(db).glob("cache.db*")} == files
    finally:
        cache.close()


def test_the_cache_evicts_least_recently_used_and_keeps_that_order_across_restarts(tmp_path):
    size = footprint(os.stat(sealed_file(tmp_path / "probe", bytes(1000))))
    cache = ContentCache(tmp_path / "cache", 1 << 30, KEY)
    cache.size_limit = cache.overhead() + 3 * size  # room for three entries besides the table
    for name in ("a", "b", "c"):
        assert cache.adopt(name, sealed_file(tmp_path / name, bytes(1000)))
    cache.open("a").close()  # a is now the most recently used
    cache.close()
    cache = ContentCache(tmp_path / "cache", 1 << 30, KEY)
    cache.size_limit = cache.overhead() + 3 * size
    try:
        assert cache.adopt("d", sealed_file(tmp_path / "d", bytes(1000)))  # over the limit: b goes
        assert cache.open("b") is None
        for name in ("a", "c", "d"):
            cache.open(name).close()
        assert cache.volume() == 3 * size
    finally:
        cache.close()


def test_an_evicted_file_is_gone_even_when_its_row_stays(tmp_path):
    cache = ContentCache(tmp_path / "cache", 1 << 30, KEY)
    assert cache.adopt("tok", sealed_file(tmp_path / "a", b"x" * 5000))
    f = cache.cache.get("tok", read=True)
    path = f.name
    f.close()
    os.unlink(path)  # what an eviction on a full disk leaves: the row without its file
    assert cache.open("tok") is None
    cache.close()
    cache = ContentCache(tmp_path / "cache", 1 << 30, KEY)
    try:
        assert cache.volume() == 0
        assert cache.adopt("tok", sealed_file(tmp_path / "b", b"again"))
        assert cache.open("tok").read(0, 10) == b"again"
    finally:
        cache.close()


def test_local_state_that_cannot_open_on_a_full_disk_says_the_disk_is_full(tmp_path):
    with small_filesystem(tmp_path / "small", "8m") as small:
        ContentCache(small / "cache", 1 << 30, KEY).close()
        Index(small / "index.sqlite3").close()
        (small / "engine").mkdir()
        Database(small / "engine" / "engine.sqlite3").close()  # the embedded engine's, as it makes it
        fill_outside(small / "filler")  # SQLite cannot make its WAL files again
        for what, open_it in (
            ("read cache", lambda: ContentCache(small / "cache", 1 << 30, KEY)),
            ("local index", lambda: Index(small / "index.sqlite3")),
            ("embedded engine's database", lambda: embedded_usernames(small / "engine")),  # before a mount starts it
        ):
            with pytest.raises(DiskFullError) as info:
                open_it()
            assert f"the {what} in" in str(info.value) and "the disk is full" in str(info.value)


@pytest.mark.slow
def test_an_entry_whose_creation_failed_on_a_full_disk_is_not_left_behind(engine, tmp_path):
    """A create, mkdir or symlink that got ENOSPC because the index could not commit made
    nothing: the entry stayed in the tree before (visible, pending for good, gone after a
    remount)."""
    with small_filesystem(tmp_path / "small", "40m") as small:  # (room for the reserve once freed)
        m = Mount(
            tmp_path / "user",
            engine.urls,
            mount_args=("--state-dir", str(small / "state"), "--cache-dir", str(small / "cache")),
        )
        try:
            m.mount()
            (m.dir / "kept.txt").write_bytes(b"kept")
            m.wait_idle()
            filler = fill_outside(small / "filler")
            made, failed = [], []
            for i in range(400):  # the index's WAL may still have room for a few commits
                for name, make in (
                    (f"d{i}", lambda p: p.mkdir()),
                    (f"f{i}", lambda p: p.write_bytes(b"")),
                    (f"l{i}", lambda p: p.symlink_to("kept.txt")),
                ):
                    try:
                        make(m.dir / name)
                    except OSError as exc:
                        assert exc.errno == errno.ENOSPC, exc
                        failed.append(name)
                    else:
                        made.append(name)
                if len({n[0] for n in failed}) == 3:
                    break
            assert {n[0] for n in failed} == {"d", "f", "l"}, failed
            shown = set(os.listdir(m.dir))
            assert not shown & set(failed), sorted(shown & set(failed))
            for name in failed:
                assert not os.path.lexists(m.dir / name), name

            filler.unlink()
            reserve = small / "state" / "index.sqlite3.reserve"
            for _ in range(100):  # the index made its reserve again once the disk had room
                if reserve.exists():
                    break
                time.sleep(0.2)
            assert reserve.exists(), sorted(os.listdir(small / "state"))
            (m.dir / "after.txt").write_bytes(b"after")
            m.wait_idle()
            assert not m.status()["pending"]
            before = sorted(os.listdir(m.dir))
            m.umount()
            m.mount()
            assert sorted(os.listdir(m.dir)) == before
            assert (m.dir / "after.txt").read_bytes() == b"after"
        finally:
            m.cleanup()


@pytest.mark.parametrize("reserve", [True, False])
def test_the_index_commits_what_frees_space_when_something_else_filled_the_disk(tmp_path, monkeypatch, reserve):
    """Another writer on the disk (the embedded engine, another program) took the floor staging
    keeps, down to the last byte: the index's reserve lets the commits that free space through
    (without it, the test's second case, they fail with ENOSPC and nothing can be removed)."""
    from privifs.disk import DiskReserve
    from privifs.fs.namespace import Namespace

    if not reserve:
        monkeypatch.setattr(DiskReserve, "ensure", lambda self: None)
    with small_filesystem(tmp_path / "small", "32m") as small:
        index = Index(small / "index.sqlite3")
        try:
            ns = Namespace(index, dir_mode=0o755, file_mode=0o644)
            assert (small / "index.sqlite3.reserve").exists() == reserve
            fill_outside(small / "filler")
            saved = []
            for i in range(200):  # the rows of an unlink, an upload's end, … (a few pages of WAL)
                node = ns.new_node(ns.root, f"f{i}", "file", 0o644)
                try:
                    if i % 2:
                        index.save(node)  # a commit of its own
                    else:
                        with index:  # a transaction of several statements, committed at its end
                            index.save(node)
                            index.save(ns.new_node(ns.root, f"g{i}", "file", 0o644))
                except DiskFullError:
                    break
                saved.append(i)
            if reserve:
                assert len(saved) == 200 and not (small / "index.sqlite3.reserve").exists()
            else:
                assert len(saved) < 200
        finally:
            index.close()
        if reserve:  # all of it committed
            rows = Index(small / "index.sqlite3")
            try:
                assert len(rows.load()) >= 300
            finally:
                rows.close()


def test_the_index_opens_on_a_disk_something_else_filled_by_giving_back_its_reserve(tmp_path):
    with small_filesystem(tmp_path / "small", "32m") as small:
        Index(small / "index.sqlite3").close()  # (a clean close removes the WAL files)
        assert (small / "index.sqlite3.reserve").exists()
        fill_outside(small / "filler")
        index = Index(small / "index.sqlite3")  # SQLite makes its WAL files in the reserve's room
        index.close()
        assert not (small / "index.sqlite3.reserve").exists()


@pytest.mark.slow
def test_another_apps_tokens_claiming_no_size_evict_keep_the_staging_reserve_and_read_through_memory(engine, tmp_path):
    """Another application's tokens whose meta claims 0 bytes: a download of no stated size
    reserved no room, so the cache evicted nothing for it and filled the staging reserve, and
    once the disk could not hold one, the open learned nothing and the file read as empty, with
    no error. Each now makes room as it arrives, and one the disk cannot hold is read through
    memory, as a file of known size is."""
    import trio

    from privifs.client.connect import connect
    from privifs.client.session import PasswordCredentials
    from privifs.client.transport import Endpoints
    from privifs.crypto.keys import load_aes_key
    from tests.fskit import Remote

    with small_filesystem(tmp_path / "small", "64m") as small:
        m = state_and_cache_on(small, tmp_path, engine)
        try:
            m.mount()
            contents = {f"remote{i}.bin": os.urandom(10 * MiB) for i in range(8)}
            contents["last.bin"] = os.urandom(6 * MiB + 3)

            async def store() -> None:
                credentials = PasswordCredentials(m.username, "correct-horse-battery")
                async with connect(Endpoints.from_dict(engine.urls), credentials) as client:
                    remote = Remote(client, load_aes_key(m.key_file))
                    for name, data in contents.items():
                        await remote.put_stating(name, data, 0)

            trio.run(store)
            m.refresh()
            last = contents.pop("last.bin")
            for name, data in contents.items():
                assert read_uncached(m.dir / name) == data, name
                st = os.statvfs(small)
                assert st.f_bavail * st.f_frsize >= 6 * MiB, f"the cache ate the staging reserve at {name}"
            fill(m.dir / "huge.bin")
            fill_outside(small / "filler")  # another program takes the last bytes
            assert read_uncached(m.dir / "last.bin") == last  # through memory
            assert os.stat(m.dir / "last.bin").st_size == len(last)
            assert m.status()["pending"] is not None  # the daemon answers
        finally:
            m.cleanup()


def test_another_apps_token_the_cache_disk_fills_under_is_read_through_memory(engine, tmp_path):
    """A download of no stated size (another application's token claiming 0 bytes) into a cache
    whose disk has 3 MiB above its floor and nothing to evict: the 6 MiB content filled the disk
    and the open failed with ENOSPC (read as empty before that failed the open). It is now read
    through memory, as content of a known size is."""
    import trio

    from privifs.client.connect import connect
    from privifs.client.session import PasswordCredentials
    from privifs.client.transport import Endpoints
    from privifs.crypto.keys import load_aes_key
    from privifs.fs.space import floor_of
    from tests.fskit import Remote

    with small_filesystem(tmp_path / "small", "64m") as small:
        m = Mount(tmp_path / "user", engine.urls, mount_args=("--cache-dir", str(small / "cache")))
        try:
            m.mount()
            data = os.urandom(6 * MiB + 5)

            async def store() -> None:
                credentials = PasswordCredentials(m.username, "correct-horse-battery")
                async with connect(Endpoints.from_dict(engine.urls), credentials) as client:
                    await Remote(client, load_aes_key(m.key_file)).put_stating("claims.bin", data, 0)

            trio.run(store)
            m.refresh()
            st = os.statvfs(small)
            free = st.f_bavail * st.f_frsize
            with open(small / "filler", "wb") as f:
                f.write(bytes(free - floor_of(st.f_blocks * st.f_frsize) - 3 * MiB))
            assert read_uncached(m.dir / "claims.bin") == data
            assert os.stat(m.dir / "claims.bin").st_size == len(data)
        finally:
            m.cleanup()


@pytest.mark.slow
def test_a_vault_whose_embedded_engine_shares_a_disk_something_else_filled_mounts_again(tmp_path):
    """Everything of an embedded engine's vault on one disk (a home directory) that another
    program then filled: `privifs mount` refused ("the embedded engine's database ... cannot be
    opened: the disk is full"), so nothing of the vault could be read until space was freed.
    The engine's database gives back its reserve to open, as the index does: the mount comes up,
    its files read back, and once there is room again a new file is uploaded."""
    with small_filesystem(tmp_path / "small", "48m") as small:
        m = Mount(small / "user", None)
        data_dir = small / "user" / "data" / "privifs" / "engine"
        try:
            m.mount()
            before = os.urandom(MiB + 3)
            (m.dir / "before.bin").write_bytes(before)
            m.wait_idle()
            m.umount()
            filler = fill_outside(small / "filler")
            r = m.mount(check=False)
            assert r.returncode == 0, r.stderr
            assert not (data_dir / "disk.reserve").exists()  # given back to open the database
            assert read_uncached(m.dir / "before.bin") == before
            filler.unlink()
            after = os.urandom(MiB + 5)
            (m.dir / "after.bin").write_bytes(after)
            m.wait_idle()
            assert vault_content(m, "after.bin", tmp_path / "after.bin") == after
            assert vault_content(m, "before.bin", tmp_path / "before.bin") == before
        finally:
            m.cleanup()


@pytest.mark.slow
def test_a_cache_on_a_disk_something_else_filled_drops_entries_to_open_and_the_vault_mounts(engine, tmp_path):
    """A read cache on a disk of its own (``--cache-dir``) that another program filled: the
    mount was refused ("the read cache ... cannot be opened: the disk is full"), although the
    cache holds nothing the vault lacks. It now drops its oldest entries to make the room its
    table needs, and the mount reads every file."""
    with small_filesystem(tmp_path / "small", "24m") as small:
        m = Mount(tmp_path / "user", engine.urls, mount_args=("--cache-dir", str(small / "cache")))
        try:
            m.mount()
            files = {f"f{i}.bin": os.urandom(3 * MiB + i) for i in range(4)}
            for name, data in files.items():
                (m.dir / name).write_bytes(data)
            m.wait_idle()
            for name, data in files.items():
                assert read_uncached(m.dir / name) == data  # (downloaded into the cache if not there)
            m.umount()
            fill_outside(small / "filler")
            r = m.mount(check=False)
            assert r.returncode == 0, r.stderr
            for name, data in files.items():
                assert read_uncached(m.dir / name) == data
            assert "dropped" in m.log()
        finally:
            m.cleanup()


@pytest.mark.slow
def test_the_cache_gives_room_to_an_embedded_engine_that_shares_its_disk(tmp_path):
    """A home directory on one small disk: the cache, staging and the embedded engine's blobs
    share it. A big file uploaded and cached, then a second one written: the engine had no room
    for it (507), while the cache held a copy of the first file the engine already had. Every
    retry failed the same way for as long as the mount ran (fsync: EIO after its time-out). The
    cache now gives way to the engine, and the second file reaches the vault."""
    with small_filesystem(tmp_path / "small", "128m") as small:
        m = Mount(small / "user", None)
        try:
            m.mount()
            first, second = os.urandom(36 * MiB), os.urandom(36 * MiB)
            (m.dir / "first.bin").write_bytes(first)
            m.wait_idle()
            assert m.status()["cache"]["size"] >= 30 * MiB  # its staged copy moved into the cache
            (m.dir / "second.bin").write_bytes(second)
            m.wait_idle(timeout=90)
            # the cache made room: for the engine's upload (507), or since staging leaves the
            # engine room (hAM F1) already for the write
            assert "507" in m.log() or "dropped" in m.log()
            assert vault_content(m, "second.bin", tmp_path / "second.out") == second
            assert read_uncached(m.dir / "first.bin") == first
        finally:
            m.cleanup()


@pytest.mark.slow
def test_files_written_until_the_disk_is_full_still_drain_to_the_embedded_engine_on_it(tmp_path):
    """A home directory on one small disk, filled through the mount alone: staging stopped at its
    own floor (1 MiB), below the 4 MiB the engine leaves free, and from then on the engine refused
    every upload (507) and nothing drained until files were deleted (helper hAM F1: 1,027
    changes pending for 10 minutes). Staging now stops where the engine still takes uploads."""
    with small_filesystem(tmp_path / "small", "64m") as small:
        m = Mount(small / "user", None)
        try:
            m.mount()
            (m.dir / "a").mkdir()
            written: dict[str, bytes] = {}
            for i in range(5000):
                data = os.urandom(40_000)
                try:
                    (m.dir / "a" / f"f{i:05d}").write_bytes(data)
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC, exc
                    break
                written[f"f{i:05d}"] = data
            else:
                pytest.fail("the disk never filled")
            m.wait_idle(timeout=120)
            assert set(written) <= {t["fileName"] for t in m.tokens() if t["context"] == "/a"}
            for name in list(written)[:: max(1, len(written) // 5)]:
                assert read_uncached(m.dir / "a" / name) == written[name], name
        finally:
            m.cleanup()


@pytest.mark.slow
def test_a_disk_filled_to_the_last_byte_under_the_embedded_engine_still_reads_and_deletes(tmp_path):
    """Everything on one disk (the embedded engine's default: a home directory) that another
    program filled to the last byte. Files not cached were EIO (helper hK): a download is a
    durable command in the engine's database, which answered 507 ("database or disk is full"),
    and so was a delete, which would give room back. The engine now gives back its 4 MiB reserve
    for its database when it is nearly full: reads and deletes go on."""
    with small_filesystem(tmp_path / "small", "64m") as small:
        engine = EngineProcess(small / "engine", log_path=tmp_path / "engine.log").start()
        m = state_and_cache_on(small, tmp_path, engine)
        try:
            m.mount()
            files = {"tiny.txt": b"tiny", "mid.bin": os.urandom(300_000), "parts.bin": os.urandom(9 * MiB + 1)}
            for name, data in files.items():
                (m.dir / name).write_bytes(data)
            (m.dir / "gone.bin").write_bytes(os.urandom(2 * MiB))
            m.wait_idle()
            m.umount()
            for entry in (small / "cache").iterdir():  # nothing cached: every read downloads
                subprocess.run(["rm", "-rf", str(entry)], check=True, timeout=30)
            m.mount()
            filler = fill_outside(small / "filler")
            for name, data in files.items():
                assert read_uncached(m.dir / name) == data, name
            os.unlink(m.dir / "gone.bin")
            m.wait_idle()
            assert "gone.bin" not in {t["fileName"] for t in m.tokens()}
            filler.unlink()
            (m.dir / "after.txt").write_bytes(b"room again")
            m.wait_idle()
            assert "unexpectedly" not in m.log()
            assert "Traceback" not in engine.log()
        finally:
            m.cleanup()
            engine.stop()
            engine.kill()


@pytest.mark.parametrize("size", [3_000, 600_000, 9 * MiB + 1], ids=["inline", "streamed", "parts"])
@pytest.mark.slow
def test_fsync_on_a_full_vault_says_enospc_at_once_and_the_file_lands_once_there_is_room(tmp_path, size):
    """The embedded engine's disk full (another program filled it; the mount's cache, on another
    disk, has nothing to give): fsync waited its whole --fsync-timeout (300 s by default) through
    the engine's 507 answers, then said EIO. A full vault is what ENOSPC means: fsync says so at
    once, the file stays staged and reaches the vault once the disk has room again."""
    with small_filesystem(tmp_path / "small", "64m") as small:
        engine = EngineProcess(small / "engine", log_path=tmp_path / "engine.log").start()
        m = Mount(tmp_path / "user", engine.urls, mount_args=("--fsync-timeout", "45"))
        try:
            m.mount()
            (m.dir / "before.txt").write_text("room then")
            m.wait_idle()
            filler = fill_outside(small / "filler")
            data = os.urandom(size)
            fd = os.open(m.dir / "full.bin", os.O_WRONLY | os.O_CREAT, 0o644)
            try:
                os.write(fd, data)
                started = time.monotonic()
                with pytest.raises(OSError) as info:
                    os.fsync(fd)
                waited = time.monotonic() - started
            finally:
                os.close(fd)
            assert info.value.errno == errno.ENOSPC, info.value
            assert waited < 30, f"fsync waited {waited:.0f} s for a vault with no room"
            assert (m.dir / "full.bin").read_bytes() == data  # staged: nothing lost
            assert "no room" in privifs(m.env, "status", str(m.dir)).stdout
            filler.unlink()
            m.wait_idle(timeout=120)
            assert vault_content(m, "full.bin", tmp_path / "full.out") == data
            assert "Traceback" not in m.log() and "Traceback" not in engine.log()
        finally:
            m.cleanup()
            engine.stop()
            engine.kill()


@pytest.mark.slow
def test_umount_ends_saying_why_when_the_index_cannot_record_the_uploads(engine, tmp_path):
    """The index's disk full beyond its reserve while files wait to be uploaded: each upload the
    vault took is owed to the index, and 'privifs umount' (no --timeout) waited for good
    (helper hX saw it with a damaged index). It ends after twice --server-timeout, saying the
    local index is why; the files stay staged and are in the vault once there is room."""
    with small_filesystem(tmp_path / "small", "40m") as small:
        m = Mount(
            tmp_path / "user",
            engine.urls,
            mount_args=(
                *("--state-dir", str(small / "state"), "--cache-dir", str(small / "cache")),
                *("--write-back-delay", "3600", "--server-timeout", "5"),
            ),
        )
        try:
            m.mount()
            for i in range(3):
                (m.dir / f"f{i}").write_bytes(os.urandom(20_000))
            fillers = [fill_outside(small / "filler")]
            for i in range(400):  # until the index has given back its reserve and owes a commit
                try:
                    (m.dir / f"x{i}").write_bytes(b"")
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC, exc
                    if not (small / "state" / "index.sqlite3.reserve").exists():
                        break
                    fillers.append(fill_outside(small / f"filler{i}"))
            assert not (small / "state" / "index.sqlite3.reserve").exists()
            r = m.umount(check=False)
            # (the index owes commits, or the uploads' own saves fail: either way it says why)
            assert r.returncode == 7 and "the local index" in r.stderr and "server" not in r.stderr, r.stderr
            for filler in fillers:
                filler.unlink()
            m.mount()
            m.wait_idle()
            assert {f"f{i}" for i in range(3)} <= {t["fileName"] for t in m.tokens() if t["context"] == "/"}
        finally:
            m.cleanup()


async def test_an_upload_the_vault_had_no_room_for_is_tried_again_within_30_s_however_long_it_failed(kit):
    """The embedded engine's disk full for a few minutes: each 507 doubled the upload's backoff up
    to five minutes, so once the disk had room again (a file deleted, a filler removed) the file
    stayed staged for up to five more minutes (helper hAX F1: 90 s after the disk was freed,
    after four minutes full). A full vault is asked again at least every 30 s."""
    resume = kit.hold_write_back()
    try:
        await kit.write_file("/full.bin", b"x" * 1000)
        node = kit.node("/full.bin")
        for _ in range(10):  # ten refusals in a row: the plain backoff would be 300 s by now
            kit.syncer._failed(node, VaultFull("upstream upload: the vault has no room (HTTP 507)"))
        assert node.attempts == 10
        assert node.retry_at - trio.current_time() <= VAULT_FULL_RETRY
    finally:
        resume()

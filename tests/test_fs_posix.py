"""The mounted filesystem against POSIX: every supported operation and the errno POSIX gives
when it cannot be done. One real mount (on the session engine) serves the whole module; each
test works in its own directory."""

from __future__ import annotations

import ctypes
import errno
import json
import os
import signal
import sqlite3
import stat
import subprocess
import time

import pytest

from tests.mountkit import Mount

libc = ctypes.CDLL("libc.so.6", use_errno=True)
AT_FDCWD = -100
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2


def renameat2(old: str, new: str, flags: int) -> None:
    if libc.renameat2(AT_FDCWD, old.encode(), AT_FDCWD, new.encode(), flags) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


@pytest.fixture(scope="module")
def mnt(engine, tmp_path_factory):
    # --allow-other: some tests act as an unprivileged user (uid 65534), as pjdfstest does
    with Mount(tmp_path_factory.mktemp("posix"), engine.urls).mounted("--allow-other") as m:
        yield m


@pytest.fixture
def d(mnt, request):
    path = mnt.dir / request.node.name[:60].replace("[", "_").replace("]", "")
    path.mkdir()
    return path


NOBODY = 65534


def as_user(where, fn, uid: int = NOBODY, gid: int = NOBODY):
    """Run ``fn()`` in a forked child that works in directory ``where`` with the given ids (the
    directories above the mount are private to root, so the child uses relative paths); return
    what it returned, or raise the OSError it raised."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.close(r)
            os.chdir(where)
            os.setgroups([])
            os.setresgid(gid, gid, gid)
            os.setresuid(uid, uid, uid)
            try:
                out = {"ok": fn()}
            except OSError as exc:
                out = {"errno": exc.errno}
            os.write(w, json.dumps(out).encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    os.waitpid(pid, 0)
    out = json.loads(data)
    if "errno" in out:
        raise OSError(out["errno"], os.strerror(out["errno"]))
    return out["ok"]


def errno_of(fn, *args) -> int:
    with pytest.raises(OSError) as info:
        fn(*args)
    return info.value.errno


def test_create_write_read_stat(d):
    p = d / "a.txt"
    p.write_bytes(b"hello world")
    assert p.read_bytes() == b"hello world"
    st = p.stat()
    assert st.st_size == 11 and stat.S_ISREG(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o644
    assert st.st_nlink == 1
    assert abs(st.st_mtime - time.time()) < 30


def test_the_preferred_io_size_is_a_mib_so_programs_write_in_big_requests(d):
    """cat, cp's read/write loop and Python's buffered files size their reads and writes by
    st_blksize, and each write(2) is one FUSE request: measured, ``cat`` of 512 MiB into the
    mount took 0.56-0.63 s of the daemon's CPU (1.8-2.5 s) with 128 KiB and 0.40-0.46 s
    (1.0-1.4 s) with 1 MiB."""
    p = d / "big.bin"
    with open(p, "wb") as f:
        assert os.fstat(f.fileno()).st_blksize == 1024 * 1024
        f.write(b"x")
    assert p.stat().st_blksize == 1024 * 1024


def test_open_flags_excl_trunc_append(d):
    p = d / "f"
    fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, b"abc")
    os.close(fd)
    assert errno_of(os.open, p, os.O_WRONLY | os.O_CREAT | os.O_EXCL) == errno.EEXIST
    fd = os.open(p, os.O_WRONLY | os.O_APPEND)
    os.write(fd, b"def")
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, b"ghi")  # O_APPEND writes go to the end whatever the offset
    os.close(fd)
    assert p.read_bytes() == b"abcdefghi"
    fd = os.open(p, os.O_WRONLY | os.O_TRUNC)
    os.close(fd)
    assert p.read_bytes() == b"" and p.stat().st_size == 0
    assert stat.S_IMODE(p.stat().st_mode) == 0o600
    assert errno_of(os.open, d / "missing", os.O_RDONLY) == errno.ENOENT


def test_random_and_sparse_writes(d):
    p = d / "sparse.bin"
    with open(p, "wb") as f:
        f.seek(3 * 1024 * 1024 + 5)
        f.write(b"end")
        f.seek(100)
        f.write(b"middle")
    data = p.read_bytes()
    assert len(data) == 3 * 1024 * 1024 + 8
    assert data[100:106] == b"middle" and data[-3:] == b"end"
    assert data[:100] == bytes(100) and data[106:-3] == bytes(len(data) - 109)
    with open(p, "r+b") as f:
        f.seek(65530)  # across a chunk boundary
        f.write(b"0123456789abcdef")
        f.seek(65530)
        assert f.read(16) == b"0123456789abcdef"


def test_rewrite_part_of_an_uploaded_file(mnt, d):
    p = d / "doc.txt"
    p.write_bytes(b"A" * 200_000)
    mnt.wait_idle()
    with open(p, "r+b") as f:
        f.seek(100_000)
        f.write(b"BBBB")
    data = p.read_bytes()
    assert data[:100_000] == b"A" * 100_000 and data[100_000:100_004] == b"BBBB" and len(data) == 200_000


def test_truncate_shrink_and_extend(d):
    p = d / "t"
    p.write_bytes(b"x" * 100_000)
    os.truncate(p, 70_000)
    assert p.read_bytes() == b"x" * 70_000
    os.truncate(p, 80_000)
    assert p.read_bytes() == b"x" * 70_000 + bytes(10_000)
    with open(p, "r+b") as f:
        f.truncate(5)
    assert p.read_bytes() == b"xxxxx"
    assert errno_of(os.truncate, d, 0) == errno.EISDIR


def test_chmod_utime_chown(d):
    p = d / "m"
    p.write_bytes(b"1")
    os.chmod(p, 0o751)
    assert stat.S_IMODE(p.stat().st_mode) == 0o751
    os.utime(p, ns=(1_500_000_000_123_456_789, 1_600_000_000_987_654_321))
    assert p.stat().st_mtime_ns == 1_600_000_000_987_654_321
    os.chown(p, 1234, 4321)
    st = p.stat()
    assert (st.st_uid, st.st_gid) == (1234, 4321)
    os.chmod(d, 0o700)
    assert stat.S_IMODE(d.stat().st_mode) == 0o700


def test_symlinks(d):
    (d / "target").write_bytes(b"pointed at")
    os.symlink("target", d / "link")
    os.symlink("/nowhere/at/all", d / "dangling")
    assert os.readlink(d / "link") == "target"
    assert (d / "link").read_bytes() == b"pointed at"
    assert stat.S_ISLNK(os.lstat(d / "link").st_mode)
    assert os.lstat(d / "dangling").st_size == len("/nowhere/at/all")
    assert errno_of(os.symlink, b"caf\xe9", os.fsencode(d / "latin1")) == errno.EINVAL  # not UTF-8, like names
    assert not os.path.lexists(d / "latin1")
    assert errno_of(os.readlink, d / "target") == errno.EINVAL
    assert errno_of(os.symlink, "x", d / "link") == errno.EEXIST


def test_mkdir_rmdir_unlink_errnos(d):
    (d / "sub").mkdir()
    (d / "sub" / "f").write_bytes(b"")
    assert errno_of(os.mkdir, d / "sub") == errno.EEXIST
    assert errno_of(os.rmdir, d / "sub") == errno.ENOTEMPTY
    assert errno_of(os.rmdir, d / "sub" / "f") == errno.ENOTDIR
    assert errno_of(os.unlink, d / "sub") == errno.EISDIR
    assert errno_of(os.unlink, d / "nope") == errno.ENOENT
    assert errno_of(os.rmdir, d / "nope") == errno.ENOENT
    assert errno_of(os.mkdir, d / "nope" / "deeper") == errno.ENOENT
    assert errno_of(os.open, d / "sub" / "f" / "x", os.O_CREAT | os.O_WRONLY) == errno.ENOTDIR
    os.unlink(d / "sub" / "f")
    os.rmdir(d / "sub")
    assert not (d / "sub").exists()


def test_rename_files_with_posix_overwrite(d):
    (d / "a").write_bytes(b"A")
    (d / "b").write_bytes(b"B")
    os.rename(d / "a", d / "b")
    assert (d / "b").read_bytes() == b"A" and not (d / "a").exists()
    (d / "c").write_bytes(b"C")
    assert errno_of(renameat2, str(d / "c"), str(d / "b"), RENAME_NOREPLACE) == errno.EEXIST
    renameat2(str(d / "c"), str(d / "new"), RENAME_NOREPLACE)
    assert (d / "new").read_bytes() == b"C"
    os.rename(d / "new", d / "new")  # same entry: nothing happens
    assert (d / "new").read_bytes() == b"C"


def test_rename_exchange_swaps_two_entries_through_the_kernel(d):
    """renameat2(RENAME_EXCHANGE) was EINVAL. The kernel swaps its dentries: open descriptors
    and later lookups see each entry under the other's name."""
    (d / "x").write_bytes(b"X")
    (d / "ydir").mkdir()
    (d / "ydir" / "inside").write_bytes(b"I")
    with open(d / "x", "rb") as held:
        renameat2(str(d / "x"), str(d / "ydir"), RENAME_EXCHANGE)
        assert (d / "ydir").read_bytes() == b"X" and held.read() == b"X"
    assert (d / "x" / "inside").read_bytes() == b"I" and (d / "x").is_dir()
    assert errno_of(renameat2, str(d / "x"), str(d / "missing"), RENAME_EXCHANGE) == errno.ENOENT
    assert errno_of(renameat2, str(d / "x"), str(d / "x" / "inside"), RENAME_EXCHANGE) == errno.EINVAL


def test_rename_directories(d):
    (d / "src" / "deep").mkdir(parents=True)
    (d / "src" / "deep" / "f").write_bytes(b"deep")
    (d / "empty").mkdir()
    (d / "full").mkdir()
    (d / "full" / "x").write_bytes(b"")
    (d / "file").write_bytes(b"")
    assert errno_of(os.rename, d / "src", d / "full") == errno.ENOTEMPTY
    assert errno_of(os.rename, d / "src", d / "file") == errno.ENOTDIR
    assert errno_of(os.rename, d / "file", d / "empty") == errno.EISDIR
    assert errno_of(os.rename, d / "src", d / "src" / "deep" / "inside") == errno.EINVAL
    os.rename(d / "src", d / "empty")  # over an empty directory
    assert (d / "empty" / "deep" / "f").read_bytes() == b"deep"
    os.rename(d / "empty", d / "moved")
    assert sorted(os.listdir(d)) == ["file", "full", "moved"]


def test_hard_links_are_refused_and_mknod_makes_regular_files(d):
    (d / "f").write_bytes(b"")
    assert errno_of(os.link, d / "f", d / "g") == errno.EPERM
    os.mknod(d / "regular", stat.S_IFREG | 0o640)
    assert stat.S_IMODE((d / "regular").stat().st_mode) == 0o640


def test_names_up_to_255_bytes_any_utf8(d):
    long = "é" * 127 + "x"  # 255 bytes
    (d / long).write_bytes(b"long")
    assert (d / long).read_bytes() == b"long"
    assert errno_of(open, d / ("é" * 128), "wb") == errno.ENAMETOOLONG
    for name in (
        "日本語のファイル.txt",
        "emoji 🎉.bin",
        "spaces and 'quotes' \"x\"",
        "semi;colon&amp",
        "-dash",
        ".hidden",
        "tab\there",
        "new\nline",
    ):
        (d / name).write_bytes(name.encode())
        assert (d / name).read_bytes() == name.encode()
    assert set(os.listdir(d)) >= {"日本語のファイル.txt", "emoji 🎉.bin", "new\nline"}
    with pytest.raises(OSError) as info:
        os.open(os.fsencode(d) + b"/bad\xff\xfename", os.O_CREAT | os.O_WRONLY)
    assert info.value.errno == errno.EINVAL


def test_unlinked_file_stays_readable_while_open(d):
    p = d / "f"
    p.write_bytes(b"still here")
    with open(p, "rb") as f:
        os.unlink(p)
        assert not p.exists()
        assert f.read() == b"still here"
    assert not p.exists()


@pytest.mark.parametrize("uploaded", [False, True], ids=["staged", "uploaded"])
def test_replaced_after_lookup_opens_old_content(mnt, d, uploaded):
    """An ``open`` resolves the path first (the kernel holds the inode) and asks the daemon to
    open it after: an atomic save (write a temporary file, rename it over the old one) that
    lands in between left a reader with the old inode and nothing in it (``st_size`` said 12
    bytes, ``read`` gave 0: seen as empty reads of a file saved over and over). An ``O_PATH``
    descriptor holds the inode across the rename, as the path walk does, deterministically."""
    p, tmp = d / "cfg", d / "cfg.tmp"
    p.write_bytes(b"old content\n")
    if uploaded:
        mnt.wait_idle()
    held = os.open(p, os.O_PATH)
    try:
        tmp.write_bytes(b"new content\n")
        os.replace(tmp, p)
        with open(f"/proc/self/fd/{held}", "rb") as f:
            assert f.read() == b"old content\n"
    finally:
        os.close(held)
    held = os.open(p, os.O_PATH)
    try:
        os.unlink(p)
        with open(f"/proc/self/fd/{held}", "rb") as f:
            assert f.read() == b"new content\n"
    finally:
        os.close(held)


def test_readdir_offsets_are_stable_while_the_directory_changes(d):
    for i in range(600):
        (d / f"e{i:04d}").write_bytes(b"")
    seen = []
    with os.scandir(d) as it:
        for n, entry in enumerate(it):
            seen.append(entry.name)
            if n == 100:
                for j in range(50):
                    (d / f"new{j}").write_bytes(b"")
                for j in range(0, 600, 7):
                    os.unlink(d / f"e{j:04d}")
    assert len(seen) == len(set(seen))
    survivors = {f"e{i:04d}" for i in range(600) if i % 7}
    assert survivors <= set(seen)
    for name in os.listdir(d):  # removed before they are written back: the unmount has nothing to wait for
        os.unlink(d / name)


def test_statfs(d):
    st = os.statvfs(d)
    assert st.f_namemax == 255 and st.f_bsize > 0 and st.f_bavail > 0


def test_fsync_returns_when_the_vault_has_the_data(mnt, d):
    p = d / "durable.txt"
    with open(p, "wb") as f:
        f.write(b"committed before fsync returns")
        f.flush()
        os.fsync(f.fileno())
        listed = {(t["context"], t["fileName"]): t for t in mnt.tokens()}
        assert (f"/{d.name}", "durable.txt") in listed
        assert listed[(f"/{d.name}", "durable.txt")]["size"] == 30


def test_reads_see_pending_writes(d):
    p = d / "pending.bin"
    data = os.urandom(300_000)
    p.write_bytes(data)
    assert p.read_bytes() == data
    with open(p, "r+b") as f:
        f.write(b"Z")
        f.flush()
        with open(p, "rb") as g:
            assert g.read(1) == b"Z"


def test_root_reserved_name_is_hidden_and_refused(mnt):
    assert ".privifs" not in os.listdir(mnt.dir)
    assert errno_of(os.mkdir, mnt.dir / ".privifs") == errno.EPERM


def test_new_entries_belong_to_the_user_who_made_them(d):
    os.chmod(d, 0o777)

    def make() -> None:
        os.close(os.open("f", os.O_CREAT | os.O_WRONLY, 0o644))
        os.mkdir("sub", 0o755)
        os.symlink("f", "link")
        os.truncate("f", 123)  # the owner may write its own file by path (pjdfstest truncate/05.t)

    as_user(d, make)
    for name in ("f", "sub", "link"):
        st = os.lstat(d / name)
        assert (st.st_uid, st.st_gid) == (NOBODY, NOBODY), name
    assert (d / "f").stat().st_size == 123
    own = d / "mine"
    own.write_bytes(b"")
    assert (own.stat().st_uid, own.stat().st_gid) == (os.getuid(), os.getgid())


def test_a_set_group_id_directory_passes_its_group_on(d):
    os.chown(d, 0, 4242)
    os.chmod(d, 0o2777)

    def make() -> None:
        os.mkdir("sub")
        os.close(os.open("f", os.O_CREAT | os.O_WRONLY, 0o644))

    as_user(d, make)
    sub, f = os.stat(d / "sub"), os.stat(d / "f")
    assert (sub.st_uid, sub.st_gid, f.st_uid, f.st_gid) == (NOBODY, 4242, NOBODY, 4242)
    assert sub.st_mode & stat.S_ISGID


def test_ftruncate_depends_on_the_descriptor_not_the_mode(d):
    os.chmod(d, 0o777)

    def work() -> list:
        fd = os.open("f", os.O_CREAT | os.O_RDWR, 0)  # mode 0: only the open descriptor may write
        try:
            os.ftruncate(fd, 123)
            size = os.fstat(fd).st_size
            os.write(fd, b"abc")
        finally:
            os.close(fd)
        return [size, os.stat("f").st_size]

    assert as_user(d, work) == [123, 123]
    assert stat.S_IMODE(os.stat(d / "f").st_mode) == 0
    fd = os.open(d / "f", os.O_RDONLY)
    try:
        assert errno_of(os.ftruncate, fd, 0) == errno.EINVAL
    finally:
        os.close(fd)
    assert as_user(d, lambda: os.unlink("f")) is None
    assert not (d / "f").exists()


UTIME_OMIT = (1 << 30) - 2


class Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


def utimensat(path, atime_ns: int | None, mtime_ns: int | None) -> None:
    """utimensat(2) with UTIME_OMIT for a time given as None (os.utime cannot omit one)."""

    def ts(ns):
        return Timespec(0, UTIME_OMIT) if ns is None else Timespec(ns // 10**9, ns % 10**9)

    times = (Timespec * 2)(ts(atime_ns), ts(mtime_ns))
    if libc.utimensat(AT_FDCWD, str(path).encode(), times, 0) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def test_utimensat_sets_atime_and_utime_omit_keeps_it(d):
    # that the times survive a restart and a fresh start is namespace logic: test_fs_api.py
    p = d / "times.txt"
    p.write_bytes(b"t")
    atime, mtime = 1_900_000_000_123_456_789, 1_950_000_000_987_654_321
    utimensat(p, atime, mtime)
    assert (p.stat().st_atime_ns, p.stat().st_mtime_ns) == (atime, mtime)
    utimensat(p, None, mtime + 1)  # UTIME_OMIT keeps the access time
    assert (p.stat().st_atime_ns, p.stat().st_mtime_ns) == (atime, mtime + 1)
    utimensat(p, atime - 5, None)
    assert (p.stat().st_atime_ns, p.stat().st_mtime_ns) == (atime - 5, mtime + 1)
    p.read_bytes()  # reads leave atime alone
    assert p.stat().st_atime_ns == atime - 5


def test_an_index_of_the_previous_layout_opens_and_gains_atime(tmp_path):
    from privifs.fs.namespace import LAYOUT_V1, Index, Namespace

    db = tmp_path / "index.sqlite3"
    old = sqlite3.connect(db)
    old.executescript(LAYOUT_V1)
    old.execute(
        "INSERT INTO nodes (ino, parent, name, kind, mode, mtime_ns, ctime_ns, size) "
        "VALUES (1, 1, '', 'dir', 493, 5, 5, 0), (2, 1, 'f', 'file', 420, 7, 7, 3)"
    )
    old.commit()
    old.close()
    index = Index(db)
    ns = Namespace(index, dir_mode=0o755, file_mode=0o644)
    f = ns.child(ns.root, "f")
    assert f.atime_ns is None and f.mtime_ns == 7
    f.atime_ns = 11
    index.save(f)
    index.close()
    assert Namespace(Index(db), dir_mode=0o755, file_mode=0o644).nodes[2].atime_ns == 11


def test_symlink_targets_are_not_limited_per_component(d):
    long_name = "x" * 256  # a target is not looked up: NAME_MAX does not apply (pjdfstest symlink/02.t)
    os.symlink(long_name, d / "one")
    deep = "/".join(["y" * 127] * 32)[:4095]
    os.symlink(deep, d / "deep")
    assert os.readlink(d / "one") == long_name and os.readlink(d / "deep") == deep
    assert errno_of(os.symlink, "z" * 4096, d / "too-long") == errno.ENAMETOOLONG


def test_fifos_sockets_and_device_nodes_can_be_made_and_used(d):
    import socket

    os.mkfifo(d / "pipe", 0o640)
    st = os.stat(d / "pipe")
    assert stat.S_ISFIFO(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o640
    r = os.open(d / "pipe", os.O_RDONLY | os.O_NONBLOCK)
    w = os.open(d / "pipe", os.O_WRONLY | os.O_NONBLOCK)
    os.write(w, b"through the kernel")
    assert os.read(r, 100) == b"through the kernel"
    os.close(w)
    os.close(r)
    assert errno_of(os.open, d / "pipe", os.O_WRONLY | os.O_NONBLOCK) == errno.ENXIO  # no reader
    server = socket.socket(socket.AF_UNIX)
    os.chdir(d)  # a socket path is limited to 108 bytes
    try:
        server.bind("sock")
        server.listen(1)
        assert stat.S_ISSOCK(os.stat("sock").st_mode)
        client = socket.socket(socket.AF_UNIX)
        client.connect("sock")
        conn, _ = server.accept()
        client.sendall(b"hi")
        assert conn.recv(2) == b"hi"
        conn.close()
        client.close()
    finally:
        server.close()
        os.chdir("/")
    os.mknod(d / "dev", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    st = os.stat(d / "dev")
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(1, 3)
    assert errno_of(os.open, d / "dev", os.O_RDONLY) == errno.EACCES  # the mount is nodev
    # that they are stored as tokens of their type is tested in-process (test_fs_api.py)
    for name in ("pipe", "sock", "dev"):
        os.unlink(d / name)


def test_a_directory_removed_or_renamed_over_while_open_has_no_links(d):
    """xfstests generic/035 (src/t_rename_overwrite): fstat of an open directory that a rename
    replaced said st_nlink 2 (a file replaced the same way says 0), so did one removed by rmdir."""
    (d / "dir1").mkdir()
    (d / "dir2").mkdir()
    fd = os.open(d / "dir2", os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.rename(d / "dir1", d / "dir2")
        assert os.fstat(fd).st_nlink == 0
    finally:
        os.close(fd)
    (d / "gone").mkdir()
    fd = os.open(d / "gone", os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.rmdir(d / "gone")
        assert os.fstat(fd).st_nlink == 0
    finally:
        os.close(fd)
    assert os.stat(d / "dir2").st_nlink == 2


def test_rename_whiteout_is_refused_not_ignored(d):
    """xfstests generic/078: renameat2(RENAME_WHITEOUT) was accepted and did a plain rename, leaving
    no whiteout (a 0:0 character device) at the old name, as if the flag were supported; an
    unsupported rename flag is EINVAL, and nothing moves."""
    (d / "a").write_text("a")
    (d / "b").write_text("b")
    for new in ("b", "c"):
        with pytest.raises(OSError) as info:
            renameat2(str(d / "a"), str(d / new), 4)  # RENAME_WHITEOUT
        assert info.value.errno == errno.EINVAL
    assert sorted(os.listdir(d)) == ["a", "b"] and (d / "b").read_text() == "b"


DIO_CYCLE_C = r"""
/* asynchronous O_DIRECT writes of a whole file, two patterns in turn; after each, a buffered
   read of the file must see what was just written: exit 1 (and say so) when it does not */
#define _GNU_SOURCE
#include <fcntl.h>
#include <linux/aio_abi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

int main(int argc, char **argv)
{
    const char *path = argv[1];
    long size = atol(argv[2]), cycles = atol(argv[3]);
    char *pat[2], *got = malloc(size);
    aio_context_t ctx = 0;
    if (posix_memalign((void **)&pat[0], 4096, size) || posix_memalign((void **)&pat[1], 4096, size))
        return 2;
    memset(pat[0], 0x55, size);
    memset(pat[1], 0xaa, size);
    if (syscall(SYS_io_setup, 1, &ctx))
        return 2;
    for (long i = 0; i < cycles; i++) {
        char *want = pat[i % 2];
        int fd = open(path, O_DIRECT | O_CREAT | O_RDWR, 0600);
        struct iocb cb = {0}, *cbs[1] = {&cb};
        struct io_event ev;
        if (fd < 0)
            return 2;
        cb.aio_lio_opcode = IOCB_CMD_PWRITE;
        cb.aio_fildes = fd;
        cb.aio_buf = (unsigned long)want;
        cb.aio_nbytes = size;
        if (syscall(SYS_io_submit, ctx, 1, cbs) != 1
            || syscall(SYS_io_getevents, ctx, 1, 1, &ev, NULL) != 1 || ev.res != size)
            return 2;
        close(fd);
        fd = open(path, O_RDONLY);
        if (fd < 0 || pread(fd, got, size, 0) != size)
            return 2;
        close(fd);
        if (memcmp(got, want, size)) {
            printf("stale data from a buffered read at cycle %ld\n", i);
            return 1;
        }
    }
    return 0;
}
"""


@pytest.mark.slow
def test_buffered_reads_never_keep_what_an_async_direct_write_replaced(d, tmp_path):
    """xfstests generic/451 (aio-dio-cycle-write): asynchronous O_DIRECT writes of a whole file,
    two patterns in turn, while other processes open it read-write and read it through the page
    cache; after each write a fresh buffered read must see what was just written. After an
    asynchronous direct write the kernel drops no cached page, and a read racing it had cached
    the old bytes for good (the mount keeps the page cache across opens): read(2) returned them
    ("get stale data from buffer read"), within 1,000-2,000 cycles here. The writer is C (raw
    AIO syscalls): written in Python, it did not hit the window in 1,000 cycles."""
    import shutil

    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler")
    (tmp_path / "dio_cycle.c").write_text(DIO_CYCLE_C)
    subprocess.run(
        [cc, "-O2", "-o", str(tmp_path / "dio_cycle"), str(tmp_path / "dio_cycle.c")], check=True, timeout=120
    )
    size = 640 * 1024
    path = d / "f"
    path.write_bytes(bytes(size))
    readers = []
    for _ in range(2):
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child reads until killed
            try:
                while True:
                    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)  # as xfs_io -f opens it
                    for off in range(0, size, 65536):
                        os.pread(fd, 65536, off)
                    os.close(fd)
            finally:
                os._exit(0)
        readers.append(pid)
    try:
        r = subprocess.run(
            [str(tmp_path / "dio_cycle"), str(path), str(size), "3000"], capture_output=True, text=True, timeout=600
        )
    finally:
        for pid in readers:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
    assert r.returncode == 0, r.stdout + r.stderr

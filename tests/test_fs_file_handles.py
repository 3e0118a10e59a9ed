"""File handles (``name_to_handle_at``/``open_by_handle_at``, what an NFS export of the mount and
backup tools use) on a real mount: a handle opens its file again after the kernel forgot the
inode (here: a remount, where it forgot everything), and a handle of a removed file is ``ESTALE``,
never another file that took its number."""

from __future__ import annotations

import ctypes
import errno
import os
import stat

import pytest

from tests.mountkit import Mount

libc = ctypes.CDLL("libc.so.6", use_errno=True)
AT_FDCWD = -100
HANDLE_MAX = 128


def name_to_handle(path) -> bytes:
    """The handle of ``path``: struct file_handle (handle_bytes, handle_type, f_handle) as bytes."""
    buf = ctypes.create_string_buffer(8 + HANDLE_MAX)
    ctypes.c_uint.from_buffer(buf).value = HANDLE_MAX
    mount_id = ctypes.c_int()
    if libc.name_to_handle_at(AT_FDCWD, os.fsencode(path), buf, ctypes.byref(mount_id), 0) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), str(path))
    return buf.raw[: 8 + ctypes.c_uint.from_buffer(buf).value]


def open_by_handle(mount_dir, handle: bytes, flags: int = os.O_RDONLY) -> int:
    mount_fd = os.open(mount_dir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fd = libc.open_by_handle_at(mount_fd, ctypes.create_string_buffer(handle, len(handle)), flags)
        if fd < 0:
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e))
        return fd
    finally:
        os.close(mount_fd)


def read_by_handle(mount_dir, handle: bytes) -> bytes:
    fd = open_by_handle(mount_dir, handle)
    try:
        return os.read(fd, 1 << 16)
    finally:
        os.close(fd)


@pytest.fixture
def m(engine, tmp_path):
    with Mount(tmp_path, engine.urls).mounted() as mount:
        yield mount


def test_a_file_handle_opens_its_file_after_a_remount_and_a_removed_files_is_stale(m):
    (m.dir / "dir").mkdir()
    (m.dir / "a.txt").write_bytes(b"file a")
    (m.dir / "dir" / "b.txt").write_bytes(b"file b in dir")
    (m.dir / "gone.txt").write_bytes(b"removed later")  # made last: the highest inode number
    handles = {name: name_to_handle(m.dir / name) for name in ("a.txt", "dir/b.txt", "dir", "gone.txt")}
    assert read_by_handle(m.dir, handles["a.txt"]) == b"file a"  # the kernel still knows it
    (m.dir / "gone.txt").unlink()
    m.umount()
    m.mount()  # a kernel that knows no inode of the mount: each handle is looked up by number
    assert read_by_handle(m.dir, handles["a.txt"]) == b"file a"
    assert read_by_handle(m.dir, handles["dir/b.txt"]) == b"file b in dir"
    fd = open_by_handle(m.dir, handles["dir"])
    try:
        assert stat.S_ISDIR(os.fstat(fd).st_mode) and sorted(os.listdir(fd)) == ["b.txt"]
    finally:
        os.close(fd)
    (m.dir / "new.txt").write_bytes(b"a new file")  # once took the removed file's number
    with pytest.raises(OSError) as exc:
        read_by_handle(m.dir, handles["gone.txt"])
    assert exc.value.errno == errno.ESTALE
    assert (m.dir / "new.txt").read_bytes() == b"a new file"

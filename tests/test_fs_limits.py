"""Limits of the daemon's process reached on the local disk: the program on the mount gets the
errno that says what happened (EMFILE, EFBIG), ``privifs status`` says it, the mount goes on, and
the limit of a file's size inherited from the shell that mounted no longer cuts files short
(helper hAO F5, F6). Real mounts against the session engine."""

from __future__ import annotations

import errno
import os
import resource

import pytest

from privifs.crypto.sealed import local_store_error
from privifs.fs.errnos import errno_for
from tests.mountkit import Mount, privifs


@pytest.mark.parametrize("code", [errno.EMFILE, errno.ENFILE, errno.EFBIG])
def test_a_limit_reached_on_the_local_disk_answers_with_its_own_errno_not_eio(code):
    exc = local_store_error(OSError(code, os.strerror(code)), "creating /staging/x")
    assert errno_for(exc) == code and ("ulimit" in str(exc) or "file-max" in str(exc))
    assert errno_for(OSError(code, os.strerror(code))) == code
    assert errno_for(OSError(errno.EBADF, "Bad file descriptor")) == errno.EIO


def test_a_file_size_limit_of_the_shell_that_mounted_does_not_cut_files_short(engine, tmp_path):
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    if hard != resource.RLIM_INFINITY and hard < 8 << 20:
        pytest.skip("this process's own hard limit of a file's size is too low")
    m = Mount(tmp_path, engine.urls)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, hard))  # `ulimit -S -f 1024` in the mounting shell
    try:
        m.mount()
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    try:
        data = os.urandom(3 << 20)
        (m.dir / "big.bin").write_bytes(data)  # failed with EIO at 1 MiB, and 1 MiB was uploaded
        assert (m.dir / "big.bin").read_bytes() == data
        m.wait_idle()
        assert privifs(m.env, "token", "ls").returncode == 0
    finally:
        m.umount()


def test_a_daemon_out_of_file_descriptors_answers_emfile_says_so_and_goes_on(engine, tmp_path):
    with Mount(tmp_path, engine.urls).mounted() as m:
        pid = m.pid
        before = resource.prlimit(pid, resource.RLIMIT_NOFILE)
        in_use = len(os.listdir(f"/proc/{pid}/fd"))
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (in_use + 20, before[1]))
        held = []
        try:
            with pytest.raises(OSError) as info:
                for i in range(200):
                    held.append(os.open(m.dir / f"f{i}", os.O_CREAT | os.O_WRONLY, 0o644))
                    os.write(held[-1], b"x")
            assert info.value.errno == errno.EMFILE, info.value  # was EIO
            out = privifs(m.env, "status", str(m.dir), check=False).stdout
            assert "files open, its limit" in out or "Too many open files" in out, out
        finally:
            for fd in held:
                os.close(fd)
            resource.prlimit(pid, resource.RLIMIT_NOFILE, before)
        (m.dir / "after.txt").write_text("the mount goes on")
        m.wait_idle()
        out = privifs(m.env, "status", str(m.dir)).stdout
        assert "local error:  create: " in out and "Too many open files" in out and "ulimit -n" in out, out
        assert (m.dir / "after.txt").read_text() == "the mount goes on"
        assert len([n for n in os.listdir(m.dir) if n.startswith("f")]) == len(held)

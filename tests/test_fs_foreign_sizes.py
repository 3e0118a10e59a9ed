"""Another application's token whose meta states a size its content does not have (the
ciphertext's size, none, or any other): the meta's size is a claim until the content is
downloaded and verified, which the first open for reading does; from then on the file shows its
content's size, and listings of the token do not take it back (Namespace.learn_size). In-process
(tests/fskit.py), then once through the kernel, which must drop the size it holds."""

from __future__ import annotations

import errno
import mmap
import os
import shutil

import pyfuse3
import pytest
import trio
import trio.lowlevel

from privifs.client.connect import connect
from privifs.client.session import PasswordCredentials
from privifs.client.transport import Endpoints
from privifs.crypto.keys import load_aes_key
from tests.fskit import Remote
from tests.mountkit import Mount, privifs

CONTENT = b"fourteen bytes"


@pytest.mark.parametrize("stated", [3, 0, 500, 10**12])
async def test_another_apps_token_shows_its_contents_size_once_opened_whatever_its_meta_states(kit, stated):
    path = f"claims-{stated}.txt"
    await kit.remote.put_stating(path, CONTENT, stated)
    await kit.refresh()
    assert (await kit.lookup(path)).st_size == stated  # nothing downloaded yet: the claim
    fh = await kit.open_file(path, os.O_RDONLY)
    assert (await kit.ops.getattr(await kit.ino(path))).st_size == len(CONTENT)  # before any read
    assert await kit.read(fh, 0, 1 << 20) == CONTENT
    await kit.close(fh)
    await kit.refresh()
    assert (await kit.lookup(path)).st_size == len(CONTENT)  # the listing's claim does not come back
    assert await kit.read_file(path) == CONTENT


async def test_a_privifs_file_keeps_its_stated_size_and_is_not_downloaded_at_open(kit):
    await kit.write_file("own.txt", CONTENT)
    await kit.settle()
    kit.fs.cache.evict(kit.node("/own.txt").token)
    downloads = kit.fs.cache.downloads
    fh = await kit.open_file("own.txt", os.O_RDONLY)
    assert kit.fs.cache.downloads == downloads  # its digest states the content: its size is known
    assert await kit.read(fh, 0, 1 << 20) == CONTENT
    await kit.close(fh)


def test_the_kernel_serves_the_whole_content_of_a_token_stating_a_smaller_size_and_verify_says_so(engine, tmp_path):
    m = Mount(tmp_path / "m", engine.urls)
    with m.mounted():

        async def store() -> None:
            credentials = PasswordCredentials(m.username, "correct-horse-battery")
            async with connect(Endpoints.from_dict(engine.urls), credentials) as client:
                remote = Remote(client, load_aes_key(m.key_file))
                await remote.put_stating("short.txt", CONTENT, 3)
                await remote.put_stating("empty.txt", CONTENT, 0)

        trio.run(store)
        m.refresh()
        assert os.stat(m.dir / "short.txt").st_size == 3
        fd = os.open(m.dir / "short.txt", os.O_RDONLY)
        try:
            assert os.pread(fd, 100, 0) == CONTENT  # one read: the kernel asked for the size again
        finally:
            os.close(fd)
        with open(m.dir / "empty.txt", "rb") as f:
            assert os.fstat(f.fileno()).st_size == len(CONTENT)
            with mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as mapped:
                assert mapped[:] == CONTENT
        assert (m.dir / "short.txt").read_bytes() == CONTENT
        checked = privifs(m.env, "verify", "--data", check=False)
        assert checked.returncode == 0, checked.stdout + checked.stderr  # a claim is no damage, but it is said
        assert "note: /short.txt: its meta states 3 bytes, its verified content has 14" in checked.stdout
        assert "0 damaged, 2 state another size than their content's" in checked.stdout


@pytest.mark.parametrize("stated", [0, 5, 500])
def test_an_append_by_a_write_only_open_and_seek_end_keeps_another_apps_content(engine, tmp_path, stated):
    """Opened for writing only, a token whose meta states another size kept the claim: seek to
    the end then write, an append, wrote over the content (or past a run of zeros), and that
    went to the vault (helper hAG F2)."""
    m = Mount(tmp_path / "m", engine.urls)
    with m.mounted():

        async def store() -> None:
            credentials = PasswordCredentials(m.username, "correct-horse-battery")
            async with connect(Endpoints.from_dict(engine.urls), credentials) as client:
                await Remote(client, load_aes_key(m.key_file)).put_stating("log.txt", CONTENT, stated)

        trio.run(store)
        m.refresh()
        fd = os.open(m.dir / "log.txt", os.O_WRONLY)
        try:
            assert os.lseek(fd, 0, os.SEEK_END) == len(CONTENT)
            os.write(fd, b"; appended")
        finally:
            os.close(fd)
        assert (m.dir / "log.txt").read_bytes() == CONTENT + b"; appended"
        m.wait_idle()
        m.umount()
        shutil.rmtree(m.root / "cache")
        m.mount()
        assert (m.dir / "log.txt").read_bytes() == CONTENT + b"; appended"


async def test_a_file_written_here_while_its_open_downloads_keeps_the_size_written(kit):
    """An open for reading of a token of unverified size downloads it; another handle that
    truncates and writes the file meanwhile stages it. The download's size is the token's, the
    past: the file shows what was written (it showed the old content's size, and the kernel,
    told of it, appended past a run of zeros)."""
    path = "claims-raced.txt"
    content = CONTENT * 20000  # a download of some checkpoints
    await kit.remote.put_stating(path, content, 3)
    await kit.refresh()
    token = kit.node("/" + path).token
    opened = {}
    async with trio.open_nursery() as nursery:

        async def reader() -> None:
            opened["fh"] = await kit.open_file(path, os.O_RDONLY)

        nursery.start_soon(reader)
        with trio.fail_after(10):
            while token not in kit.fs.cache._inflight:
                await trio.lowlevel.checkpoint()
        fh = await kit.open_file(path, os.O_WRONLY | os.O_TRUNC)
        await kit.write(fh, 0, b"x" * 100)
        await kit.close(fh)
        assert token in kit.fs.cache._inflight  # the open's download is still under way
    assert (await kit.lookup(path)).st_size == 100
    assert await kit.read(opened["fh"], 0, 1 << 20) == b"x" * 100
    await kit.close(opened["fh"])
    await kit.settle()
    await kit.refresh()
    assert (await kit.lookup(path)).st_size == 100
    assert await kit.read_file(path) == b"x" * 100


@pytest.mark.parametrize("flags", [os.O_WRONLY, os.O_RDWR, os.O_WRONLY | os.O_APPEND])
async def test_an_open_for_writing_that_cannot_learn_the_real_size_fails_rather_than_write_over_it(kit, flags):
    """The vault unreachable at the open (here: the open's download fails once): an open for
    writing went on with the claimed size, and a write at the end the kernel computed from it,
    once the vault answered, wrote over the content (helper hAH F1). The open fails now; the next
    one, with the vault back, shows the content's size."""
    path = f"claims-offline-{flags}.txt"
    await kit.remote.put_stating(path, CONTENT, 0)
    await kit.refresh()
    fetch = kit.fs._fetch_following

    async def unreachable(node):
        raise pyfuse3.FUSEError(errno.EIO)

    kit.fs._fetch_following = unreachable
    try:
        with pytest.raises(pyfuse3.FUSEError) as caught:
            await kit.open_file(path, flags)
        assert caught.value.errno == errno.EIO
    finally:
        kit.fs._fetch_following = fetch
    fh = await kit.open_file(path, flags)
    assert (await kit.ops.getattr(await kit.ino(path))).st_size == len(CONTENT)
    await kit.close(fh)


async def test_a_token_claiming_no_bytes_whose_content_does_not_verify_fails_its_open(kit):
    """Another application's token claiming 0 bytes whose content fails authentication (written
    with another key, tampered): the open's download failed silently, the file kept its claimed
    size, and through the kernel (which asks nothing of a file it holds as empty) it read as
    empty with no error. The open now fails with EIO."""
    path = "claims-nothing.bin"
    await Remote(kit.remote.client, os.urandom(32)).put_stating(path, CONTENT, 0)
    await kit.refresh()
    with pytest.raises(pyfuse3.FUSEError) as caught:
        await kit.open_file(path, os.O_RDONLY)
    assert caught.value.errno == errno.EIO
    assert "integrity failure" in (kit.fs.last_read_error or "")

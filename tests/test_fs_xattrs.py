"""Extended attributes (``--xattrs``): what a program sets is read back, listed and removed, kept
sealed in the index and the vault, carried through renames, attribute changes and rewrites, and
shown by every client of the vault; what a mount does not store is refused with the errno Linux
gives. In-process (tests/fskit.py) against the real engine; the kernel's part (XATTR_CREATE and
XATTR_REPLACE, its namespace checks, the answer of a mount without ``--xattrs``) is tested on a
real mount at the end."""

from __future__ import annotations

import base64
import errno
import os
import sqlite3
import stat
from dataclasses import replace

import pytest
import trio

from privifs.client.shapes import TokenInfo
from privifs.crypto import wire
from privifs.errors import IntegrityError
from privifs.fs import xattrs
from privifs.fs.tokenmeta import attributes
from tests.fskit import fails_with, inprocess_fs
from tests.mountkit import Mount, privifs

SECRET = b"the-value-nobody-else-reads"


@pytest.fixture
async def xkit(module_account, eng, tmp_path):
    async with inprocess_fs(tmp_path, *module_account, empty_vault=True, xattrs=True) as k:
        yield k


# -- the sealed form ------------------------------------------------------------------------------
def test_the_sealed_form_round_trips_and_its_largest_fits_one_risk_meta_value():
    sealer = xattrs.Sealer(bytes(32))
    attrs = {b"user.a": b"", b"user.b": bytes(range(256)), b"security.selinux": b"system_u:object_r:x\0"}
    assert sealer.open(sealer.seal(attrs)) == attrs
    assert sealer.seal({}) is None and sealer.open(None) == {}
    biggest = {b"user.x": bytes(xattrs.TOTAL_MAX - xattrs.ENTRY_OVERHEAD - 6)}
    assert xattrs.fits(biggest) and not xattrs.fits({**biggest, b"user.y": b""})
    assert len(sealer.seal(biggest)) <= xattrs.RISK_VALUE_MAX


def test_an_opened_set_is_kept_and_each_caller_gets_a_dict_of_its_own():
    sealer = xattrs.Sealer(bytes(32))
    sealed = sealer.seal({b"user.a": b"1"})
    first = sealer.open(sealed)
    first[b"user.b"] = b"2"  # (setxattr changes what it was given before sealing it anew)
    assert sealer.open(sealed) == {b"user.a": b"1"}
    for i in range(xattrs.OPENED_KEPT + 1):
        sealer.open(sealer.seal({b"user.n": str(i).encode()}))
    assert sealer.open(sealed) == {b"user.a": b"1"} and len(sealer._opened) <= xattrs.OPENED_KEPT


def test_sealed_attributes_that_do_not_open_are_refused_not_read():
    sealer = xattrs.Sealer(bytes(32))
    sealed = sealer.seal({b"user.a": b"1"})
    with pytest.raises(IntegrityError):
        xattrs.Sealer(bytes([1]) * 32).open(sealed)  # another key
    raw = bytearray(base64.b64decode(sealed))
    raw[-1] ^= 1
    with pytest.raises(IntegrityError):
        sealer.open(base64.b64encode(raw).decode())
    cut = wire.seal(bytes(32), xattrs.encode({b"user.a": b"12345"})[:-2])  # authentic, but cut short
    with pytest.raises(IntegrityError):
        sealer.open(base64.b64encode(cut).decode())
    with pytest.raises(IntegrityError):
        sealer.open("not base64!")


# -- a program's view -----------------------------------------------------------------------------
async def test_attributes_are_set_listed_read_replaced_and_removed(xkit):
    await xkit.write_file("f.txt", b"content")
    await xkit.mkdir("d")
    before = (await xkit.lookup("f.txt")).st_ctime_ns
    assert await xkit.listxattr("f.txt") == []
    with fails_with(errno.ENODATA):
        await xkit.getxattr("f.txt", b"user.a")
    await xkit.setxattr("f.txt", b"user.a", b"1")
    await xkit.setxattr("f.txt", b"user.b", SECRET)
    await xkit.setxattr("f.txt", b"trusted.t", b"")
    await xkit.setxattr("d", b"user.dir", b"yes")
    assert (await xkit.lookup("f.txt")).st_ctime_ns > before
    assert await xkit.listxattr("f.txt") == [b"trusted.t", b"user.a", b"user.b"]
    assert await xkit.getxattr("f.txt", b"user.b") == SECRET
    assert await xkit.getxattr("f.txt", b"trusted.t") == b""
    await xkit.setxattr("f.txt", b"user.a", b"replaced")
    assert await xkit.getxattr("f.txt", b"user.a") == b"replaced"
    await xkit.removexattr("f.txt", b"user.a")
    with fails_with(errno.ENODATA):
        await xkit.removexattr("f.txt", b"user.a")
    assert await xkit.listxattr("f.txt") == [b"trusted.t", b"user.b"]
    assert await xkit.getxattr("d", b"user.dir") == b"yes"
    assert await xkit.read_file("f.txt") == b"content"


async def test_names_a_mount_does_not_store_and_attributes_past_the_limit_are_refused(xkit):
    await xkit.write_file("f", b"")
    for name in (b"system.posix_acl_access", b"nonamespace", b"os2.x"):
        with fails_with(errno.EOPNOTSUPP):
            await xkit.setxattr("f", name, b"v")
    with fails_with(errno.EINVAL):  # a namespace without a name, as ext4 answers
        await xkit.setxattr("f", b"user.", b"v")
    with fails_with(errno.ENOSPC):
        await xkit.setxattr("f", b"user.big", bytes(xattrs.TOTAL_MAX))
    half = xattrs.TOTAL_MAX // 2
    await xkit.setxattr("f", b"user.one", bytes(half))
    with fails_with(errno.ENOSPC):
        await xkit.setxattr("f", b"user.two", bytes(half))
    assert await xkit.listxattr("f") == [b"user.one"]  # the refused change left nothing behind
    xkit.fs.opts.read_only = True
    try:
        with fails_with(errno.EROFS):
            await xkit.setxattr("f", b"user.x", b"")
        with fails_with(errno.EROFS):
            await xkit.removexattr("f", b"user.one")
    finally:
        xkit.fs.opts.read_only = False


async def test_a_filesystem_without_xattrs_answers_enosys_so_the_kernel_says_eopnotsupp(kit):
    await kit.write_file("f", b"")
    for call in (
        kit.getxattr("f", b"user.a"),
        kit.listxattr("f"),
        kit.setxattr("f", b"user.a", b""),
        kit.removexattr("f", b"user.a"),
    ):
        with fails_with(errno.ENOSYS):
            await call


# -- what is stored, and who sees it --------------------------------------------------------------
async def test_attributes_reach_the_vault_sealed_and_a_fresh_client_reads_them(xkit):
    await xkit.mkdir("docs")
    await xkit.write_file("docs/a.txt", b"A")
    await xkit.setxattr("docs/a.txt", b"user.secret", SECRET)
    await xkit.setxattr("docs", b"user.d", b"dir value")
    await xkit.symlink("link", "docs/a.txt")
    await xkit.setxattr("link", b"trusted.l", b"on a symlink")
    await xkit.settle()
    infos = {i.file_name: i for i in await xkit.listing()}
    field = infos["a.txt"].risk[xattrs.FIELD]
    assert SECRET not in base64.b64decode(field) and b"user.secret" not in base64.b64decode(field)
    assert attributes(infos["a.txt"]).xattrs == field
    index = sqlite3.connect(xkit.state / "index.sqlite3")
    try:
        rows = index.execute("SELECT name, xattrs FROM nodes WHERE xattrs IS NOT NULL").fetchall()
    finally:
        index.close()
    assert sorted(name for name, _ in rows) == ["a.txt", "docs", "link"]
    assert all(SECRET not in base64.b64decode(sealed) for _, sealed in rows)
    async with xkit.fresh(xattrs=True) as other:
        assert await other.getxattr("docs/a.txt", b"user.secret") == SECRET
        assert await other.getxattr("docs", b"user.d") == b"dir value"
        assert await other.getxattr("link", b"trusted.l") == b"on a symlink"


async def test_fsync_returns_once_changed_attributes_are_in_the_vault(module_account, eng, tmp_path):
    """fsync(2) of a file whose content was uploaded but whose mode, times or extended attributes
    changed since returned at once: the change was only on this machine, and a crash with the
    local index lost took it (helper hE, 3 of 3). It returns once the token's meta holds them,
    here from a server that takes a second to write a token's meta."""
    async with inprocess_fs(tmp_path, *module_account, empty_vault=True, xattrs=True) as k:
        await k.write_file("db", b"content", fsync=True)
        fh = await k.open_file("db", os.O_RDWR)
        set_risk = k.syncer.tokens.set_risk

        async def slowly(*args, **kwargs):
            await trio.sleep(1)
            await set_risk(*args, **kwargs)

        k.syncer.tokens.set_risk = slowly
        await k.setattr(fh=fh, mode=stat.S_IFREG | 0o600, mtime_ns=1_500_000_000 * 10**9)
        await k.setxattr("db", b"user.kept", b"through fsync")
        await k.fsync(fh)
        async with k.fresh(xattrs=True) as other:
            attrs = await other.lookup("db")
            assert stat.S_IMODE(attrs.st_mode) == 0o600 and attrs.st_mtime_ns == 1_500_000_000 * 10**9
            assert await other.getxattr("db", b"user.kept") == b"through fsync"
        await k.close(fh)


async def test_attributes_follow_renames_chmods_and_rewrites_even_through_a_mount_without_xattrs(xkit):
    await xkit.write_file("a.txt", b"first")
    await xkit.setxattr("a.txt", b"user.keep", b"kept")
    await xkit.settle()
    async with xkit.fresh() as plain:  # a mount without --xattrs carries what it cannot show
        await plain.rename("a.txt", "b.txt")
        await plain.setattr("b.txt", mode=0o600)
        await plain.write_file("b.txt", b"second version")
        await plain.settle()
    await xkit.refresh()
    assert await xkit.read_file("b.txt") == b"second version"
    assert await xkit.getxattr("b.txt", b"user.keep") == b"kept"
    await xkit.setxattr("b.txt", b"user.new", b"after")
    await xkit.settle()
    async with xkit.fresh(xattrs=True) as other:
        assert await other.listxattr("b.txt") == [b"user.keep", b"user.new"]
        assert (await other.lookup("b.txt")).st_mode & 0o777 == 0o600


async def test_a_change_made_by_another_client_is_seen_after_a_refresh(xkit):
    await xkit.write_file("f", b"x")
    await xkit.settle()
    async with xkit.fresh(xattrs=True) as other:
        await other.setxattr("f", b"user.from", b"elsewhere")
        await other.settle()
    await xkit.refresh()
    assert await xkit.getxattr("f", b"user.from") == b"elsewhere"


async def test_attributes_sealed_under_another_key_are_eio_and_junk_reads_as_none(xkit, caplog):
    other_key = xattrs.Sealer(xattrs.xattr_key(os.urandom(32)))
    await xkit.remote.put("forged", b"1", xattrs=other_key.seal({b"user.a": b"forged"}))
    await xkit.remote.put("junk", b"2", xattrs="not base64 at all!")
    await xkit.refresh()
    for _ in range(3):  # (the kernel asks before every write: logged once)
        with fails_with(errno.EIO):
            await xkit.getxattr("forged", b"security.capability")
    with fails_with(errno.EIO):
        await xkit.listxattr("forged")
    refused = [r for r in caplog.records if "extended attributes refused" in r.getMessage()]
    assert len(refused) == 1 and "forged" in refused[0].getMessage()
    assert await xkit.listxattr("junk") == []
    assert await xkit.read_file("forged") == b"1"  # the content is not touched


@pytest.mark.parametrize("junk", ["abcde", "A===", "AAAAA=", "not base64 at all!", "===="])
def test_a_field_that_is_not_base64_reads_as_no_attributes(junk):
    info = TokenInfo(
        token="dtk-x",
        context="/",
        file_name="f",
        extension="",
        size=1,
        path=None,
        created_at=None,
        risk={xattrs.FIELD: junk},
    )
    assert attributes(info).xattrs is None
    sealed = xattrs.Sealer(bytes(32)).seal({b"user.a": b"1"})
    assert attributes(replace(info, risk={xattrs.FIELD: sealed})).xattrs == sealed


# -- through the kernel ---------------------------------------------------------------------------
def test_a_mount_with_xattrs_answers_the_kernels_calls_and_one_without_says_eopnotsupp(engine, tmp_path):
    with Mount(tmp_path / "x", engine.urls, mount_args=("--xattrs",)).mounted() as m:
        f = m.dir / "f"
        f.write_bytes(b"data")
        os.setxattr(f, "user.a", b"1")
        with pytest.raises(FileExistsError):
            os.setxattr(f, "user.a", b"2", os.XATTR_CREATE)
        with pytest.raises(OSError) as refused:
            os.setxattr(f, "user.b", b"2", os.XATTR_REPLACE)
        assert refused.value.errno == errno.ENODATA
        os.setxattr(f, "user.a", b"2", os.XATTR_REPLACE)
        assert os.getxattr(f, "user.a") == b"2" and os.listxattr(f) == ["user.a"]
        (m.dir / "l").symlink_to("f")
        with pytest.raises(PermissionError):  # the kernel's rule: user.* only on files and directories
            os.setxattr(m.dir / "l", "user.a", b"1", follow_symlinks=False)
        with f.open("ab") as out:  # writes go on (the kernel asks for security.capability first)
            out.write(b"more")
        assert f.read_bytes() == b"datamore" and m.status()["xattrs"] is True
        assert "xattrs:       stored" in privifs(m.env, "status", str(m.dir)).stdout
        m.wait_idle(timeout=60)
        m.umount()
        m.mount_args = ()
        m.mount()
        with pytest.raises(OSError) as unsupported:
            os.getxattr(f, "user.a")
        assert unsupported.value.errno == errno.EOPNOTSUPP
        assert f.read_bytes() == b"datamore"


def test_trusted_names_are_listed_only_to_callers_with_cap_sys_admin(engine, tmp_path):
    """As ext4 and tmpfs: the kernel refuses others' getxattr of a trusted.* name (ENODATA), so
    listing it to them made 'rsync -X' exit 23 and 'getfattr -d -m-' print an error."""
    from tests.test_fs_posix import as_user

    with Mount(tmp_path / "x", engine.urls, mount_args=("--xattrs",)).mounted("--allow-other") as m:
        f = m.dir / "f"
        f.write_bytes(b"data")
        f.chmod(0o644)
        m.dir.chmod(0o755)
        for name in ("trusted.t", "user.u", "security.s"):
            os.setxattr(f, name, b"1")
        assert sorted(os.listxattr(f)) == ["security.s", "trusted.t", "user.u"]
        assert sorted(as_user(m.dir, lambda: os.listxattr("f"))) == ["security.s", "user.u"]

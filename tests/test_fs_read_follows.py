"""A file another client replaced (new token, old one deleted) or deleted, opened here before the
listing showed the change: its first read follows the node to the new content once the (nudged)
refresher merged the listing, instead of failing with ENOENT for a token no longer in the vault
(in-process, tests/fskit.py; the big-file case is in test_fs_parts.py). Damage or a token that
is still there stays an error."""

from __future__ import annotations

import errno
import os

import pyfuse3
import trio

from tests.fskit import InProcessFs, across_a_refresh, fails_with


async def read_while_refreshing(kit: InProcessFs, fh: int) -> bytes | pyfuse3.FUSEError:
    return await across_a_refresh(lambda: kit.read(fh, 0, 1 << 20), kit.refresh)


async def test_a_file_replaced_by_another_client_before_its_first_read_reads_the_new_content(kit: InProcessFs):
    await kit.write_file("doc.txt", b"old content")
    await kit.settle()
    kit.fs.cache.evict(kit.node("/doc.txt").token)  # as on another mount: never read here
    fh = await kit.open_file("doc.txt", os.O_RDONLY)
    await kit.remote.rewrite("doc.txt", b"new content, longer")
    assert await read_while_refreshing(kit, fh) == b"new content, longer"
    await kit.close(fh)


async def test_a_file_replaced_by_shorter_content_during_a_read_is_eio_once_not_zeros(kit: InProcessFs):
    """Replaced elsewhere by shorter content (50,000 bytes, then 1,000) while the kernel held the
    old size for the read: the new 1,000 bytes were returned and the kernel filled the rest up to
    50,000 with zeros no version ever had (helper hQ: 6 reads in 10 on two mounts). That read is
    EIO; the next one, with the size the listing brought, reads the new content."""
    await kit.write_file("doc.txt", os.urandom(50_000))
    await kit.settle()
    kit.fs.cache.evict(kit.node("/doc.txt").token)  # as on another mount: never read here
    fh = await kit.open_file("doc.txt", os.O_RDONLY)
    await kit.remote.rewrite("doc.txt", b"short now" * 100)
    got = await read_while_refreshing(kit, fh)
    assert isinstance(got, pyfuse3.FUSEError) and got.errno == errno.EIO, got
    assert await kit.read(fh, 0, 1 << 20) == b"short now" * 100
    await kit.close(fh)


async def test_a_read_past_the_end_page_of_content_the_listing_shortened_is_eio_not_zeros(kit: InProcessFs):
    """The listing moved the node to another client's shorter content before the kernel dropped
    the old size it held: the kernel asks for pages up to that old size, and a short answer is
    filled with zeros up to it (helper hQ, after the read-side check above). A read past the page
    holding the end is EIO until the kernel asks for the attributes again; after that, reads of
    any length are served (an O_DIRECT read asks past the end: ``dd iflag=direct < file``, whose
    O_DIRECT the daemon never hears of, read EIO for a file nobody changed, helper hR)."""
    from privifs.fs.filesystem import PAGE
    from tests.fskit import CTX

    await kit.write_file("doc.txt", os.urandom(50_000))
    await kit.settle()
    kit.fs.cache.evict(kit.node("/doc.txt").token)
    kit.fs.page_cache_reads = True  # as mounted: the kernel asks for pages, up to the size it holds
    fh = await kit.open_file("doc.txt", os.O_RDONLY)  # (the kernel got 50,000 bytes as its size)
    await kit.remote.rewrite("doc.txt", b"short" * 180)
    await kit.refresh()  # the node shows 900 bytes now; the kernel may still hold 50,000
    with fails_with(errno.EIO):
        await kit.read(fh, 0, 13 * PAGE)  # what a kernel holding 50,000 bytes asks for
    assert await kit.read(fh, 0, PAGE) == b"short" * 180
    await kit.ops.getattr(kit.node("/doc.txt").ino, CTX)  # the kernel holds 900 bytes from now
    assert await kit.read(fh, 0, 1 << 20) == b"short" * 180  # as an O_DIRECT read asks
    await kit.close(fh)


async def test_a_file_deleted_by_another_client_before_its_first_read_fails_without_a_wait_for_ever(kit: InProcessFs):
    await kit.write_file("gone.txt", b"content")
    await kit.settle()
    kit.fs.cache.evict(kit.node("/gone.txt").token)
    fh = await kit.open_file("gone.txt", os.O_RDONLY)
    await kit.remote.delete("gone.txt")
    with trio.fail_after(5):  # not FOLLOW_WAIT: the merged listing removes the node
        got = await read_while_refreshing(kit, fh)
    assert isinstance(got, pyfuse3.FUSEError) and got.errno == errno.ENOENT
    assert kit.fs.last_read_error is None  # another client's delete is no failure of this mount
    await kit.close(fh)


async def test_a_file_replaced_while_its_new_version_showed_as_a_conflict_copy_reads_the_new_content(kit: InProcessFs):
    # another client's rewrite is a new token at the same place, then the old one deleted: a
    # listing between the two showed the new one as a conflict copy here. The next listing gave
    # it the plain name as another node, and the open file's node left the tree: its reads failed
    # with ENOENT (a three-mount race reading a big file one of them kept rewriting)
    await kit.write_file("doc.txt", b"old content")
    await kit.settle()
    kit.fs.cache.evict(kit.node("/doc.txt").token)
    old = await kit.remote.token("doc.txt")
    await kit.remote.put("doc.txt", b"new content, longer")
    await kit.refresh()
    assert len(kit.ns.root.children) == 2, sorted(kit.ns.root.children)
    fh = await kit.open_file("doc.txt", os.O_RDONLY)
    await kit.remote.client.tokens.delete(old.token)
    assert await read_while_refreshing(kit, fh) == b"new content, longer"
    await kit.close(fh)
    assert sorted(kit.ns.root.children) == ["doc.txt"]
    assert await kit.read_file("doc.txt") == b"new content, longer"


async def test_a_file_rewritten_twice_between_listings_keeps_its_inode_and_no_copy_takes_its_name(kit: InProcessFs):
    """Another client rewrote a file twice (T1 → T2 → T3, each old token deleted after its new
    one): a listing between T2's upload and T1's delete showed T2 as a conflict copy; the next
    listing shows only T3. The file's node took T3, and then the copy's node, its token gone,
    took T3 from it as its heir: the file showed under a new inode, and descriptors open on it
    read ENOENT though nobody deleted it (helper hJ: every run of a 2 MiB file fsynced 10-20
    times a second on another mount)."""
    await kit.write_file("doc.txt", b"first")
    await kit.settle()
    ino = kit.node("/doc.txt").ino
    t1 = (await kit.remote.token("doc.txt")).token
    await kit.remote.next_second()  # (claim order: T1 keeps the plain name)
    t2 = await kit.remote.put("doc.txt", b"second")  # T1 not deleted yet
    await kit.refresh()
    assert len(kit.ns.root.children) == 2, sorted(kit.ns.root.children)
    fh = await kit.open_file("doc.txt", os.O_RDONLY)
    await kit.remote.put("doc.txt", b"third, longer")  # T3
    await kit.remote.client.tokens.delete(t1)
    await kit.remote.client.tokens.delete(t2)
    await kit.refresh()
    assert sorted(kit.ns.root.children) == ["doc.txt"]
    assert kit.node("/doc.txt").ino == ino
    assert await kit.read(fh, 0, 1 << 20) == b"third, longer"
    await kit.close(fh)


async def test_a_read_follows_two_replacements_while_the_kernel_holds_an_invalidation(kit: InProcessFs, monkeypatch):
    """A read that follows another client's replacement holds the kernel's lock on the pages it
    reads, and the refresher's invalidation of that file's pages waits for that lock. The
    refresher waited for its invalidations, so when the version the read moved on to was
    replaced too before it was fetched, no listing came to move it on again: the read gave up
    after 10 s with EIO, and the mount applied no listing meanwhile (helper hJ: 10 of 21 opens
    of a file another mount kept rewriting). Here the kernel's wait is a fake that lasts until
    the read returns."""
    import threading

    await kit.write_file("doc.txt", b"first")
    await kit.settle()
    kit.fs.cache.evict(kit.node("/doc.txt").token)  # as on another mount: never read here
    ino = kit.node("/doc.txt").ino
    fh = await kit.open_file("doc.txt", os.O_RDONLY)
    await kit.remote.rewrite("doc.txt", b"second")
    read_done = threading.Event()

    def invalidate_inode(inode: int, attr_only: bool = False) -> None:  # (no kernel here)
        if inode == ino and not attr_only:
            read_done.wait(30)  # the page lock the pending read holds

    monkeypatch.setattr(pyfuse3, "invalidate_inode", invalidate_inode)
    monkeypatch.setattr(pyfuse3, "invalidate_entry", lambda *args, **kwargs: None)
    fetch = kit.refresher.fetch
    rewrites = [b"third, longer"]

    async def fetch_then_rewrite():  # the listing shows "second"; it is replaced before it is read
        got = await fetch()
        if rewrites:
            await kit.remote.rewrite("doc.txt", rewrites.pop())
        return got

    monkeypatch.setattr(kit.refresher, "fetch", fetch_then_rewrite)
    kit.refresher.invalidate = True
    async with trio.open_nursery() as nursery:
        await nursery.start(kit.refresher.run)
        try:
            with trio.fail_after(8):  # (the read gives up after FOLLOW_WAIT, 10 s)
                got = await kit.read(fh, 0, 1 << 20)
        finally:
            read_done.set()
        nursery.cancel_scope.cancel()
    assert got == b"third, longer"
    await kit.close(fh)


async def test_a_write_to_a_file_another_client_replaced_before_it_was_staged_here_follows_too(kit: InProcessFs):
    """The first write to a file (or an append, or a truncate to a size other than 0) stages its
    current content; when another client had replaced it before this mount's listing showed that,
    the old token was gone and the write failed with ENOENT ('echo x >> f': No such file or
    directory, for a file nobody deleted; seen in a three-mount race of a big file). It follows
    the node to the new content, as a read does."""
    await kit.write_file("doc.txt", b"old content")
    await kit.settle()
    kit.fs.cache.evict(kit.node("/doc.txt").token)  # as on another mount: never read here
    fh = await kit.open_file("doc.txt", os.O_RDWR)
    await kit.remote.rewrite("doc.txt", b"new content, longer")
    got = await across_a_refresh(lambda: kit.write(fh, 0, b"N"), kit.refresh)
    assert got == 1, got
    await kit.close(fh)
    assert await kit.read_file("doc.txt") == b"New content, longer"


async def test_a_replaced_file_whose_new_version_is_not_listed_in_time_is_eio_not_enoent(kit: InProcessFs, monkeypatch):
    """The file is there (another client replaced it): ENOENT told an appending program it was
    not (three mounts under injected faults, a listing slower than the wait)."""
    monkeypatch.setattr("privifs.fs.filesystem.FOLLOW_WAIT", 0.3)
    await kit.write_file("log.txt", b"line 1\n")
    await kit.settle()
    kit.fs.cache.evict(kit.node("/log.txt").token)
    fh = await kit.open_file("log.txt", os.O_RDONLY)
    await kit.remote.rewrite("log.txt", b"line 1\nline 2 from elsewhere\n")  # no refresh here: not listed
    with fails_with(errno.EIO):
        await kit.read(fh, 0, 1 << 20)
    assert "did not show what it became" in (kit.fs.last_read_error or "")
    await kit.close(fh)

"""Opening a cached entry: the cache remembers where an entry's file is, so a hit costs one
open(2) and no database query, and what it remembers never outlives the entry."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from privifs.fs.cache import ContentCache
from tests.fskit import CACHE_KEY as KEY
from tests.fskit import disk_usage, sealed_file


@pytest.fixture
def cache(tmp_path: Path):
    c = ContentCache(tmp_path / "cache", 1 << 30, KEY)
    yield c
    c.close()


def count_lookups(cache: ContentCache, monkeypatch) -> list[str]:
    calls: list[str] = []
    get = cache.cache.get

    def counted(key, *args, **kwargs):
        calls.append(key)
        return get(key, *args, **kwargs)

    monkeypatch.setattr(cache.cache, "get", counted)
    return calls


def test_opening_a_cached_entry_again_asks_the_database_nothing(cache, tmp_path, monkeypatch):
    assert cache.adopt("tok", sealed_file(tmp_path / "a", b"content"))
    cache.open("tok").close()
    calls = count_lookups(cache, monkeypatch)
    for _ in range(10):
        f = cache.open("tok")
        assert f.read(0, 100) == b"content"
        f.close()
    assert calls == []


def test_an_evicted_entry_is_a_miss_even_after_it_was_opened(cache, tmp_path):
    assert cache.adopt("tok", sealed_file(tmp_path / "a", b"content"))
    cache.open("tok").close()
    cache.evict("tok")
    assert cache.open("tok") is None


def test_an_entry_whose_file_went_is_a_miss(cache, tmp_path):
    assert cache.adopt("tok", sealed_file(tmp_path / "a", b"content"))
    f = cache.open("tok")
    path = f.path
    f.close()
    os.unlink(path)
    assert cache.open("tok") is None


def test_an_entry_damaged_after_it_was_opened_is_dropped(cache, tmp_path):
    assert cache.adopt("tok", sealed_file(tmp_path / "a", b"content"))
    f = cache.open("tok")
    path = f.path
    f.close()
    with open(path, "r+b") as raw:
        raw.write(b"NOTSEALD")
    assert cache.open("tok") is None
    assert not os.path.exists(path)


def test_an_entry_replaced_under_the_same_token_opens_the_new_file(cache, tmp_path):
    assert cache.adopt("tok", sealed_file(tmp_path / "a", b"old"))
    cache.open("tok").close()
    assert cache.adopt("tok", sealed_file(tmp_path / "b", b"new"))
    f = cache.open("tok")
    assert f.read(0, 10) == b"new"
    f.close()


def test_an_entry_just_stored_opens_without_a_query(cache, tmp_path, monkeypatch):
    assert cache.adopt("tok", sealed_file(tmp_path / "a", b"uploaded"))  # as after a write-back
    calls = count_lookups(cache, monkeypatch)
    f = cache.open("tok")
    assert f.read(0, 100) == b"uploaded"
    f.close()
    assert calls == []


def test_adopting_a_new_token_asks_nothing_and_lands_where_diskcache_emptied_its_directory(
    cache, tmp_path, monkeypatch
):
    """An uploaded file moving into the cache: a token the cache has never held needs no lookup
    (``evict`` asked the table for every new token), its directory is made only when missing,
    also when it was removed, and a reopened cache finds every entry."""
    calls = count_lookups(cache, monkeypatch)
    for i in range(40):
        assert cache.adopt(f"t{i}", sealed_file(tmp_path / f"s{i}", b"x%d" % i))
    assert calls == []
    for i in range(40):
        cache.evict(f"t{i}")
    for d in Path(cache.cache.directory).iterdir():
        if d.is_dir() and len(d.name) == 2:
            d.rmdir()  # gone, as after a clean-up by hand: made again when needed
    for i in range(40):
        assert cache.adopt(f"t{i}", sealed_file(tmp_path / f"s{i}", b"y%d" % i))
    assert cache.adopt("t0", sealed_file(tmp_path / "again", b"replaced"))  # a held token is replaced
    cache.close()
    reopened = ContentCache(tmp_path / "cache", 1 << 30, KEY)
    try:
        assert reopened.used == sum(reopened._lru.values()) and len(reopened._lru) == 40
        for i in range(1, 40):
            f = reopened.open(f"t{i}")
            assert f.read(0, 10) == b"y%d" % i
            f.close()
        f = reopened.open("t0")
        assert f.read(0, 10) == b"replaced"
        f.close()
    finally:
        reopened.close()


def test_entries_live_in_256_directories_that_stay_and_older_two_level_entries_still_read(cache, tmp_path, monkeypatch):
    """diskcache's own layout (``xx/yy/name.val``) made a directory for nearly every small file
    stored and removed it at eviction: an inode allocated and freed per entry, and 4 KiB each
    the cache limit did not count. Entries now go one level deep, into at most 256 directories
    that stay; an entry an older version stored two levels deep still opens, and leaves with
    its directories."""
    import diskcache

    root = Path(cache.cache.directory)
    with monkeypatch.context() as m:  # as an older version named its files
        m.setattr(type(cache.cache.disk), "filename", diskcache.Disk.filename)
        assert cache.adopt("old", sealed_file(tmp_path / "old", b"older layout"))
    old_path = Path(cache._paths["old"])
    assert old_path.parent.parent.parent == root
    for i in range(600):
        assert cache.adopt(f"t{i}", sealed_file(tmp_path / f"s{i}", b"%d" % i))
    dirs = {Path(p).parent for t, p in cache._paths.items() if t != "old"}
    assert all(d.parent == root and len(d.name) == 2 for d in dirs) and len(dirs) <= 256
    for i in range(600):
        cache.evict(f"t{i}")
    assert all(d.is_dir() for d in dirs)  # nothing made again for the next entries
    cache.close()
    reopened = ContentCache(tmp_path / "cache", 1 << 30, KEY)
    try:
        f = reopened.open("old")
        assert f.read(0, 20) == b"older layout"
        f.close()
        reopened.evict("old")
        assert not old_path.parent.exists() and not old_path.parent.parent.exists()
    finally:
        reopened.close()


def test_the_entry_directories_count_against_the_size_limit(tmp_path):
    """The 256 entry directories stay once made, 4 KiB each, and du counts them: the limit did
    not, and a real mount's 16 MiB cache of 6,000 small files measured 16.5 MiB (du -s)."""
    limit = 4 * 1024 * 1024
    c = ContentCache(tmp_path / "cache", limit, KEY)
    try:
        for i in range(1500):
            c.adopt(f"t{i}", sealed_file(tmp_path / f"s{i}", b"%d" % i))
            if i % 100 == 99:
                assert disk_usage(tmp_path / "cache", directories=True) <= limit, i
        assert len(c._lru) > 100  # it held entries, within the limit
        assert c._entry_dirs() >= 200 * 4096  # nearly all 256 made, each counted
    finally:
        c.close()


def test_a_cache_opened_with_a_smaller_limit_is_within_it_at_once(tmp_path):
    # a mount given a smaller --cache-size than the last one kept the larger one's entries
    # (status: '34.8 MiB of 8 MiB', du alike) until a download landed, which reads of cached
    # files never make
    c = ContentCache(tmp_path / "cache", 1 << 30, KEY)
    for i in range(300):
        assert c.adopt(f"t{i}", sealed_file(tmp_path / f"s{i}", b"%d" % i))
    c.close()
    limit = 3 * 1024 * 1024  # the table and the entry directories take about 2.2 MiB of it
    c = ContentCache(tmp_path / "cache", limit, KEY)
    try:
        assert 0 < c.used <= limit - c.overhead()
        assert disk_usage(tmp_path / "cache", directories=True) <= limit
        assert c.open("t299") is not None and c.open("t0") is None  # the least recently used went
    finally:
        c.close()


def test_opening_a_known_sparse_entry_again_does_not_measure_it_again(cache, tmp_path, monkeypatch):
    # a sparse entry is measured by its data extents (an lseek pair per extent: 4000 for a
    # 250 MiB file written every other chunk); a hit on an entry already counted needs none
    # (review helper h-zs)
    from privifs.crypto.sealed import CHUNK, SealedFile
    from privifs.fs import cache as cache_module

    f = SealedFile.create(tmp_path / "a", KEY)
    for k in range(0, 200, 2):
        f.write(k * CHUNK, b"x")
    f.sync_header()
    f.close()
    assert cache.adopt("tok", str(tmp_path / "a"))
    cache.open("tok").close()
    measured = []
    real = cache_module.entry_footprint
    monkeypatch.setattr(cache_module, "entry_footprint", lambda fd: measured.append(fd) or real(fd))
    for _ in range(5):
        cache.open("tok").close()
    assert measured == []


def test_entry_files_no_row_names_are_deleted_when_the_cache_opens(tmp_path):
    """An entry moves in by a rename and then a row of the table: a daemon killed between the two
    left a file no limit counted and nothing removed (as large as a whole staged file)."""
    c = ContentCache(tmp_path / "cache", 1 << 30, KEY)
    assert c.adopt("kept", sealed_file(tmp_path / "a", b"kept content"))
    entries = Path(c.cache.directory)
    c.close()
    orphan = entries / "ab" / "0123456789abcdef.val"  # where a killed adopt's rename left a file
    orphan.write_bytes(os.urandom(1 << 20))
    other = entries / "ab" / "notes.txt"  # not an entry file: not ours to delete
    other.write_text("x")
    reopened = ContentCache(tmp_path / "cache", 1 << 30, KEY)
    try:
        assert not orphan.exists() and other.exists()
        f = reopened.open("kept")
        assert f.read(0, 100) == b"kept content"
        f.close()
    finally:
        reopened.close()

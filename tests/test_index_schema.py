"""Upgrades of the local state: the index carries a schema version and is migrated in place, step
by step; an index or a sealed file from a newer privifs is refused with a message saying so,
never misread or dropped."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from privifs.crypto.sealed import VERSION, SealedFile, local_key
from privifs.errors import FormatVersionError, LocalStoreError
from privifs.fs import namespace
from privifs.fs.cache import ContentCache
from privifs.fs.namespace import COLUMNS, Index, Namespace
from privifs.fs.staging import Staging
from tests.mountkit import Mount

KEY = local_key(bytes(32))

# the index exactly as privifs made it before schema versions (namespace.SCHEMA at 9754212)
PREVIOUS_LAYOUT = """
CREATE TABLE IF NOT EXISTS nodes (
    ino INTEGER PRIMARY KEY,
    parent INTEGER NOT NULL,
    name TEXT NOT NULL,
    kind TEXT NOT NULL,
    mode INTEGER NOT NULL,
    uid INTEGER, gid INTEGER,
    mtime_ns INTEGER NOT NULL,
    ctime_ns INTEGER NOT NULL,
    size INTEGER NOT NULL,
    target TEXT,
    token TEXT,
    remote_context TEXT, remote_name TEXT, remote_extension TEXT, remote_risk TEXT,
    shown_as TEXT,
    staged_id TEXT,
    content_dirty INTEGER NOT NULL DEFAULT 0,
    meta_dirty INTEGER NOT NULL DEFAULT 0,
    explicit INTEGER NOT NULL DEFAULT 0,
    seq INTEGER NOT NULL DEFAULT 0,
    upload_started REAL,
    upload_digest TEXT
);
CREATE INDEX IF NOT EXISTS nodes_token ON nodes(token);
CREATE TABLE IF NOT EXISTS tombstones (token TEXT PRIMARY KEY, since REAL NOT NULL);
CREATE TABLE IF NOT EXISTS kv (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""
PREVIOUS_COLUMNS = (
    "ino",
    "parent",
    "name",
    "kind",
    "mode",
    "uid",
    "gid",
    "mtime_ns",
    "ctime_ns",
    "size",
    "target",
    "token",
    "remote_context",
    "remote_name",
    "remote_extension",
    "remote_risk",
    "shown_as",
    "staged_id",
    "content_dirty",
    "meta_dirty",
    "explicit",
    "seq",
    "upload_started",
    "upload_digest",
)


def previous_index(path: Path) -> None:
    """An index as the previous privifs left it: a tree, a token, staged work, a tombstone."""
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.executescript(PREVIOUS_LAYOUT)
    rows = [
        dict(ino=1, parent=1, name="", kind="dir", mode=0o755, mtime_ns=1, ctime_ns=1, size=0),
        dict(
            ino=2,
            parent=1,
            name="docs",
            kind="dir",
            mode=0o750,
            mtime_ns=2,
            ctime_ns=2,
            size=0,
            seq=1,
            explicit=1,
            token="tok-dir",
            remote_context="/",
            remote_name="docs",
            remote_extension="",
        ),
        dict(
            ino=3,
            parent=2,
            name="report.pdf",
            kind="file",
            mode=0o640,
            mtime_ns=3,
            ctime_ns=3,
            size=1234,
            seq=1,
            token="tok-report",
            remote_context="/docs",
            remote_name="report.pdf",
            remote_extension="pdf",
            remote_risk=json.dumps({"privifs.mode": "640"}),
            upload_digest="abc",
        ),
        dict(
            ino=4,
            parent=1,
            name="draft.txt",
            kind="file",
            mode=0o600,
            mtime_ns=4,
            ctime_ns=4,
            size=10,
            seq=2,
            staged_id="0123456789abcdef01234567",
            content_dirty=1,
            meta_dirty=1,
            upload_started=5.5,
        ),
        dict(
            ino=5,
            parent=1,
            name="link",
            kind="symlink",
            mode=0o777,
            mtime_ns=5,
            ctime_ns=5,
            size=0,
            seq=3,
            target="docs/report.pdf",
            uid=1000,
            gid=100,
            meta_dirty=1,
        ),
    ]
    for row in rows:
        values = [
            row.get(c, 0 if c in ("content_dirty", "meta_dirty", "explicit", "seq") else None) for c in PREVIOUS_COLUMNS
        ]
        conn.execute(
            f"INSERT INTO nodes ({', '.join(PREVIOUS_COLUMNS)}) VALUES ({', '.join('?' for _ in PREVIOUS_COLUMNS)})",
            values,
        )
    conn.execute("INSERT INTO tombstones (token, since) VALUES ('tok-old', 7.0)")
    conn.execute("INSERT INTO kv (key, value) VALUES ('anything', 'unused')")
    conn.commit()
    conn.close()


def test_an_index_from_before_schema_versions_is_migrated_and_keeps_its_data(tmp_path):
    path = tmp_path / "index.sqlite3"
    previous_index(path)
    index = Index(path)
    try:
        assert index.version() == namespace.SCHEMA_VERSION == len(namespace.MIGRATIONS)
        ns = Namespace(index, dir_mode=0o755, file_mode=0o644)
        report = ns.nodes[ns.by_token["tok-report"]]
        assert ns.path(report) == "/docs/report.pdf"
        assert (report.mode, report.size, report.remote_extension, report.risk()) == (
            0o640,
            1234,
            "pdf",
            {"privifs.mode": "640"},
        )
        draft = ns.child(ns.root, "draft.txt")
        assert (draft.staged_id, draft.content_dirty, draft.meta_dirty, draft.upload_started) == (
            "0123456789abcdef01234567",
            1,
            1,
            5.5,
        )
        link = ns.child(ns.root, "link")
        assert (link.target, link.uid, link.gid) == ("docs/report.pdf", 1000, 100)
        assert ns.child(ns.root, "docs").explicit == 1
        assert index.tombstones() == {"tok-old": 7.0}
        # what nothing read is gone
        columns = [r[1] for r in index.conn.execute("PRAGMA table_info(nodes)")]
        assert columns == list(COLUMNS)
        tables = {r[0] for r in index.conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        assert tables == {"nodes", "tombstones", "superseded", "retired", "counters"}
        draft.size = 11
        index.save(draft)
    finally:
        index.close()
    index = Index(path)  # opened again: nothing left to migrate, the change is there
    try:
        assert (
            Namespace(index, dir_mode=0o755, file_mode=0o644)
            .child(Namespace(index, dir_mode=0o755, file_mode=0o644).root, "draft.txt")
            .size
            == 11
        )
    finally:
        index.close()


def test_an_index_from_a_newer_privifs_is_refused_and_left_untouched(tmp_path):
    path = tmp_path / "index.sqlite3"
    Index(path).close()
    newer = namespace.SCHEMA_VERSION + 1
    conn = sqlite3.connect(path)
    conn.execute("ALTER TABLE nodes ADD COLUMN from_the_future TEXT")
    conn.execute(f"PRAGMA user_version = {newer}")
    conn.close()
    with pytest.raises(FormatVersionError) as info:
        Index(path)
    message = str(info.value)
    assert "newer privifs" in message and f"index version {newer}" in message
    assert f"up to {namespace.SCHEMA_VERSION}" in message and str(path) in message
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == newer
    conn.close()


def test_a_new_step_is_appended_and_a_failing_one_changes_nothing(tmp_path, monkeypatch):
    path = tmp_path / "index.sqlite3"
    previous_index(path)
    steps = list(namespace.MIGRATIONS)
    monkeypatch.setattr(
        namespace,
        "MIGRATIONS",
        steps
        + [
            ("later", "ALTER TABLE nodes ADD COLUMN later_ns INTEGER"),
            ("broken", "UPDATE nodes SET later_ns = mtime_ns; UPDATE no_such_table SET x = 1"),
        ],
    )
    with pytest.raises(LocalStoreError) as info:
        Index(path)
    assert f"to version {len(steps) + 2} (broken) failed" in str(info.value)
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == len(steps) + 1  # up to the good step
    assert conn.execute("SELECT COUNT(*) FROM nodes WHERE later_ns IS NOT NULL").fetchone()[0] == 0
    conn.close()
    monkeypatch.setattr(
        namespace,
        "MIGRATIONS",
        steps
        + [
            ("later", "ALTER TABLE nodes ADD COLUMN later_ns INTEGER"),
            ("fill later", lambda conn: conn.execute("UPDATE nodes SET later_ns = mtime_ns")),
        ],
    )
    index = Index(path)
    try:
        assert index.version() == len(steps) + 2
        assert index.conn.execute("SELECT later_ns FROM nodes WHERE ino = 3").fetchone()[0] == 3
        assert len(index.load()) == 5  # the explicit column list ignores a column it does not know
    finally:
        index.close()


def future_sealed(path: Path) -> Path:
    f = SealedFile.create(path, KEY)
    f.write(0, b"staged by a newer privifs")
    f.sync_header()
    f.close()
    with open(path, "r+b") as raw:
        raw.seek(8)
        raw.write(bytes([VERSION + 1]))
    return path


def test_a_sealed_file_of_a_newer_format_is_refused_naming_both_versions(tmp_path):
    path = future_sealed(tmp_path / "f")
    with pytest.raises(FormatVersionError) as info:
        SealedFile.open(path, KEY)
    assert f"version {VERSION + 1}" in str(info.value) and "newer privifs" in str(info.value)
    assert f"reads version {VERSION}" in str(info.value)


def test_staging_refuses_to_start_over_a_newer_staged_file_and_keeps_it(tmp_path):
    (tmp_path / "staging").mkdir(mode=0o700)
    path = future_sealed(tmp_path / "staging" / "0123456789abcdef01234567")
    before = path.read_bytes()
    with pytest.raises(FormatVersionError):
        Staging(tmp_path / "staging", KEY)
    assert path.read_bytes() == before


def test_a_cache_entry_of_a_newer_format_is_a_miss(tmp_path):
    cache = ContentCache(tmp_path / "cache", 1 << 30, KEY)
    try:
        assert cache.adopt("tok", str(future_sealed(tmp_path / "entry")), bound_to="tok")  # (as a download)
        assert cache.open("tok") is None
        assert cache.volume() == 0
    finally:
        cache.close()


def test_mount_says_the_index_is_from_a_newer_privifs(engine, tmp_path):
    state = tmp_path / "state-dir"
    state.mkdir(mode=0o700)
    Index(state / "index.sqlite3").close()
    conn = sqlite3.connect(state / "index.sqlite3")
    conn.execute("PRAGMA user_version = 999")
    conn.close()
    m = Mount(tmp_path / "user", engine.urls, mount_args=("--state-dir", str(state)))
    try:
        r = m.mount(check=False)
        assert r.returncode != 0
        assert "written by a newer privifs (index version 999" in r.stderr, r.stderr
        assert "Traceback" not in r.stderr + r.stdout
    finally:
        m.cleanup()

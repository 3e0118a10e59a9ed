"""The engine's listing pages (engine.pages.PageMemo) against the plain OFFSET reading, in-process
on a SQLite file with a writer connection beside the reader, as the engine has."""

from __future__ import annotations

import random
import sqlite3
from pathlib import Path

from privifs.engine import pages
from privifs.engine.pages import PageMemo


def _connections(tmp_path: Path) -> tuple[sqlite3.Connection, sqlite3.Connection]:
    writer = sqlite3.connect(tmp_path / "db.sqlite3", isolation_level=None)
    writer.execute("PRAGMA journal_mode=WAL")
    writer.execute("CREATE TABLE data_tokens (seq INTEGER PRIMARY KEY AUTOINCREMENT, profile_id TEXT, token TEXT)")
    reader = sqlite3.connect(tmp_path / "db.sqlite3", isolation_level=None)
    reader.row_factory = sqlite3.Row
    return writer, reader


def _page(memo: PageMemo, reader: sqlite3.Connection, page: int, per_page: int) -> tuple[int, list[str], list[str]]:
    """(count, the page as the memo reads it, the page as OFFSET reads it), in one snapshot."""
    reader.execute("BEGIN")
    try:
        total, rows = memo.read(reader, "profile_id = ?", ["p"], page, per_page)
        plain = reader.execute(
            "SELECT token FROM data_tokens WHERE profile_id = ? ORDER BY seq LIMIT ? OFFSET ?",
            ("p", per_page, (page - 1) * per_page),
        ).fetchall()
        count = reader.execute("SELECT COUNT(*) FROM data_tokens WHERE profile_id = ?", ("p",)).fetchone()[0]
    finally:
        reader.execute("COMMIT")
    assert total == count
    return total, [r["token"] for r in rows], [r[0] for r in plain]


def test_pages_read_in_any_order_across_writes_are_the_pages_offset_gives(tmp_path: Path) -> None:
    writer, reader = _connections(tmp_path)
    rnd = random.Random(5)
    made = 0
    for _ in range(60):
        writer.execute("INSERT INTO data_tokens (profile_id, token) VALUES ('p', ?)", (f"t{made}",))
        writer.execute("INSERT INTO data_tokens (profile_id, token) VALUES ('q', ?)", (f"other{made}",))
        made += 1
    memo = PageMemo()
    for step in range(400):
        if rnd.random() < 0.15:  # another connection writes between two pages
            if rnd.random() < 0.5:
                writer.execute("INSERT INTO data_tokens (profile_id, token) VALUES ('p', ?)", (f"t{made}",))
                made += 1
            else:
                writer.execute(
                    "DELETE FROM data_tokens WHERE seq = (SELECT seq FROM data_tokens WHERE profile_id = 'p' "
                    "ORDER BY random() LIMIT 1)"
                )
        page = rnd.choice([1, 2, 3, step % 12 + 1, step % 12 + 2, 40])
        _, mine, plain = _page(memo, reader, page, rnd.choice([5, 5, 5, 7]))
        assert mine == plain, (step, page)


def test_a_listing_read_one_token_a_page_remembers_a_bounded_number_of_pages(tmp_path: Path) -> None:
    writer, reader = _connections(tmp_path)
    for i in range(200):
        writer.execute("INSERT INTO data_tokens (profile_id, token) VALUES ('p', ?)", (f"t{i}",))
    memo = PageMemo()
    for page in range(1, 202):
        _, mine, plain = _page(memo, reader, page, 1)
        assert mine == plain
    assert all(len(ends) <= pages.ENDS for _, _, ends in memo._memo.values())

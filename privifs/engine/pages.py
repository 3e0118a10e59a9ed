"""Listing pages of data tokens, numbered as the reference numbers them (``page``, ``perPage``),
without the cost growing with the square of the vault's size.

Read naively, every page counts the profile's tokens again and skips the pages before it
(``OFFSET``): a listing of 111,602 tokens in pages of 500 cost the engine 1.4 s of counting and
1.0 s of skipping (2.4 of its 3.9 s of CPU), and ten times the tokens would cost a hundred times
that. While nothing was written since the last page was read (SQLite's ``data_version`` of the
reading connection, read inside the page's own snapshot, is unchanged), the next page starts
after the last row of the page before (``seq > ?``) and the count is the one already made. Once
anything was written, a page is read as before, so what a page shows never depends on what was
remembered: the same rows as ``ORDER BY seq LIMIT ? OFFSET ?`` in that snapshot.
"""

from __future__ import annotations

import sqlite3
from collections import OrderedDict

KEEP = 64  # listings (profile and filters, page size) remembered at once
ENDS = 16  # pages' last rows remembered per listing (readers of one listing at different pages)


class PageMemo:
    """For the listings lately read: the database version they were read at, their count, and
    the ``seq`` of the last row of each page."""

    def __init__(self) -> None:
        self._memo: OrderedDict[tuple, tuple[int, int, dict[int, int]]] = OrderedDict()

    def read(
        self, conn: sqlite3.Connection, cond: str, args: list, page: int, per_page: int
    ) -> tuple[int, list[sqlite3.Row]]:
        """(the number of tokens ``cond`` selects, the rows of page ``page``), in one snapshot:
        ``conn`` is in a read transaction."""
        conn.execute("SELECT seq FROM data_tokens LIMIT 1").fetchall()  # the snapshot starts here
        version = conn.execute("PRAGMA data_version").fetchone()[0]
        key = (cond, tuple(args), per_page)
        known = self._memo.get(key)
        if known is not None and known[0] == version:
            _, total, ends = known
        else:
            total = conn.execute(f"SELECT COUNT(*) FROM data_tokens WHERE {cond}", args).fetchone()[0]
            ends = {}
        after = ends.get(page - 1)  # (page 1 and a page after an empty one: read as ever)
        if after is not None:
            rows = conn.execute(
                f"SELECT * FROM data_tokens WHERE {cond} AND seq > ? ORDER BY seq LIMIT ?", (*args, after, per_page)
            ).fetchall()
        else:
            rows = conn.execute(
                f"SELECT * FROM data_tokens WHERE {cond} ORDER BY seq LIMIT ? OFFSET ?",
                (*args, per_page, (page - 1) * per_page),
            ).fetchall()
        if rows:
            ends.pop(page, None)
            ends[page] = rows[-1]["seq"]
            while len(ends) > ENDS:  # (perPage=1 over a big vault: bounded all the same)
                del ends[next(iter(ends))]
        self._memo[key] = (version, total, ends)
        self._memo.move_to_end(key)
        while len(self._memo) > KEEP:
            self._memo.popitem(last=False)
        return total, rows

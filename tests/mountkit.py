"""The mount helpers the tests import by this name; they live in :mod:`privifs.devkit.mount`
(shared with the scripts), and :func:`helper_link_kept`."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from privifs.devkit.mount import CMD_TIMEOUT, Mount, is_mounted, isolated_env, privifs

__all__ = ["CMD_TIMEOUT", "HELPER_LINK", "Mount", "helper_link_kept", "is_mounted", "isolated_env", "privifs"]

HELPER_LINK = Path("/sbin/mount.fuse.privifs")  # what mount(8) runs for fuse.privifs


@contextlib.contextmanager
def helper_link_kept() -> Iterator[None]:
    """``/sbin/mount.fuse.privifs`` put back as it was after the block, which may point it
    elsewhere (scripts/install, which scripts/up runs, points it at the checkout it runs in: a
    test of scripts/up left the machine's mount(8) running that checkout's helper)."""
    before = os.readlink(HELPER_LINK) if HELPER_LINK.is_symlink() else None
    try:
        yield
    finally:
        if before is None:
            if HELPER_LINK.is_symlink():
                HELPER_LINK.unlink(missing_ok=True)
        elif not HELPER_LINK.is_symlink() or os.readlink(HELPER_LINK) != before:
            tmp = HELPER_LINK.with_name(".mount.fuse.privifs.tmp")
            tmp.unlink(missing_ok=True)
            tmp.symlink_to(before)
            tmp.replace(HELPER_LINK)

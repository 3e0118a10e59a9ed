"""Staged content: files written in the mount and not yet uploaded, sealed on local disk
(see :mod:`privifs.crypto.sealed`) under ``<state>/staging/<id>``.

A staged file is kept until the vault has acknowledged the token made from it, whatever happens
in between (failed uploads, restarts, ``kill -9``). While an upload reads a staged file it is
*frozen*; a write arriving meanwhile first clones it (copy-on-write), so an upload never sends a
mix of two versions.
"""
from __future__ import annotations

import os
import secrets
import shutil
from pathlib import Path

from privifs import paths
from privifs.crypto.sealed import SealedFile, local_store_error


class StagedFile:
    __slots__ = ("id", "sealed", "frozen")

    def __init__(self, staged_id: str, sealed: SealedFile):
        self.id = staged_id
        self.sealed = sealed
        self.frozen = False

    @property
    def size(self) -> int:
        return self.sealed.size

    @property
    def path(self) -> str:
        return self.sealed.path


class Staging:
    def __init__(self, directory: Path, key: bytes):
        self.dir = directory
        paths.private_dir(self.dir)
        self._key = key

    def path(self, staged_id: str) -> Path:
        return self.dir / staged_id

    def create(self) -> StagedFile:
        staged_id = secrets.token_hex(12)
        return StagedFile(staged_id, SealedFile.create(self.path(staged_id), self._key))

    def open(self, staged_id: str) -> StagedFile:
        return StagedFile(staged_id, SealedFile.open(self.path(staged_id), self._key, writable=True))

    def clone(self, staged: StagedFile) -> StagedFile:
        """A writable copy of a frozen staged file (raw sealed bytes; no decryption)."""
        staged.sealed.sync_header()
        return self.from_sealed(staged.path)

    def from_sealed(self, source: str) -> StagedFile:
        """A staged copy of a sealed file (a cache entry or another staged file: same format and
        key, copied as it is, never decrypted)."""
        new_id = secrets.token_hex(12)
        try:
            shutil.copyfile(source, self.path(new_id))
            os.chmod(self.path(new_id), 0o600)
        except OSError as exc:
            self.path(new_id).unlink(missing_ok=True)
            raise local_store_error(exc, "staging a file for writing") from None
        return self.open(new_id)

    def remove(self, staged: StagedFile | str) -> None:
        staged_id = staged if isinstance(staged, str) else staged.id
        if isinstance(staged, StagedFile):
            staged.sealed.close()
        self.path(staged_id).unlink(missing_ok=True)

    def ids(self) -> set[str]:
        return {p.name for p in self.dir.iterdir() if p.is_file()}

    def usage(self) -> int:
        return sum(p.stat().st_blocks * 512 for p in self.dir.iterdir() if p.is_file())

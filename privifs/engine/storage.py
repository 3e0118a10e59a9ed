"""Storage devices' payload copies.

A storage device in the engine is a directory, ``<data-dir>/storage/<deviceIdentifier>/``, with
one file per permanent token. Copies are written after the token is promoted (and for existing
tokens when a device is registered), deleted with the token, and all of a device's copies go
when it is removed from storage. Start-up reconciles every device directory with the tokens.
Built from the database and the blob store it reads; knows nothing of routes or the engine.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
from pathlib import Path

import trio

from privifs.engine.blobs import BlobStore
from privifs.engine.db import Database


class StorageDevices:
    """The payload copies kept by storage devices (directories)."""

    def __init__(self, db: Database, blobs: BlobStore, root: Path):
        self.db = db
        self.blobs = blobs
        self.root = root
        self.root.mkdir(exist_ok=True, mode=0o700)

    def device_dir(self, device_id: str) -> Path:
        return self.root / device_id

    def _devices(self, profile_id: str) -> list[str]:
        return self.db.read(
            lambda c: [
                r[0]
                for r in c.execute(
                    "SELECT id FROM devices WHERE profile_id = ? AND storage = 1 AND state = 'approved'", (profile_id,)
                )
            ]
        )

    def _copy(self, blob_id: str, device_id: str, token: str) -> None:
        src = self.blobs.path(blob_id)
        d = self.device_dir(device_id)
        d.mkdir(exist_ok=True, mode=0o700)
        tmp = d / f".{token}.tmp"
        try:
            with open(src, "rb") as fin, open(tmp, "wb") as fout:
                shutil.copyfileobj(fin, fout, 1024 * 1024)
                fout.flush()
                os.fsync(fout.fileno())
            os.replace(tmp, d / token)
        except FileNotFoundError:
            tmp.unlink(missing_ok=True)  # the token was deleted meanwhile

    async def fan_out(self, profile_id: str, token: str, blob_id: str) -> None:
        for device_id in self._devices(profile_id):
            await trio.to_thread.run_sync(self._copy, blob_id, device_id, token)

    def remove_copies(self, profile_id: str, token: str) -> None:
        for device_id in self._devices(profile_id):
            (self.device_dir(device_id) / token).unlink(missing_ok=True)

    def _tokens(self, profile_id: str) -> list[sqlite3.Row]:
        return self.db.read(
            lambda c: c.execute("SELECT token, blob_id FROM data_tokens WHERE profile_id = ?", (profile_id,)).fetchall()
        )

    async def backfill(self, profile_id: str, device_id: str, rows: list[sqlite3.Row] | None = None) -> None:
        """Copy to the device every token of the profile it lacks (``rows``: the profile's tokens,
        when the caller has read them already)."""
        for r in rows if rows is not None else self._tokens(profile_id):
            if not (self.device_dir(device_id) / r["token"]).exists():
                await trio.to_thread.run_sync(self._copy, r["blob_id"], device_id, r["token"])

    def drop(self, device_id: str) -> None:
        shutil.rmtree(self.device_dir(device_id), ignore_errors=True)

    async def reconcile(self) -> None:
        """Every storage device holds exactly its profile's tokens (after a crash or a restart)."""
        devices = self.db.read(
            lambda c: c.execute(
                "SELECT id, profile_id FROM devices WHERE storage = 1 AND state = 'approved'"
            ).fetchall()
        )
        keep = {r["id"] for r in devices}
        for d in self.root.iterdir():
            if d.name not in keep:
                shutil.rmtree(d, ignore_errors=True)
        for r in devices:
            rows = self._tokens(r["profile_id"])
            tokens = {t["token"] for t in rows}
            d = self.device_dir(r["id"])
            d.mkdir(exist_ok=True, mode=0o700)
            for f in d.iterdir():
                if f.name not in tokens:
                    f.unlink(missing_ok=True)
            await self.backfill(r["profile_id"], r["id"], rows)

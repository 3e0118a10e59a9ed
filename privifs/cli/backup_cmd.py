"""privifs backup and privifs restore: one passphrase-protected file that rebuilds the vault.

backup FILE writes the AES key, the account (configuration, password or OAuth tokens, identity
key) and, when the vault is on the embedded engine, the engine's data (a consistent copy, taken
with the engine stopped: unmount first). The secrets are encrypted with a key derived from a
passphrase (scrypt, AES-256-GCM); the file is mode 0600. restore FILE rebuilds all of it on a
clean home and refuses to overwrite an existing configuration, secret or engine data.

The passphrase comes from --passphrase-file, PRIVIFS_BACKUP_PASSPHRASE, or a prompt.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from privifs import paths
from privifs.backup import check_backup_target, check_restore, restore_backup, write_backup
from privifs.cli.commands import help_of
from privifs.cli.mounttable import changes_waiting
from privifs.cli.prompt import ask_secret
from privifs.config import default_config_path, load
from privifs.words import count, verb


def register(sub) -> None:
    b = sub.add_parser("backup", help=help_of("backup"), description=__doc__)
    b.add_argument("file", type=Path, help="the backup file to create (never overwritten)")
    b.add_argument("--passphrase-file", type=Path, help="read the passphrase from this file")
    b.set_defaults(func=run_backup)
    r = sub.add_parser("restore", help=help_of("restore"), description=__doc__)
    r.add_argument("file", type=Path, help="a file made by 'privifs backup'")
    r.add_argument("--passphrase-file", type=Path, help="read the passphrase from this file")
    r.set_defaults(func=run_restore)


def passphrase(args: argparse.Namespace, confirm: bool) -> str:
    return ask_secret(
        "passphrase",
        "Backup passphrase",
        file=args.passphrase_file,
        env="PRIVIFS_BACKUP_PASSPHRASE",
        flag="--passphrase-file",
        confirm=confirm,
    )


class TerminalProgress:
    """``label: 12.0 of 40.0 MiB`` on one refreshed line of a terminal; silent otherwise."""

    def __init__(self, label: str):
        self.label = label
        self.shown = sys.stderr.isatty()

    def __call__(self, done: int, total: int) -> None:
        if self.shown:
            sys.stderr.write(f"\r\x1b[K{self.label}: {done / 2**20:.1f} of {total / 2**20:.1f} MiB")
            sys.stderr.flush()

    def __enter__(self) -> TerminalProgress:
        return self

    def __exit__(self, *exc) -> None:
        if self.shown:
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()


def run_backup(args: argparse.Namespace) -> int:
    cfg = load(args.config)
    check_backup_target(args.file)  # before the passphrase is asked for twice
    secret = passphrase(args, confirm=True)
    with TerminalProgress("backing up the vault's data") as progress:
        summary = write_backup(cfg, args.file, secret, progress=progress)
    data = (
        f", the embedded engine's data ({summary.blobs} blobs, {summary.blob_bytes / 2**20:.1f} MiB)"
        if summary.embedded
        else " (the data stays on the server)"
    )
    print(f"backup written to {args.file}: key, account of {summary.username}{data}")
    print("Keep it and its passphrase apart; 'privifs restore FILE' rebuilds the vault on a clean home.")
    if summary.missing:
        print(
            f"privifs: warning: {summary.missing} data files of the vault were already missing from the "
            "engine's data, so the files they held are damaged in the vault and in this backup; "
            "'privifs verify --data' names them ('--repair' restores those still in this machine's cache).",
            file=sys.stderr,
        )

    state = paths.vault_state_dir(cfg)
    waiting = sum(changes_waiting(state) or ())
    if waiting:
        print(
            f"privifs: warning: {count(waiting, 'change')} made in the mount {verb(waiting, 'is', 'are')} "
            f"not in the vault yet (staged in {state}; the last mount ended before uploading "
            f"{verb(waiting, 'it', 'them')}), so this backup does not hold {verb(waiting, 'it', 'them')}. "
            "Mount and unmount ('privifs umount' waits for the uploads), then back up again.",
            file=sys.stderr,
        )
    return 0


def run_restore(args: argparse.Namespace) -> int:
    cfg_path = args.config or default_config_path()
    check_restore(args.file, cfg_path)  # before the passphrase is asked for
    secret = passphrase(args, confirm=False)
    with TerminalProgress("restoring the vault's data") as progress:
        summary = restore_backup(args.file, secret, cfg_path, progress=progress)
    where = (
        f"the embedded engine ({summary.blobs} blobs, {summary.blob_bytes / 2**20:.1f} MiB)"
        if summary.embedded
        else "the server"
    )
    print(f"restored the vault of {summary.username} on {where}; configuration: {cfg_path}")
    # a configuration of its own must be named to mount (the default one is not there)
    named = "" if cfg_path == default_config_path() else f" --config {shlex.quote(str(cfg_path))}"
    print(f"Mount it with 'privifs{named} mount DIR'.")
    if summary.damaged or summary.lost:
        said = []
        if summary.damaged:
            said.append(f"e.g. {summary.damaged[0]}: not the bytes backed up, restored as they are")
        if summary.lost:
            said.append(f"e.g. {summary.lost[0]}: its header in the backup is damaged, left out")
        print(
            f"privifs: error: {len(summary.damaged) + len(summary.lost)} of the backup's {summary.blobs} data "
            f"files are damaged ({'; '.join(said)}), so the files they hold fail to read (EIO) and the rest "
            "of the vault is there. 'privifs verify --data' names those files; restore them from another "
            "backup or copy.",
            file=sys.stderr,
        )
        return 6
    if summary.digests_damaged and summary.embedded and summary.blobs:
        print(
            "privifs: error: the backup's digests of its data files are damaged, so they could not "
            "be checked: the vault is restored, and a damaged data file among them would fail to read "
            "(EIO). 'privifs verify --data' checks the restored vault and names such files.",
            file=sys.stderr,
        )
        return 6
    if summary.unchecked and summary.embedded and summary.blobs:
        print(
            "privifs: warning: the backup's data files could not be checked (it holds no digests of "
            "them, or they are damaged); 'privifs verify --data' checks the restored vault.",
            file=sys.stderr,
        )
    return 0

"""The sub-commands of ``privifs``: which module registers each, and its one-line help.

A command line loads only the module of the command it names (``privifs status`` needs none of
the client, trio or httpx, which cost 0.4 s of CPU to import); the others appear in the parser
with their help alone. ``privifs --help``, and a line naming no known command, load them all.
"""

from __future__ import annotations

# command -> (module in privifs.cli, help); in the order ``privifs --help`` lists them
COMMANDS: dict[str, tuple[str, str]] = {
    "init": ("init_cmd", "write the configuration and keys (and register a profile)"),
    "mount": ("mount_cmd", "mount the vault as a drive"),
    "umount": ("status_cmd", "upload what is pending and unmount"),
    "status": ("status_cmd", "pending uploads, cache, last refresh and errors of mounts"),
    "token": ("token_cmd", "list, store, fetch, rename and delete data tokens directly"),
    "backup": ("backup_cmd", "write the key, account and embedded engine data to a protected file"),
    "restore": ("backup_cmd", "rebuild the configuration, key and vault from a backup on a clean home"),
    "engine": ("engine_cmd", "run the local Privicore-compatible engine"),
    "verify": ("verify_cmd", "check the vault: local index against the listing; --data: every token's tag"),
}


def help_of(command: str) -> str:
    return COMMANDS[command][1]


def named_command(argv: list[str]) -> str | None:
    """The sub-command ``argv`` names (the first argument that is neither an option of
    ``privifs`` itself nor its value), if it is a known one."""
    args = iter(argv)
    for arg in args:
        if arg == "--config":
            next(args, None)
        elif not arg.startswith("-"):
            return arg if arg in COMMANDS else None
    return None

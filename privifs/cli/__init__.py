"""The ``privifs`` command line: one sub-command per module in this package.

Every failure ends in :func:`privifs.cli.failures.report`: one clear line and a documented exit
code per kind of failure; tracebacks are shown only with ``--debug`` (unexpected errors also go
to the CLI log).
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
import textwrap

from privifs.cli.failures import EXIT_USAGE, LOG_FORMAT, OneLineFormatter, StderrLog, report

_MARKUP = re.compile(r"``([^`]*)``|:[a-z]+:`~?([^`]*)`")


def plain(text: str | None) -> str | None:
    """A docstring as help text: reStructuredText markup (````x````, ``:mod:`x```) removed."""
    return None if text is None else _MARKUP.sub(lambda m: m.group(1) if m.group(1) is not None else m.group(2), text)


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (``privifs mount: error: …``) and help without markup."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        text = plain(kwargs.get("description"))
        kwargs["description"] = textwrap.fill(text, 96) if text and "\n" not in text.strip() else text
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The whole command line's parser; for ``argv`` naming a known command, only that
    command's module is loaded (see :mod:`privifs.cli.commands`)."""
    import importlib
    from pathlib import Path

    from privifs.about import summary, version
    from privifs.cli.commands import COMMANDS, named_command

    parser = Parser(prog="privifs", description=summary())
    parser.add_argument("--version", action="version", version=f"privifs {version()}")
    parser.add_argument("--debug", action="store_true", help="verbose logs and tracebacks")
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        help="configuration file (default $PRIVIFS_CONFIG or ~/.config/privifs/config.toml)",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=Parser)
    named = named_command(argv) if argv is not None else None
    registered: set[str] = set()
    for command, (module, text) in COMMANDS.items():
        if command in registered:
            continue
        if named is None or COMMANDS[named][0] == module:
            importlib.import_module(f"privifs.cli.{module}").register(sub)
            registered.update(c for c, (m, _) in COMMANDS.items() if m == module)
        else:
            sub.add_parser(command, help=text)  # (not this command line's: its help alone)
    _config_after_the_command(sub, Path)
    return parser


def _config_after_the_command(sub: argparse._SubParsersAction, path_type) -> None:
    """``--config FILE`` after the command too (``privifs mount --config FILE DIR``: the order
    in which the README names them), in every command and subcommand; the one given before the
    command counts when none is given after it (helper hK: "unrecognized arguments: --config
    DIR", naming the mountpoint as the file)."""
    for command in sub.choices.values():
        if not any("--config" in a.option_strings for a in command._actions):
            command.add_argument("--config", type=path_type, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        for action in command._actions:
            if isinstance(action, argparse._SubParsersAction):
                _config_after_the_command(action, path_type)


# commands that do not read the configuration (they ask a mount's daemon, or run a server): one
# another user owns does not concern them (status and umount of a running mount were refused)
NO_CONFIGURATION = frozenset({"status", "umount", "engine"})


def main(argv: list[str] | None = None) -> int:
    from privifs.nodump import forbid_core_dumps

    forbid_core_dumps()  # before any key or password is read
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    quiet = args.command not in ("engine", "mount")
    stderr = StderrLog(sys.stderr)
    stderr.setFormatter(OneLineFormatter(LOG_FORMAT))  # the engine's log too: paths clients sent
    logging.basicConfig(
        level=logging.DEBUG if args.debug else (logging.WARNING if quiet else logging.INFO), handlers=[stderr]
    )
    for noisy in ("httpx", "httpcore", "hypercorn.error", "trio-websocket"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        from privifs.config import check_config_path, check_not_shared, default_config_path

        if args.command not in NO_CONFIGURATION:
            check_not_shared(check_config_path(args.config or default_config_path()))
        code = int(args.func(args) or 0)
        sys.stdout.flush()
        return code
    except SystemExit:
        raise
    except BaseException as exc:  # noqa: BLE001 - the one place every failure is reported
        return report(exc, args.debug)

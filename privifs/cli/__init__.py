"""The ``privifs`` command line: one sub-command per module in this package.

Failures print one clear line (``privifs: error: …``) and exit non-zero; tracebacks are shown
only with ``--debug``.
"""
from __future__ import annotations

import argparse
import logging
import sys

from privifs.errors import PrivifsError, first_privifs_error


def build_parser() -> argparse.ArgumentParser:
    from pathlib import Path

    from privifs.cli import engine_cmd, init_cmd, mount_cmd, token_cmd, verify_cmd

    parser = argparse.ArgumentParser(prog="privifs", description=__import__("privifs").__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="verbose logs and tracebacks")
    parser.add_argument("--config", type=Path, default=None,
                        help="configuration file (default $PRIVIFS_CONFIG or ~/.config/privifs/config.toml)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    init_cmd.register(sub)
    mount_cmd.register(sub)
    token_cmd.register(sub)
    engine_cmd.register(sub)
    verify_cmd.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    quiet = args.command not in ("engine", "mount")
    logging.basicConfig(level=logging.DEBUG if args.debug else (logging.WARNING if quiet else logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("httpx", "httpcore", "hypercorn.error", "trio-websocket"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return int(args.func(args) or 0)
    except PrivifsError as exc:
        if args.debug:
            raise
        print(f"privifs: error: {exc}", file=sys.stderr)
        return 1
    except BaseExceptionGroup as group:
        inner = first_privifs_error(group)
        if inner is None or args.debug:
            raise
        print(f"privifs: error: {inner}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("privifs: interrupted", file=sys.stderr)
        return 130

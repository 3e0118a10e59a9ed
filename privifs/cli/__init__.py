"""The ``privifs`` command line: one sub-command per module in this package.

Failures print one clear line (``privifs: error: …``) and exit non-zero; tracebacks are shown
only with ``--debug``.
"""
from __future__ import annotations

import argparse
import logging
import sys

from privifs.errors import PrivifsError


def build_parser() -> argparse.ArgumentParser:
    from privifs.cli import engine_cmd

    parser = argparse.ArgumentParser(prog="privifs", description=__import__("privifs").__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="verbose logs and tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    engine_cmd.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO,
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
    except KeyboardInterrupt:
        print("privifs: interrupted", file=sys.stderr)
        return 130

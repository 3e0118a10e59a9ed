"""privifs engine: run the local Privicore-compatible engine in the foreground."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import stat
import sys
from pathlib import Path

import trio

from privifs import paths
from privifs.cli.commands import help_of
from privifs.cli.failures import LocalFileError
from privifs.cli.options import port
from privifs.errors import ConfigError


def register(sub) -> None:
    p = sub.add_parser(
        "engine",
        help=help_of("engine"),
        description="Run the local Privicore-compatible engine until SIGTERM or SIGINT.",
    )
    p.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help=f"where the engine keeps its state (default {paths.embedded_engine_dir()})",
    )
    p.add_argument("--host", default="127.0.0.1", help="the address to listen on (default 127.0.0.1)")
    p.add_argument("--api-port", type=port, default=8009, help="REST API port (default 8009; 0: any free port)")
    p.add_argument("--ws-port", type=port, default=8083, help="WebSocket port (default 8083)")
    p.add_argument("--upstream-port", type=port, default=8010, help="upload stream port (default 8010)")
    p.add_argument("--downstream-port", type=port, default=8011, help="download stream port (default 8011)")
    p.add_argument(
        "--urls-file", type=Path, default=None, help="write the servers' URLs here as JSON once every server listens"
    )
    p.add_argument(
        "--set",
        dest="settings",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        type=setting,
        help="set an engine option (fault injection, wire shapes, limits); see docs/engine.md",
    )
    p.set_defaults(func=run)


def setting(text: str) -> str:
    """An engine option as --set takes it, checked: a bad one is a bad command line (exit 2,
    as for every other option value; it was exit 3, a configuration error)."""
    from privifs.engine.options import EngineOptions, parse_settings

    try:
        EngineOptions().update(parse_settings([text]))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def check_urls_file(path: Path) -> None:
    """Refuse a ``--urls-file`` that would replace another file than a URLs file (one the engine
    wrote at an earlier start): a mistyped path must not destroy, say, the vault's AES key."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise LocalFileError(f"cannot write the URLs file {path}: {exc.strerror}") from None
    urls = None
    if stat.S_ISREG(st.st_mode) and st.st_size == 0:
        return  # nothing to lose (what an engine before 2026-12-07 left after a power cut)
    if stat.S_ISREG(st.st_mode) and st.st_size <= 65536:
        try:
            urls = json.loads(path.read_bytes())
        except (OSError, ValueError):
            urls = None
    if not (isinstance(urls, dict) and "api" in urls):
        raise LocalFileError(
            f"{path} exists and is not a URLs file the engine wrote; the engine never overwrites "
            "another file: name a new one for --urls-file"
        )


def _take_back(data_dir: Path, made: list[Path]) -> None:
    """Remove the data directory a start that failed made (its database, identity key and admin
    token, nothing ever served), only while this process still holds the engine's lock on it: an
    engine started on the same new directory at the same moment, which made it first or took it
    since, keeps it (hAT F1: the start that lost the race removed the running engine's data)."""
    if paths.flock_holder(data_dir / "lock") == os.getpid():
        shutil.rmtree(data_dir, ignore_errors=True)
    paths.remove_made(made)  # (the empty directories only)


def run(args: argparse.Namespace) -> int:
    from privifs.engine.options import EngineOptions, parse_settings
    from privifs.engine.server import leaves, run_engine

    opts = EngineOptions()
    try:
        opts.update(parse_settings(args.settings))
    except ValueError as exc:
        raise ConfigError(f"bad --set: {exc}") from None
    if args.urls_file is not None:
        check_urls_file(args.urls_file)
    ports = {
        "api": args.api_port,
        "ws": args.ws_port,
        "upstream": args.upstream_port,
        "downstream": args.downstream_port,
    }
    data_dir = args.data_dir or paths.embedded_engine_dir()

    served = []  # a line announced: the engine served

    def announce(line: str) -> None:
        served.append(line)
        print(line, flush=True)

    from privifs.engine.core import EngineBusy
    from privifs.limits import raise_limits
    from privifs.memory import bound_allocator

    bound_allocator()
    raise_limits()
    made = paths.missing_dirs(data_dir)  # what a start that fails takes back (hAO F9: it stayed)
    try:
        trio.run(lambda: run_engine(data_dir, args.host, ports, opts, args.urls_file, announce=announce))
    except (OSError, EngineBusy, ExceptionGroup) as exc:
        causes = leaves(exc)
        if not all(isinstance(e, (OSError, EngineBusy)) for e in causes):
            raise
        if made and not served and not any(isinstance(e, EngineBusy) for e in causes):
            _take_back(data_dir, made)
        print(f"privifs: error: the engine could not start: {causes[0]}", file=sys.stderr)
        return 1
    return 0

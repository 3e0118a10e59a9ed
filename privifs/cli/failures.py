"""How the command line ends: one exit code per kind of failure, one line per message, and no
traceback for anything but ``--debug``.

=====  ==========================================================================================
code   meaning
=====  ==========================================================================================
0      done
1      the vault or server refused or failed (unknown token, wrong password, rejected command)
2      bad command line: unknown option, bad value (``--refresh-interval 0``)
3      configuration or keys: missing or invalid configuration, unreadable, wrong or foreign key
4      a local file or directory: missing, a directory where a file is expected, no permission,
       full disk; ``umount`` of a busy mount (it stays mounted)
5      the server cannot be reached
6      integrity failure: data that fails authentication (tampered, or another key)
7      ``umount``: unmounted, but changes stay staged (uploaded at the next mount)
8      ``status``: a mount is dead (its daemon crashed or was killed), or its daemon is stopped
       or does not answer
70     an unexpected internal error: a short message here, the traceback in the CLI log
130    interrupted (Ctrl-C)
141    the output pipe closed early (``privifs status | head -1``); nothing is printed
=====  ==========================================================================================
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import sys
import traceback
from pathlib import Path

from privifs import paths
from privifs.errors import (
    ConfigError,
    DiskFullError,
    IntegrityError,
    KeyFileError,
    LocalStoreError,
    PrivifsError,
    ServerUnreachable,
    WrongKeyError,
)
from privifs.words import printable

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_CONFIG = 3
EXIT_LOCAL = 4
EXIT_UNREACHABLE = 5
EXIT_INTEGRITY = 6
EXIT_STAGED = 7
EXIT_DEAD_MOUNT = 8
EXIT_BUG = 70
EXIT_INTERRUPTED = 130
EXIT_PIPE = 141


class LocalFileError(PrivifsError):
    """A file or directory the user named cannot be used as asked."""


class ExitStatus(PrivifsError):
    """A command's outcome that is reported as ``message`` with a specific exit code."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


def exit_code(exc: PrivifsError) -> int:
    if isinstance(exc, ExitStatus):
        return exc.code
    if isinstance(exc, (ConfigError, KeyFileError, WrongKeyError)):
        return EXIT_CONFIG
    if isinstance(exc, (LocalFileError, LocalStoreError, DiskFullError)):
        return EXIT_LOCAL
    if isinstance(exc, ServerUnreachable):
        return EXIT_UNREACHABLE
    if isinstance(exc, IntegrityError):
        return EXIT_INTEGRITY
    return EXIT_FAILED


def os_error_message(exc: OSError) -> str:
    what = exc.strerror or str(exc)
    names = [n for n in (exc.filename, exc.filename2) if n]
    return f"{what}: {' -> '.join(map(str, names))}" if names else what


def leaves(exc: BaseException):
    """The exceptions inside ``exc``, exception groups opened."""
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            yield from leaves(inner)
    else:
        yield exc


LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class OneLineFormatter(logging.Formatter):
    """Each log record on one line (a traceback, with ``--debug`` or for a bug, still follows on
    its own lines): a line break in a message is written ``\\n``. Messages carry file names a
    program or another machine sharing the vault chose: a token named ``x\\n2026-… INFO
    privifs.fs.daemon: …`` wrote a line of its own into the mount log, indistinguishable from the
    daemon's. Every other character that is not printable is escaped too (``\\x1b``)."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        # and escape sequences, which 'tail -f' and 'less -R' of the log would act on (hAH F7)
        return printable(super().formatMessage(record))


class DropsUnwritable(logging.Handler):
    """A log handler mixin: a record it cannot write (the log's disk full) is dropped and
    counted, and the next record written is followed by a line saying how many went. logging's
    default prints a traceback to stderr instead, and the daemon's and the engine's stderr is
    their log file itself: a full disk put "--- Logging error ---" tracebacks into it."""

    lost = 0

    def handleError(self, record: logging.LogRecord) -> None:
        self.lost += 1

    def emit(self, record: logging.LogRecord) -> None:
        lost = self.lost
        super().emit(record)
        if lost and self.lost == lost:  # written again
            self.lost = 0
            note = logging.LogRecord(
                "privifs.log",
                logging.WARNING,
                __file__,
                0,
                "%d log records before this one were lost: the log could not be written (its disk full?)",
                (lost,),
                None,
            )
            super().emit(note)


class StderrLog(DropsUnwritable, logging.StreamHandler):
    """Log records to stderr (the engine's log file when it runs embedded)."""


def cli_log_path() -> Path:
    return paths.state_dir() / "cli.log"


def _log_bug(exc: BaseException) -> Path | None:
    """Append the traceback to the CLI log (rotated, 0600); None if even that is impossible."""
    path = cli_log_path()
    try:
        paths.private_dir(path.parent)
        # backslashreplace: an argument that is not UTF-8 (a lone surrogate) must not make
        # writing the log fail with a traceback of its own on the terminal
        handler = logging.handlers.RotatingFileHandler(path, maxBytes=1 << 20, backupCount=2, errors="backslashreplace")
        os.chmod(path, 0o600)
        record = logging.LogRecord(
            "privifs.cli", logging.ERROR, __file__, 0, "unexpected error in %s", (" ".join(sys.argv),), None
        )
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        handler.emit(record)
        handler.stream.write("".join(traceback.format_exception(exc)))
        handler.close()
        return path
    except OSError:
        return None


def _silence_stdout() -> None:
    """After a broken pipe, point stdout at /dev/null so the flush at exit cannot fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass


def report(exc: BaseException, debug: bool) -> int:
    """Print one line for ``exc`` (the traceback too with ``--debug``) and return the exit code."""
    found = list(leaves(exc))
    if any(isinstance(e, BrokenPipeError) for e in found):
        _silence_stdout()
        return EXIT_PIPE
    if any(isinstance(e, KeyboardInterrupt) for e in found):
        print("privifs: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    if debug:
        traceback.print_exception(exc)
    known = next((e for e in found if isinstance(e, PrivifsError)), None)
    if known is not None:
        print(f"privifs: error: {known}", file=sys.stderr)
        return exit_code(known)
    oserr = next((e for e in found if isinstance(e, OSError)), None)
    if oserr is not None:
        print(f"privifs: error: {os_error_message(oserr)}", file=sys.stderr)
        return EXIT_LOCAL
    where = _log_bug(exc)
    first = found[0] if found else exc
    print(
        f"privifs: internal error: {type(first).__name__}: {first}; "
        + (f"the details are in {where} (please report it)" if where else "run again with --debug for details"),
        file=sys.stderr,
    )
    return EXIT_BUG

"""Process limits of the long-running processes (the mount daemon, the engine).

The daemon keeps a descriptor per open file and per upload in flight (a staged file nothing
uses is closed until its next use: :meth:`privifs.crypto.sealed.SealedFile.park`, so how many
files wait for their upload is not bounded by this limit), and the engine one per connection.
Under the usual soft limit of 1024 open files a mount holding about a thousand unuploaded files
(an untar while the server is slow or unreachable) failed every further create with EIO and
could no longer answer its control socket, before staged files were closed. The soft limit is
raised to the hard one, as the hard limit exists to allow. So is the limit of a file's size
(``ulimit -f`` in the shell that mounted): staging a file past it failed the program's write with
EIO and left the file cut short (helper hAO F6). A hard limit that is still reached answers the
program with that errno (EMFILE, EFBIG; :mod:`privifs.fs.errnos`).
"""

from __future__ import annotations

import logging
import resource

log = logging.getLogger("privifs.limits")


def _raise(limit: int, what: str) -> int:
    """Raise this process's soft ``limit`` to its hard one; returns the soft limit now."""
    soft, hard = resource.getrlimit(limit)
    if soft == resource.RLIM_INFINITY or (soft >= hard and hard != resource.RLIM_INFINITY):
        return soft
    try:
        resource.setrlimit(limit, (hard, hard))
    except (ValueError, OSError) as exc:
        log.debug("%s limit left at %d: %s", what, soft, exc)
        return soft
    return hard


def raise_open_files_limit() -> int:
    """Raise this process's soft limit of open files to its hard limit; returns the limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:  # (an unlimited hard limit is refused as a soft one)
        return soft
    return _raise(resource.RLIMIT_NOFILE, "open files")


def raise_limits() -> None:
    """Raise the soft limits of open files and of a file's size to the hard ones."""
    raise_open_files_limit()
    _raise(resource.RLIMIT_FSIZE, "file size")

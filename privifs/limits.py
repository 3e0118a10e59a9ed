"""Process limits of the long-running processes (the mount daemon, the engine).

The daemon keeps a descriptor per open file and per upload in flight (a staged file nothing
uses is closed until its next use: :meth:`privifs.crypto.sealed.SealedFile.park`, so how many
files wait for their upload is not bounded by this limit), and the engine one per connection.
Under the usual soft limit of 1024 open files a mount holding about a thousand unuploaded files
(an untar while the server is slow or unreachable) failed every further create with EIO and
could no longer answer its control socket, before staged files were closed. The soft limit is
raised to the hard one, as the hard limit exists to allow.
"""

from __future__ import annotations

import logging
import resource

log = logging.getLogger("privifs.limits")


def raise_open_files_limit() -> int:
    """Raise this process's soft limit of open files to its hard limit; returns the limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft == resource.RLIM_INFINITY or soft >= hard:
        return soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError) as exc:
        log.debug("open files limit left at %d: %s", soft, exc)
        return soft
    return hard

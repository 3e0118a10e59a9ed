"""The errno a FUSE request answers with, chosen from the error's type — in this one table.

Modules below the FUSE layer (write-back, cache, staging, refresh, the client) raise errors of
:mod:`privifs.errors` and never choose an errno; :mod:`privifs.fs.operations` (every handler) and
:mod:`privifs.fs.filesystem` (where it answers for one operation, like a failed fetch) ask
:func:`errno_for`. The first row whose type the error is an instance of decides; anything else is
EIO (the vault failed, or something unexpected).
"""

from __future__ import annotations

import errno

from privifs.errors import (
    AuthenticationError,
    AuthorizationError,
    CallerKilled,
    ConflictError,
    DiskFullError,
    ForbiddenError,
    NodeGone,
    NoRoomInVault,
    NotFoundError,
    PermissionRefused,
    ProcessLimitError,
)

ERRNOS: tuple[tuple[type[BaseException], int], ...] = (
    (DiskFullError, errno.ENOSPC),  # the local disk is full: the program can free space
    (NoRoomInVault, errno.ENOSPC),  # an fsync the vault has no room for: the data stays staged
    (NodeGone, errno.ENOENT),  # the entry left the tree meanwhile
    (NotFoundError, errno.ENOENT),
    (AuthenticationError, errno.EACCES),
    (AuthorizationError, errno.EACCES),
    (ForbiddenError, errno.EACCES),
    (PermissionRefused, errno.EACCES),  # a command rejected as not allowed for this profile
    (ConflictError, errno.EEXIST),
    (CallerKilled, errno.EINTR),  # (the program is being killed: it never sees it)
)

# local OS errors keep these errnos (the disk or quota is full); any other becomes EIO
OS_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# and these (a limit of the daemon reached: no descriptor left, a file past the size allowed)
LIMIT_ERRNOS = (errno.EMFILE, errno.ENFILE, errno.EFBIG)


def errno_for(exc: BaseException) -> int:
    """The errno to answer with for ``exc``."""
    if isinstance(exc, OSError):
        return exc.errno if exc.errno in OS_ERRNOS or exc.errno in LIMIT_ERRNOS else errno.EIO
    if isinstance(exc, ProcessLimitError):
        return exc.errno
    return next((code for kind, code in ERRNOS if isinstance(exc, kind)), errno.EIO)

"""Keeping the key and plaintext out of core dumps: every privifs process (the mount daemon, the
engine, the token, backup and init commands) holds the AES key, passwords or decrypted content
in memory. A crash of one (a bug in a C extension, a stray SIGSEGV or SIGABRT) with core dumps
allowed (``ulimit -c unlimited``, which developers often set) wrote that memory to a core file
beside the process's working directory, ``/`` for a daemon. Each process marks itself not
dumpable (``PR_SET_DUMPABLE`` 0, as ssh-agent and gpg-agent do: no core file, whatever the
limit or ``core_pattern``, and other unprivileged processes of the same user cannot attach to
it or read its memory) and sets its core size limit to 0, which its children inherit.
"""

from __future__ import annotations

import ctypes
import logging
import resource

log = logging.getLogger("privifs.nodump")

PR_SET_DUMPABLE = 4  # <linux/prctl.h>


def forbid_core_dumps() -> None:
    """Mark this process not dumpable and its core size limit 0. A failure is logged, never
    raised: the command runs on (a kernel without prctl would be the only cause)."""
    try:
        resource.setrlimit(resource.RLIMIT_CORE, (0, resource.getrlimit(resource.RLIMIT_CORE)[1]))
    except (ValueError, OSError) as exc:
        log.debug("cannot set the core size limit to 0: %s", exc)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
            log.debug("prctl(PR_SET_DUMPABLE, 0) failed: errno %d", ctypes.get_errno())
    except (OSError, AttributeError) as exc:
        log.debug("cannot mark the process not dumpable: %s", exc)

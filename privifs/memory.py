"""How the long-running processes (the mount daemon, the engine) keep their resident memory
bounded: glibc's allocator keeps few arenas, and freed memory is handed back to the system.

The 4 MiB parts and blobs that pass through these processes are served from the heap once
glibc's dynamic mmap threshold has risen (it does after the first large free), and by default
each worker thread may get an arena of its own; memory freed there is kept for reuse, so RSS
ratchets up with every big transfer. Serving large blocks from mmap instead returns them at
once but costs a page fault per 4 KiB on every allocation (measured: 1 GiB written at 101-110
against 140-158 MB/s), so the heap is kept and ``malloc_trim`` gives its free pages back when
the process has grown (:func:`trim_memory`). Settings a user made through ``MALLOC_ARENA_MAX``
are kept.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

import trio

log = logging.getLogger("privifs.memory")

M_ARENA_MAX = -8  # <malloc.h>
ARENAS = 2
TRIM_EVERY = 2.0  # seconds between looks at the resident size
TRIM_ABOVE = 96 * 1024 * 1024  # trim only when resident memory grew past this
_PAGE = os.sysconf("SC_PAGE_SIZE")


def _libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        libc.mallopt.argtypes, libc.mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
        libc.malloc_trim.argtypes, libc.malloc_trim.restype = (ctypes.c_size_t,), ctypes.c_int
    except (OSError, AttributeError, TypeError):  # not glibc: nothing to tune
        return None
    return libc


def bound_allocator() -> bool:
    """Limit glibc to :data:`ARENAS` arenas; False where there is no glibc."""
    libc = _libc()
    if libc is None:
        return False
    if "MALLOC_ARENA_MAX" not in os.environ and libc.mallopt(M_ARENA_MAX, ARENAS) != 1:
        log.warning("mallopt(M_ARENA_MAX) was refused; resident memory may stay higher")
    return True


def resident() -> int:
    """This process's resident set size in bytes."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


async def trim_memory() -> None:
    """Runs for the process's lifetime: every :data:`TRIM_EVERY` seconds, if the resident size
    is above :data:`TRIM_ABOVE` and grew since the last trim, give the heap's free pages back."""
    libc = _libc()
    if libc is None:
        return
    floor = TRIM_ABOVE
    failing = False
    while True:
        await trio.sleep(TRIM_EVERY)
        try:
            if resident() > floor:
                await trio.to_thread.run_sync(libc.malloc_trim, 0)
                floor = max(TRIM_ABOVE, resident())
        except FileNotFoundError as exc:  # no /proc: nothing to measure, so nothing to do
            log.info("memory trimming stopped: %s", exc)
            return
        except OSError as exc:  # e.g. EMFILE while a flood of connections holds every descriptor:
            if not failing:  # passing; trimming stopped for good here once, and memory grew unchecked
                log.info("memory trimming skipped until /proc can be read again: %s", exc)
            failing = True
        else:
            failing = False

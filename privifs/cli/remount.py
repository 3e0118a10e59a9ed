"""``mount -o remount,…`` of a privifs mount: what the kernel can change while the daemon serves on.

A FUSE mount's read-only state and its per-mount flags (noexec, the atime family) belong to the
kernel, which changes them with ``mount(2)``'s ``MS_REMOUNT`` and never asks the daemon; the
daemon's own options (cache size, fsync mode, ownership, …) cannot change under a running mount.
So a remount here:

* switches ``ro``/``rw`` (``rw`` is refused for a mount whose daemon was started read-only, which
  would go on answering every write EROFS) and sets ``noexec`` as the options say, as mount(2)
  does: mount(8) hands the helper the mount's whole new state (its current options, or its
  fstab line, merged with ``-o``; an ``exec`` there is the absence of ``noexec``, so keeping
  the current ``noexec`` when it was not named made ``mount -o remount,exec DIR`` a no-op).
  ``ro``/``rw``, and the atime family with ``nodiratime``, stay as they are when none of them is
  named (mount(8) always names ``ro`` or ``rw``; a hand-made call may not);
* always keeps ``nosuid`` and ``nodev``, as every privifs mount has them (a vault's set-user-ID
  files and device nodes do nothing here; ``suid`` and ``dev`` are ignored at mount time too);
* leaves the daemon's options as they are, and says so on stderr for each one given (mount(8)
  repeats an fstab line's options at every remount).

A read-only remount waits for nothing: uploads of what was written before it go on in the
background, and changes other machines make still appear. The kernel refuses it (EBUSY) while a
file is open for writing or mapped writable (an mmap outlives its file descriptor).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT = 32
MS_NOATIME, MS_NODIRATIME = 1024, 2048
MS_RELATIME, MS_STRICTATIME = 1 << 21, 1 << 24
MS_NOSYMFOLLOW = 256

# the flags /proc/mounts shows for the mount now, as mount(2) flags (no atime word: strictatime)
_CURRENT = {
    "ro": MS_RDONLY,
    "noexec": MS_NOEXEC,
    "noatime": MS_NOATIME,
    "nodiratime": MS_NODIRATIME,
    "relatime": MS_RELATIME,
}
_ATIME = MS_NOATIME | MS_RELATIME | MS_STRICTATIME
# option -> (flags it clears, flags it sets)
FLAG_OPTIONS: dict[str, tuple[int, int]] = {
    "ro": (0, MS_RDONLY),
    "rw": (MS_RDONLY, 0),
    "noexec": (0, MS_NOEXEC),
    "exec": (MS_NOEXEC, 0),
    "noatime": (_ATIME, MS_NOATIME),
    "relatime": (_ATIME, MS_RELATIME),
    "strictatime": (_ATIME, MS_STRICTATIME),
    "atime": (_ATIME, MS_RELATIME),  # the kernel's default
    "norelatime": (MS_RELATIME, 0),
    "nostrictatime": (MS_STRICTATIME, MS_RELATIME),
    "nodiratime": (0, MS_NODIRATIME),
    "diratime": (MS_NODIRATIME, 0),
    "nosymfollow": (0, MS_NOSYMFOLLOW),  # as noexec: on when named (mount(8) names it while set)
    "symfollow": (MS_NOSYMFOLLOW, 0),
}
# what the kernel shows as the mount's options (mount(8) may repeat them): nothing to change
KERNEL_OPTIONS = {"user_id", "group_id", "default_permissions", "rootmode", "blksize", "max_read", "fd"}


class RemountError(Exception):
    """The remount cannot be done; the message says why and what to do."""


def remount_flags(current: set[str], options: list[str]) -> int:
    """The ``mount(2)`` flags for a remount asking ``options`` of a mount whose options in
    /proc/mounts are ``current`` (read there, not by statvfs: a hung daemon never answers that):
    those the options name (``noexec`` absent: off); ``ro``/``rw``, and the atime family with
    ``nodiratime``, kept from ``current`` when none of them is named."""
    flags = MS_REMOUNT | MS_NOSUID | MS_NODEV
    if not any(o in ("ro", "rw") for o in options) and "ro" in current:
        flags |= MS_RDONLY
    if not any(o in FLAG_OPTIONS and FLAG_OPTIONS[o][0] & _ATIME for o in options):
        for name, ms in _CURRENT.items():
            if name in current and ms & (_ATIME | MS_NODIRATIME):
                flags |= ms
        if not flags & (MS_NOATIME | MS_RELATIME):
            flags |= MS_STRICTATIME
    for option in options:
        if option in FLAG_OPTIONS:
            clear, set_ = FLAG_OPTIONS[option]
            flags = (flags & ~clear) | set_
    return flags


def remount(mountpoint: str, options: list[str], *, daemon_read_only: bool | None) -> list[str]:
    """Remount the privifs mount at ``mountpoint`` with ``options`` (those after ``remount``);
    the daemon options given that a remount does not change (to be named to the user).
    ``daemon_read_only``: whether its daemon was started read-only (None: not known)."""
    from privifs.cli.mounttable import is_dead_mount
    from privifs.kernelmounts import mount_options, mount_path, privifs_mounts

    real = mount_path(mountpoint)
    if real not in privifs_mounts():
        raise RemountError(f"{mountpoint} is not a privifs mount")
    if is_dead_mount(real):
        raise RemountError(
            f"{mountpoint}: its daemon is gone (the mount is dead): 'privifs umount {mountpoint}', then mount it again"
        )
    shown = mount_options(real)
    flags = remount_flags(shown, options)
    if daemon_read_only and not flags & MS_RDONLY:
        raise RemountError(
            f"{mountpoint} was mounted read-only by privifs (-o ro, --read-only): unmount it, then "
            f"mount it again without ro"
        )
    _mount(real, flags)
    # what the mount shows already (allow_other) is no change
    return [
        o for o in options if o not in FLAG_OPTIONS and o not in shown and o.partition("=")[0] not in KERNEL_OPTIONS
    ]


def _mount(target: str, flags: int) -> None:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_void_p]
    if libc.mount(None, os.fsencode(target), None, flags, None) == 0:
        return
    code = ctypes.get_errno()
    if code == errno.EBUSY:
        raise RemountError(
            f"{target} is busy: a file on it is open for writing or mapped writable (close it, then remount read-only)"
        )
    if code == errno.EPERM:
        raise RemountError(f"{target}: only root can remount")
    raise RemountError(f"{target}: remount failed: {os.strerror(code)}")

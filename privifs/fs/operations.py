"""The pyfuse3 handlers: each translates its arguments, calls one method of
:class:`~privifs.fs.filesystem.Filesystem`, and turns errors into errnos (logging the cause) by
their type, through :func:`~privifs.fs.errnos.errno_for`, noting a full local disk for
`privifs status`. Nothing else happens here."""

from __future__ import annotations

import errno
import functools
import logging

import pyfuse3

from privifs.errors import DiskFullError, LocalStoreError, PrivifsError
from privifs.fs.caller import Caller
from privifs.fs.errnos import OS_ERRNOS, errno_for
from privifs.fs.filesystem import Filesystem

log = logging.getLogger("privifs.fs")


# requests that only look: they do not hold the write-back back (Syncer.note_activity). A
# program polling the tree (`ls -lR`, `find`, a file manager) kept every closed change from the
# vault for up to MAX_DEFER (30 s), also from another mount waiting for it (helper hAJ: 22-32 s
# against 2 s without the poller)
LOOKS = frozenset(
    {"lookup", "forget", "getattr", "readlink", "opendir", "readdir", "releasedir", "getxattr", "listxattr", "statfs"}
)


def handler(fn):
    busy = fn.__name__ not in LOOKS

    @functools.wraps(fn)
    async def wrapper(self, *args, **kwargs):
        if busy:
            self.fs.note_activity()
        try:
            return await fn(self, *args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except (PrivifsError, OSError) as exc:
            log.error("%s failed: %s", fn.__name__, exc)
            if isinstance(exc, DiskFullError) or isinstance(exc, OSError) and exc.errno in OS_ERRNOS:
                self.fs.note_disk_full(fn.__name__, exc)  # for `privifs status`
            elif isinstance(exc, (LocalStoreError, OSError)):
                self.fs.note_local_failure(fn.__name__, exc)  # (out of descriptors, a file size limit, …)
            raise pyfuse3.FUSEError(errno_for(exc)) from None
        except Exception:
            log.exception("%s failed unexpectedly", fn.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None

    return wrapper


class Operations(pyfuse3.Operations):
    """No ``flush``: the kernel stops sending FLUSH (one per close(2), a round trip each) after
    the first answer ENOSYS, pyfuse3's default. A write is durable once it returns (see
    :mod:`privifs.fs.staging`), and ``release`` records the rest."""

    supports_dot_lookup = True
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, fs: Filesystem):
        super().__init__()
        self.fs = fs

    @handler
    async def lookup(self, parent_inode, name, ctx=None):
        return self.fs.lookup(parent_inode, name)

    @handler
    async def forget(self, inode_list):
        self.fs.forget(inode_list)

    @handler
    async def getattr(self, inode, ctx=None):
        return self.fs.getattr(inode)

    @handler
    async def setattr(self, inode, attr, fields, fh, ctx):
        return await self.fs.setattr(inode, attr, fields, fh)

    @handler
    async def readlink(self, inode, ctx):
        return self.fs.readlink(inode)

    @handler
    async def mknod(self, parent_inode, name, mode, rdev, ctx):
        return self.fs.mknod(parent_inode, name, mode, (ctx.uid, ctx.gid), rdev)

    @handler
    async def mkdir(self, parent_inode, name, mode, ctx):
        return self.fs.mkdir(parent_inode, name, mode, (ctx.uid, ctx.gid))

    @handler
    async def unlink(self, parent_inode, name, ctx):
        self.fs.unlink(parent_inode, name)

    @handler
    async def rmdir(self, parent_inode, name, ctx):
        self.fs.rmdir(parent_inode, name)

    @handler
    async def symlink(self, parent_inode, name, target, ctx):
        return self.fs.symlink(parent_inode, name, target, (ctx.uid, ctx.gid))

    @handler
    async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx):
        self.fs.rename(parent_inode_old, name_old, parent_inode_new, name_new, flags)

    @handler
    async def link(self, inode, new_parent_inode, new_name, ctx):
        self.fs.link()

    @handler
    async def open(self, inode, flags, ctx):
        return await self.fs.open(inode, flags, Caller(ctx.uid, ctx.gid, ctx.pid))

    @handler
    async def create(self, parent_inode, name, mode, flags, ctx):
        return await self.fs.create_or_open(parent_inode, name, mode, flags, Caller(ctx.uid, ctx.gid, ctx.pid))

    @handler
    async def read(self, fh, off, size):
        return await self.fs.read(fh, off, size)

    @handler
    async def write(self, fh, off, buf):
        return await self.fs.write(fh, off, buf)

    @handler
    async def fsync(self, fh, datasync):
        await self.fs.fsync(fh, bool(datasync))

    @handler
    async def release(self, fh):
        self.fs.release(fh)

    @handler
    async def opendir(self, inode, ctx):
        return self.fs.opendir(inode)

    @handler
    async def readdir(self, fh, start_id, token):
        self.fs.readdir(fh, start_id, token)

    @handler
    async def releasedir(self, fh):
        self.fs.releasedir(fh)

    @handler
    async def fsyncdir(self, fh, datasync):
        await self.fs.fsyncdir(fh)

    @handler
    async def getxattr(self, inode, name, ctx):
        return self.fs.getxattr(inode, name)

    @handler
    async def listxattr(self, inode, ctx):
        return self.fs.listxattr(inode, Caller(ctx.uid, ctx.gid, ctx.pid))

    @handler
    async def setxattr(self, inode, name, value, ctx):
        self.fs.setxattr(inode, name, value)

    @handler
    async def removexattr(self, inode, name, ctx):
        self.fs.removexattr(inode, name)

    @handler
    async def statfs(self, ctx):
        return self.fs.statfs()

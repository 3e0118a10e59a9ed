"""Errnos are chosen in one place (privifs/fs/errnos.py) from the error's type, and a command the
server rejects becomes the error type its reason key stands for."""

from __future__ import annotations

import errno

import pyfuse3
import pytest

from privifs.errors import (
    AuthenticationError,
    AuthorizationError,
    CommandRejected,
    ConflictError,
    DataMissing,
    DiskFullError,
    ForbiddenError,
    IntegrityError,
    LocalStoreError,
    NodeGone,
    NotFoundError,
    PermissionRefused,
    ServerError,
    ServerUnreachable,
    WriteBackFailed,
    rejected_command,
)
from privifs.fs.errnos import errno_for
from tests.fskit import inprocess_fs


@pytest.mark.parametrize(
    "exc,code",
    [
        (DiskFullError("full"), errno.ENOSPC),
        (LocalStoreError("broken"), errno.EIO),
        (NodeGone("gone"), errno.ENOENT),
        (NotFoundError("missing", status=404), errno.ENOENT),
        (AuthenticationError("refused"), errno.EACCES),
        (AuthorizationError("refused"), errno.EACCES),
        (ForbiddenError("forbidden", status=403), errno.EACCES),
        (PermissionRefused("not yours", command_id="c", reason="profile.not_an_owner"), errno.EACCES),
        (CommandRejected("no", command_id="c", reason="policy.rejected"), errno.EIO),
        (ConflictError("taken", status=409), errno.EEXIST),
        (ServerError("5xx", status=503), errno.EIO),
        (ServerUnreachable("down"), errno.EIO),
        (IntegrityError("tampered"), errno.EIO),
        (WriteBackFailed("upload did not complete"), errno.EIO),
        (OSError(errno.ENOSPC, "full"), errno.ENOSPC),
        (OSError(errno.EDQUOT, "quota"), errno.EDQUOT),
        (OSError(errno.EPERM, "odd"), errno.EIO),
        (ValueError("a bug"), errno.EIO),
    ],
)
def test_each_error_type_answers_its_errno(exc, code):
    assert errno_for(exc) == code


@pytest.mark.parametrize(
    "reason,kind",
    [
        ("profile.not_an_owner", PermissionRefused),
        ("policy.access_denied", PermissionRefused),
        ("data_token.forbidden", PermissionRefused),
        ("data_token.data_missing", DataMissing),  # also an IntegrityError: EIO, and verify says damaged
        ("policy.rejected", CommandRejected),
        ("data_token.temporary_token_invalid", CommandRejected),
        ("the vote timed out", CommandRejected),
        (None, CommandRejected),
    ],
)
def test_a_rejected_command_is_the_error_its_reason_key_stands_for(reason, kind):
    exc = rejected_command("rejected", command_id="c1", reason=reason)
    assert type(exc) is kind and exc.reason == reason and exc.command_id == "c1"
    assert isinstance(exc, IntegrityError) == (kind is DataMissing)
    assert errno_for(exc) == (errno.EACCES if kind is PermissionRefused else errno.EIO)


async def test_fsync_of_an_upload_refused_as_not_allowed_answers_eacces(eng, account, tmp_path):
    async with inprocess_fs(tmp_path, *account) as t:
        ops = t.ops
        fh, f = t.create_node(1, "not-mine.txt")
        await t.fs.write(fh, 0, b"kept locally")
        eng.set_options(reject="reserve-token-space", reject_reason="profile.not_an_owner")
        with pytest.raises(pyfuse3.FUSEError) as info:
            await ops.fsync(fh, False)
        assert info.value.errno == errno.EACCES
        assert f.content_dirty and f.staged is not None  # nothing lost: still staged, retried
        eng.set_options(reject="")
        t.fs.release(fh)

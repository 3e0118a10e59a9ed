"""The one exception hierarchy of privifs.

Every error a user can meet is a :class:`PrivifsError` whose message says what happened and,
where possible, what to do. Vault errors say whether they are *transient* (worth retrying with
backoff) so retry policy is decided in one place. Errors carry no errno: the FUSE layer chooses
the errno from the error's type, in one table (:mod:`privifs.fs.errnos`). A command the server
rejects becomes the error its reason key stands for (:func:`rejected_command`, one table).
"""

from __future__ import annotations

import errno
import os


class PrivifsError(Exception):
    """Base of every privifs error; ``str(exc)`` is a message for the user."""

    transient: bool = False


class ConfigError(PrivifsError):
    """The configuration is missing or invalid."""


class KeyFileError(PrivifsError):
    """A key file is missing, unreadable or malformed."""


class WrongKeyError(PrivifsError):
    """The AES key does not decrypt this vault's data."""


class IntegrityError(PrivifsError):
    """Ciphertext failed authentication: tampered, truncated or encrypted with another key."""


class LocalStoreError(PrivifsError):
    """The local staging area or cache cannot be used (e.g. full disk)."""


class DiskFullError(LocalStoreError):
    """The local disk (staging, cache or index) has no room left."""


class ProcessLimitError(LocalStoreError):
    """A limit of this process or system was reached on the local disk: no file descriptor left
    (EMFILE, ENFILE), a file past the largest size allowed (EFBIG). The program is answered with
    that ``errno``, which says what to do (close files, raise ``ulimit -n``), not EIO."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.errno = code


def output_failed(path: str | os.PathLike, exc: OSError, what: str, *, elsewhere: bool = True) -> LocalStoreError:
    """The error for writing ``what`` (``"the backup"``, ``"the file"``) to ``path`` failing
    with ``exc``: it names the file, which a write error itself does not, and for a full disk
    (or quota) says what to do (``elsewhere``: the user chose the place, and may choose another)."""
    reason = exc.strerror or str(exc) or type(exc).__name__
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        where = os.path.dirname(os.path.abspath(path))
        return DiskFullError(
            f"cannot write {what} {path}: {reason} (the disk holding {where} is full); free some space there"
            + (" or name a file on another disk" if elsewhere else "")
            + ", then run the command again"
        )
    return LocalStoreError(f"cannot write {what} {path}: {reason}")


class NodeGone(PrivifsError):
    """A node left the tree (unlinked, or its directory removed) while work on it was pending."""


class FormatVersionError(LocalStoreError):
    """Local state (the index, a sealed file) was written in a version this privifs cannot read."""


class VaultError(PrivifsError):
    """Talking to the Privicore service failed."""

    # a store that failed at configure-file-meta, after the data was sent: the temporary token,
    # which the server may have made a permanent token of all the same (see DataTokens.store)
    unconfigured: object | None = None
    # a big file's manifest token the server made before the step that failed (its risk meta,
    # which marks it): the caller deletes it (see PartStore.put_manifest)
    made: str | None = None

    def __init__(self, message: str, *, status: int | None = None, reason: str | None = None):
        super().__init__(message)
        self.status = status
        self.reason = reason


class ServerUnreachable(VaultError):
    """The server could not be reached (connection refused, DNS, timeout)."""

    transient = True


class MalformedHTTP(ServerUnreachable):
    """The server (or what stands between) answered, but not in valid HTTP, or cut the answer
    short: handled as unreachable (retried, the server counted down), said as what it is."""


class ServerError(VaultError):
    """The server answered with a 5xx, 408 or 429 status."""

    transient = True


class VaultFull(ServerError):
    """The server has no room for the data (HTTP 507 Insufficient Storage). Transient: room may
    come back (the embedded engine's disk freed, the read cache giving way to it)."""


class ProtocolError(VaultError):
    """The server answered in a shape the client does not understand."""


class MalformedAnswer(ProtocolError):
    """A 2xx answer that is no answer at all: empty, cut short (``{"token":"dtk-1a2b``), or a
    proxy's HTML page. Nothing can be read from it, least of all an id or a token, so it is
    transient: the call (or the chain it belongs to) is made again."""

    transient = True


class UnknownCommand(ProtocolError):
    """The server does not know a command id it gave out a moment ago: the id was changed on
    its way (or the server forgot the command). Nothing is known of the command's outcome, so
    it is transient: the call (or the chain it belongs to) is made again. Not a
    :class:`NotFoundError`: taken for "the token is gone", a rename whose answer's id was so
    changed was dropped as if another client had deleted the file."""

    transient = True


class AuthenticationError(VaultError):
    """Username or password were refused."""


class AuthorizationError(VaultError):
    """The authorization token was refused even after renewing it."""


class ForbiddenError(VaultError):
    """The server refused the request for this profile (HTTP 403)."""


class NotFoundError(VaultError):
    """What the request names does not exist on the server (HTTP 404)."""


class ConflictError(VaultError):
    """The server refused because the resource already exists (HTTP 409)."""


class RequestRejected(VaultError):
    """The server refused the request's parameters (HTTP 422)."""

    def __init__(
        self, message: str, *, status: int | None = 422, fields: dict | None = None, reason: str | None = None
    ):
        super().__init__(message, status=status, reason=reason)
        self.fields = fields or {}


class CommandRejected(VaultError):
    """An asynchronous command ended with status 3; ``reason`` is the server's reason."""

    def __init__(self, message: str, *, command_id: str, reason: str | None):
        super().__init__(message, reason=reason)
        self.command_id = command_id


class PermissionRefused(CommandRejected):
    """A command rejected because this profile may not do it (not the owner, denied by a policy)."""


class TokenMissing(CommandRejected, NotFoundError):
    """A command rejected because the data token it names does not exist (``data_token.not_found``:
    deleted, or replaced, by another client); also a :class:`NotFoundError`."""


class DataMissing(CommandRejected, IntegrityError):
    """A request for a token's data rejected because the server lost that data
    (``data_token.data_missing``: a damaged store); also an :class:`IntegrityError`, so a read
    is EIO and ``privifs verify --data`` reports the file damaged (``--repair`` stores it again
    from a local copy)."""


# the reason keys (``<area>.<reason>``, e.g. ``profile.not_an_owner``) that pick a rejection's type,
# by their part after the area: "not allowed" and "does not exist"; any other reason is a plain
# CommandRejected
REFUSAL_REASONS: dict[str, type[CommandRejected]] = {
    "not_found": TokenMissing,
    "data_missing": DataMissing,
    "not_an_owner": PermissionRefused,
    "access_denied": PermissionRefused,
    "permission_denied": PermissionRefused,
    "denied": PermissionRefused,
    "forbidden": PermissionRefused,
    "unauthorized": PermissionRefused,
}


def rejected_command(message: str, *, command_id: str, reason: str | None) -> CommandRejected:
    """The error for a command the server rejected with ``reason``: its type from the reason key
    (:data:`REFUSAL_REASONS`), :class:`CommandRejected` for any other reason (or prose)."""
    key = (reason or "").strip().rpartition(".")[2].lower()
    return REFUSAL_REASONS.get(key, CommandRejected)(message, command_id=command_id, reason=reason)


class VaultChanged(PrivifsError):
    """The server answers with another vault than the one a mount checked and shows (the same
    URL and user name, another vault behind them): nothing may be uploaded to it or taken from
    its listing."""


class CallerKilled(PrivifsError):
    """The program waiting for a request (an fsync waiting for its upload) was killed: the wait
    ends, for the kernel holds a killed process in that request until it is answered; what it
    waited for goes on in the background."""


class WriteBackFailed(PrivifsError):
    """An fsync gave up: the upload of the file's content did not complete (in time). The data
    stays staged and keeps being retried."""


class NoRoomInVault(WriteBackFailed):
    """An fsync failed because the vault has no room for the file (ENOSPC, as a full disk). The
    data stays staged and keeps being retried."""


class CommandPending(VaultError):
    """An asynchronous command was still in flight when the wait timed out.

    It is neither failed nor done: its outcome can still be learned by polling ``command_id``.
    """

    transient = True

    def __init__(self, message: str, *, command_id: str):
        super().__init__(message)
        self.command_id = command_id


class single_error:
    """Context manager: re-raise the one exception inside a trio exception group as itself, so
    callers can catch the errors of this hierarchy by type through nurseries. When several tasks
    failed at once and every failure is one of this hierarchy (the parts of a big file in flight
    when the server went away: each says so), the first stands for them; anything else (a bug,
    a cancellation) keeps the group."""

    def __enter__(self) -> single_error:
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if isinstance(exc, BaseExceptionGroup):
            leaves = list(_leaves(exc))
            if len(leaves) == 1 or (leaves and all(isinstance(e, PrivifsError) for e in leaves)):
                raise leaves[0] from None
        return False


def _leaves(group: BaseExceptionGroup):
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            yield from _leaves(exc)
        else:
            yield exc


def first_privifs_error(group: BaseExceptionGroup) -> PrivifsError | None:
    """The first PrivifsError inside a (nested) exception group from trio nurseries, if any."""
    return next((e for e in _leaves(group) if isinstance(e, PrivifsError)), None)

"""Write-back: bring the vault in line with the tree, for ever, losing nothing.

For each dirty node a worker *reconciles* (idempotent, resumable after a crash):

* staged content (``content_dirty``, no writer left or an fsync asking) → a **new token** is
  stored from it (stream-encrypted), then recorded on the node; only then is the old token
  tombstoned — unless the listing shows that another client moved or renamed it since this
  mount last saw it: then it is someone else's file now (a rename raced this edit) and stays.
  A failed upload leaves the old token and the staged copy untouched and is retried with
  backoff (capped at five minutes) until it succeeds. The staged file then moves into the
  read cache.
* a directory that must exist on its own, or a symlink, without a token → a **marker token**.
* name, place or attributes changed (``meta_dirty``) → ``update-data-token`` (fileName,
  extension, context) and the risk meta (mode, mtime, …). If the token is gone (another client
  deleted or replaced it first), the change is dropped and the entry follows the vault at the
  next listing, like any clean one. A file whose name changes is first fetched into the cache
  (up to ``RENAME_FETCH_LIMIT``), so that if a writer elsewhere that has not seen the rename
  replaces the content and deletes the token under it, the renamed entry can be stored again
  (:meth:`Syncer.rescue_renamed`, called by the refresher when the token vanishes).

Tombstoned tokens are deleted by their own task (a delete of a missing token counts as done).

An upload that was interrupted by a crash after the server made the token but before the node
recorded it leaves an orphan; :meth:`Syncer.adopt_orphan` recognises it on the next listing by
its place, name and content (compared with the staged copy) and records it instead of a
duplicate. When the file was removed, renamed (or a directory above it) or written again while
its upload was in flight, that upload is recorded as *superseded* with the change (the
``superseded`` table: its staged file, kept, and where it went); the upload's end drops the record,
and after a crash the next listing's token there with that content is deleted, not shown
(:meth:`Syncer.bury`).

State and concurrency: nodes are reconciled by ``workers`` tasks, never two at once for the same
node (``_busy``); of those, at most ``big_uploads`` send a file larger than ``BIG_UPLOAD`` at once
(many small uploads in flight hide each one's round trips; big ones need memory and bandwidth,
not company); everything between two awaits is atomic on the trio thread. ``inflight_names``
lets the refresher ignore a token of ours that the listing shows before the node recorded it;
``recently_deleted`` lets it ignore tokens deleted after its listing was taken.
"""

from __future__ import annotations

import contextlib
import hashlib
import heapq
import hmac
import json
import logging
import math
import re
import stat
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import NamedTuple

import trio

from privifs.client.datatokens import DataTokens, FileMeta, confirm_gone, find, find_each
from privifs.client.shapes import TokenInfo
from privifs.client.vault import Vault
from privifs.crypto import digest
from privifs.crypto.sealed import SealedFile
from privifs.errors import (
    CommandRejected,
    ForbiddenError,
    IntegrityError,
    LocalStoreError,
    MalformedAnswer,
    NodeGone,
    NoRoomInVault,
    NotFoundError,
    PrivifsError,
    ProtocolError,
    RequestRejected,
    ServerError,
    ServerUnreachable,
    VaultFull,
    WriteBackFailed,
)
from privifs.fs.cache import ContentCache
from privifs.fs.names import conflict_name, extension_of, shown_name, token_naming
from privifs.fs.namespace import Namespace, Node, risk_json
from privifs.fs.parts import PartReader, is_manifest_node
from privifs.fs.partwrite import PartWriter
from privifs.fs.staging import StagedFile, Staging
from privifs.fs.tokenmeta import (
    CARRIED,
    SPECIAL_KINDS,
    attributes,
    risk_fields,
    same_context,
    split_context,
)
from privifs.fs.workqueue import WorkQueue
from privifs.parts import format as fmt
from privifs.parts.store import THRESHOLD as PARTS_THRESHOLD
from privifs.parts.store import is_manifest, is_part, maybe_unmarked_manifest
from privifs.ratelog import RateLimitedWarnings
from privifs.supervise import Supervisor

log = logging.getLogger("privifs.fs.sync")

PIECE_CHUNKS = 16  # 1 MiB of plaintext per upload piece
MAX_BACKOFF = 300.0
QUIET = 0.3  # write-back starts once the mount has had no request for this long …
MAX_DEFER = 30.0  # … or once a change has waited this long, however busy the mount is
FSYNC_RETRY = 2.0  # while an fsync waits through a flaky server, retry at least this often
ODD_ANSWERS_WAITED = 3  # answers of a shape the client does not know an fsync waits through
VAULT_FULL_RETRY = 30.0  # a vault whose disk is full is asked again at least this often (hAX F1)
FLUSH_RETRY = 10.0  # while 'privifs umount' waits, retry at least this often (not after 5 minutes)
# an fsync waits through a server that stops answering (connections refused, no answer) until
# this long after its last answer: a server or engine restarting takes a few seconds (helper hN:
# a standalone engine restarted in 2-5 s failed 13 of 28 SQLite workloads with EIO)
SERVER_BACK_GRACE = 20.0
RECONNECT_GRACE = 10.0  # offline, an fsync waits this long at most for one more attempt to reach the vault
RENAME_FETCH_LIMIT = 4 * 2**20  # a file renamed here is fetched into the cache first up to this size
RENAME_SEEN_AFTER = 1.0  # a listing this long after a rename is written back shows it applied
RENAME_RESCUE_WINDOW = 60.0  # how long after a rename a replaced-and-deleted token is kept here
RETIRE_GRACE = 60.0  # a part a rewrite stopped naming is deleted this long after (see retire_parts)
RETIRE_CHECK = 10.0  # how often the retired parts are looked at
LOST_MANIFEST_TRIES = 6  # rounds a listed manifest's content may answer 404 before it keeps no part
# a removed entry's token is deleted only once the files closed here before the removal are in the
# vault, so another client never lists neither (git gc: a new pack, then the old ones deleted),
# waiting this long at most (an upload that keeps failing does not hold deletions back for good)
REMOVAL_AFTER_UPLOADS = 30.0
# a token a rename here replaced is deleted once that rename is written back (if it is dropped, the
# token stays), waiting this long at most
OVERWRITE_AFTER_RENAME = 60.0
# a file listed with no risk meta of privifs' and made less than this long ago may be one whose
# writer has not written its risk meta yet: a meta write of this mount waits (see _current_risk)
YOUNG_TOKEN = 30.0
YOUNG_RETRY = 2.0
# failures a retry soon meets again: the server refused the request or the command (a name it
# will not hold, a profile without the right); not an unreachable or failing server
REFUSALS = (CommandRejected, RequestRejected, ForbiddenError)
BIG_UPLOAD = 256 * 1024  # a file larger than this takes one of the ``big_uploads`` slots while uploading
BIG_UPLOADS = 8
PENDING_SHOWN = 50  # pending changes a status names (it counts them all)


class PendingReport(NamedTuple):
    """What :meth:`Syncer.pending` tells: the changes it names, and how many and how big all are."""

    shown: list[dict]
    count: int
    size: int
    fsynced: int  # of those, fsynced with --fsync local


def _pending_rank(node: Node) -> int:
    """Which pending changes a status names first: failing, then uploading, queued, still open."""
    if node.last_error and not node.uploading:
        return 0
    return 1 if node.uploading else 3 if node.waiting_for_close else 2


def awaits_marker(node: Node) -> bool:
    """Whether ``node`` is an entry stored as a marker token (a directory made here, a symlink,
    a FIFO, …) whose marker is still to be made."""
    return (
        node.token is None
        and bool(node.meta_dirty)
        and (node.is_symlink or node.is_dir and node.explicit or node.kind in SPECIAL_KINDS)
    )


def node_risk(node: Node, base: dict[str, str]) -> dict[str, str]:
    """The risk meta that stores ``node``'s attributes over ``base`` (what the token has)."""
    return risk_fields(
        base,
        node.kind,
        node.mode,
        node.mtime_ns,
        node.target,
        node.uid,
        node.gid,
        node.atime_ns,
        node.rdev,
        node.xattrs,
    )


def written_by_privifs(risk: dict[str, str]) -> bool:
    """Whether a token's risk meta, as this mount knows it, was written by privifs (it says the
    entry's type) or states its content (this mount's own upload, recorded before its first
    risk meta write); otherwise another client's risk meta write may be on its way."""
    return "privifs.type" in risk or any(k in risk for k in CARRIED)


def shown_aside(node: Node) -> bool:
    """Whether ``node`` shows under another name than the one its token claims because the
    listing put it there (a conflict copy: not renamed here since), and its token is privifs'
    own (another application's keeps the claim order: privifs does not rename it on its own)."""
    return (
        node.shown_as is not None
        and node.shown_as == node.name
        and node.remote_name is not None
        and node.name != shown_name(node.remote_name, node.remote_extension)
        and written_by_privifs(node.risk())
    )


def fsync_waits_through(
    exc: PrivifsError, server_restarting: bool = False, room_made: bool = False, odd_answers: int = 0
) -> bool:
    """An fsync keeps waiting (up to --fsync-timeout) through failures of a server that answers
    (5xx, a command still pending): the next attempt may well succeed, and a program treats an
    fsync error as lost data. So it does while the embedded engine cannot be reached because it
    is being started again after it died (``server_restarting``), or a server that answered
    less than SERVER_BACK_GRACE ago (a restart: the caller says so through the same flag). A
    server that cannot be reached otherwise, or that refuses, fails it now. A vault with no room (507) fails it now
    with ENOSPC, as a full disk does, unless the read cache just gave room to the server
    (``room_made``: the embedded engine on the cache's disk), for which the retry may land; it
    waited the whole time-out (300 s by default) and said EIO. An answer in a shape the client
    does not know (a ProtocolError: a key changed on its way, ``{"tmken": …}``) is waited through
    :data:`ODD_ANSWERS_WAITED` times in one fsync (``odd_answers``: how many it met already): the
    next answer is likely whole, while a server that always answers so would hold every fsync for
    the whole time-out. One such answer failed an fsync with EIO at once."""
    if isinstance(exc, ServerUnreachable):
        return server_restarting
    if isinstance(exc, VaultFull):
        return room_made
    if isinstance(exc, ProtocolError) and not exc.transient:
        return odd_answers < ODD_ANSWERS_WAITED
    return exc.transient


Place = tuple[str | None, str | None, str | None]  # where a token is: (context, file name, extension)


def same_place(a: Place, b: Place) -> bool:
    """Whether two places name the same entry (no extension and an empty one are the same)."""
    return same_context(a[0], b[0]) and a[1] == b[1] and (a[2] or "") == (b[2] or "")


def names_its_conflict_copy(node: Node, token: str, place: Place) -> bool:
    """Whether writing ``place`` back only names ``node``'s token in the vault as the conflict
    copy every mount shows it as (the conflict name of the name it claimed, in the same
    directory: :meth:`Syncer._alone_at`, :meth:`Syncer.holder_removed`), not a rename other
    mounts have not seen. Kept for a rescue like a rename, it was stored again when another
    mount removed or replaced the copy within a minute (helper hT T1: a removed copy back, 5 of
    5; an edit of it a copy of a copy)."""
    context, name, extension = place
    return (
        node.remote_name is not None
        and same_context(node.remote_context, context)
        and shown_name(name, extension) == conflict_name(shown_name(node.remote_name, node.remote_extension), token)
    )


def remote_place(node: Node) -> Place:
    """Where this mount last saw ``node``'s token."""
    return node.remote_context, node.remote_name, node.remote_extension


class Seen(NamedTuple):
    """What a mount keeps of a listed token until the next listing: where it was and when it
    was made. Not the whole :class:`TokenInfo` (its risk meta, path and size): a mount holds one
    per token of the vault, and the whole ones took 702 bytes a token of a 111,602-token vault."""

    context: str
    file_name: str
    extension: str
    created_at: float | None


def seen(info: TokenInfo) -> Seen:
    return Seen(info.context, info.file_name, info.extension, info.created_at)


def listed_place(info: TokenInfo | Seen) -> Place:
    """Where a listing (or a look-up) shows ``info``'s token."""
    return info.context, info.file_name, info.extension


def _alike(text: str) -> str:
    """A failure's words with the ids and numbers in them masked: failures that differ only in the
    command, token or count they name are one kind of warning (hAT F4: each was its own, and
    none was rate-limited)."""
    return _IDS.sub("#", text)


_IDS = re.compile(r"[0-9a-fA-F][0-9a-fA-F-]{5,}|\d+")


class Syncer:
    """Write-back over the tree (``ns``), the staged content (``staging``) and the read cache
    (uploaded content moves into it), talking to the vault through ``tokens`` and ``vault``."""

    def __init__(
        self,
        ns: Namespace,
        staging: Staging,
        cache: ContentCache,
        tokens: DataTokens,
        vault: Vault,
        *,
        workers: int = 4,
        big_uploads: int = BIG_UPLOADS,
        write_back_delay: float = 1.0,
        supervisor: Supervisor | None = None,
        server_restarting: Callable[[], bool] = lambda: False,
    ):
        self.supervisor = supervisor or Supervisor()
        self.server_restarting = server_restarting  # the embedded engine is being started again
        # called with an upload's size when the server says its disk is full, if that disk is
        # the cache's too (the embedded engine in the same home): the cache gives it room
        self.server_full: Callable[[int], object] | None = None
        # offline: try to reach the vault now and wait (at most the time given) for that attempt;
        # True once online (the connector's ``try_now``; None in-process, where there is no connector)
        self.reconnect: Callable[[float], Awaitable[bool]] | None = None
        self.ns = ns
        self.index = ns.index
        self.staging = staging
        self.cache = cache
        self.tokens = tokens
        self.vault = vault
        self.content_key = vault.derive(digest.content_key)  # whole-token content digests
        self.workers = workers
        self._big = trio.CapacityLimiter(max(1, min(big_uploads, workers)))
        self.write_back_delay = write_back_delay
        self._queue = WorkQueue()
        self._busy: set[int] = set()
        # when a worker began deferring a node it gave way with (to an fsync's node): MAX_DEFER
        # counts from then, so frequent fsyncs elsewhere cannot hold a closed file back for good
        self._deferred_since: dict[int, float] = {}
        self._again: set[int] = set()
        self._waiting: dict[int, float] = {}  # node → when its timer (_later) schedules it again
        self._fsync: Counter[int] = Counter()
        self._odd_answers: Counter[int] = Counter()  # ino -> ProtocolErrors its waiting fsyncs met
        self.local_fsynced: set[int] = set()  # --fsync local: durable here, uploaded even while open
        self._commits: dict[str, tuple[trio.Event, list]] = {}
        # fsyncs of a node whose attributes changed (not its content): the event of its next
        # write-back attempt and what it met, and the meta version last written while one waits
        self._meta_commits: dict[int, tuple[trio.Event, list]] = {}
        self._meta_done: dict[int, int] = {}
        self._tomb_wake = trio.Event()
        self._fsync_asked = trio.Event()  # set (and replaced) when an fsync asks: wakes deferred work
        self._nursery: trio.Nursery | None = None
        self.inflight_names: Counter[tuple[tuple[str, ...], str]] = Counter()
        self.recently_deleted: dict[str, float] = {}
        # tokens this mount renamed: when, and the (context, name, extension) they had before
        self.renamed: dict[str, tuple[float, str | None, str | None, str | None]] = {}
        # those of them a listing taken after the rename has shown renamed (see rescue_renamed)
        self.renames_listed: set[str] = set()
        # token → (when, the tokens of the conflict copies this mount showed of the name it had
        # when a program renamed it here): at its old name those are no replacement made by a
        # writer that missed the rename (see rescue_renamed)
        self.copies_at_rename: dict[str, tuple[float, set[str]]] = {}
        # the refresher's last listing (token → where it was) and when it started (trio time)
        self.listed: dict[str, Seen] = {}
        self.listed_started = float("-inf")
        # token → the place (context, name, extension) this mount last asked the vault to give it
        self._asked: dict[str, tuple[str, str, str]] = {}
        # tokens of entries a rename here replaced → the (context, name, extension) they had then
        # (see replaced_by_rename; in memory: after a restart they are deleted unchecked)
        self._overwritten: dict[str, tuple[int, float, list[Place]]] = {}
        # tokens of files removed here → the places they had then (see removed; in memory too)
        self._removed_at: dict[str, list[Place]] = {}
        self.last_error: str | None = None
        self.last_error_at: float | None = None
        self.last_success_at: float | None = None  # (wall time) of the last write-back that succeeded
        self.uploads = 0
        self.sent: dict[int, int] = {}  # plaintext bytes handed to the upload in flight, by inode
        self.unreachable_since: float | None = None
        # since when the server answers write-backs only with failures of the moment (5xx, 408,
        # 429: a proxy whose backend is down), until anything succeeds (see answered)
        self.failing_since: float | None = None
        self.answered_at = time.monotonic()  # when a write-back, a listing or a probe last succeeded
        self.answered_once = False  # (a mount that started offline has not heard from its server)
        # the refresher should look after ``delay`` seconds (set by the refresher)
        self.look_soon: Callable[[float], None] = lambda delay: None
        self.parts = PartWriter(PartReader(cache, vault))  # big files: only changed parts are uploaded
        self.stored_manifests: set[str] = set()  # manifest tokens this mount stored (and not replaced)
        self._retired: list[tuple[float, str, str]] = []  # (due, context, part) see retire_parts
        self._retired_loaded = False  # those the index records from an earlier run (_load_retired)
        self._manifest_parts: dict[str, frozenset[str]] = {}  # the vault's manifests: the parts each names
        self._lost_manifests: dict[str, int] = {}  # listed manifests whose download answered 404: how often
        self._gone_elsewhere: set[str] = set()  # replaced tokens _moved_elsewhere found deleted
        # ino -> when (trio clock) its last write-back attempt was refused, not merely failed:
        # retrying soon brings the same answer (see refused_since; a flush stops waiting for it)
        self.refused: dict[int, float] = {}
        # ino -> (trio clock) when its current run of failed write-back attempts began, and when
        # its last two failed; a success ends the run (see failing_again: a flush stops waiting
        # for changes the server fails every time)
        self.failures: dict[int, tuple[float, deque[float]]] = {}
        # inos whose last write-back attempt failed on content that does not authenticate (a
        # damaged staged chunk) or on local state (the index, the disk), not on the server's
        # answer; a retry soon meets the same (see all_failed_locally)
        self.failed_locally: set[int] = set()
        self.flushing = 0  # flushes waiting (privifs umount): failed write-backs are retried sooner
        self.retry_warnings = RateLimitedWarnings(log)  # failed write-backs, by exception and text
        # removed files' manifests -> their context and risk meta (manifest_removed)
        self._dropped: dict[str, tuple[str, dict[str, str]]] = {}
        self.retire_grace = RETIRE_GRACE
        self.last_activity = 0.0  # trio time of the last FUSE request (see note_activity)
        # uploads in flight: ino -> the staged file being sent and the context and name it goes to
        self._flights: dict[int, tuple[StagedFile, str, str]] = {}
        # ino -> the temporary token of its last upload, which failed at configure-file-meta
        # (the server may have made a token of it all the same: see _drop_unconfigured)
        self._unconfigured: dict[int, tuple[object, FileMeta]] = {}
        self._superseded: set[str] = set()  # staged ids of flights recorded as superseded (this run)
        # closes of written files, numbered; node → the number of its first close not in the vault yet
        self._closes = 0
        self._closed: dict[int, int] = {}
        # token of a removed entry → (the closes before the removal, until when its deletion waits
        # for them to reach the vault): see REMOVAL_AFTER_UPLOADS
        self._after_uploads: dict[str, tuple[int, float]] = {}
        # flights the last run recorded as superseded and never finished (it stopped): staged id ->
        # (context, name); a token the listing shows there with that content is theirs, not a file
        self.leftover: dict[str, tuple[str, str]] = self.index.superseded()

    def note_activity(self) -> None:
        """A FUSE request that does something arrived (not one that only looks at the tree:
        operations.LOOKS): background write-back yields while such requests keep coming."""
        self.last_activity = trio.current_time()

    # -- scheduling ----------------------------------------------------------------------------
    def schedule(self, node: Node) -> None:
        if node.unlinked and not node.uploading:
            return  # removed: nothing of it goes to the vault
        if node.ino in self._busy:
            self._again.add(node.ino)
        elif self._fsync[node.ino]:
            self._queue.put_urgent(node.ino)  # an fsync waits: ahead of the backlog
        elif node.retry_at > trio.current_time() and self._waiting.get(node.ino, float("inf")) <= node.retry_at:
            return  # a timer (_later) schedules it when it is due
        else:
            self._queue.put(node.ino)

    def schedule_upload(self, node: Node) -> None:
        """A file was closed after writing: upload it after the write-back delay (which lets a
        burst of writes finish first and coalesces quick rewrites)."""
        self._closes += 1
        self._closed.setdefault(node.ino, self._closes)
        self.ns.defer(node, trio.current_time() + self.write_back_delay)
        self.schedule(node)

    def upload_soon(self, node: Node) -> None:
        """``--fsync local``: the node's content is durable here; upload it after the write-back
        delay even if the file stays open (a database keeps it open), as long as it is dirty."""
        self.local_fsynced.add(node.ino)
        self.schedule_upload(node)

    def removed(self, node: Node, token: str | None) -> None:
        """``node`` left the tree: it is no longer a change fsynced here and awaiting upload. Its
        ``token`` (tombstoned) is deleted after the files closed before it reach the vault."""
        self.local_fsynced.discard(node.ino)
        self._closed.pop(node.ino, None)
        if token and self._closed:
            self._after_uploads[token] = (self._closes, trio.current_time() + REMOVAL_AFTER_UPLOADS)
        earlier = self._unconfigured.pop(node.ino, None)
        if earlier is not None and self._nursery is not None:
            self._nursery.start_soon(self._drop_after_removal, node, *earlier)

    def removing(self, node: Node) -> None:
        """``node`` (still in the tree) is about to be removed here. Its token is deleted only if
        the listing still shows it where this mount saw it, as for a rename over it: another
        client's rename that reached the vault first (B removes /s, not having listed A's
        /s → /s2) made it that client's file under another name, and B's delete took it from
        every mount, though a rename against a delete keeps the renamed file. So for a
        directory's markers: an ``rmdir`` (``rm -rf``) racing another client's ``mv`` of it took
        the renamed directory's marker, and the renamed directory vanished everywhere (or, with
        entries, lost its mode and times: hU D2)."""
        if node.token and node.remote_name is not None and node.token not in self._overwritten:
            places = self._places(node)
            self._removed_at[node.token] = places
            for marker in node.extra_markers if node.is_dir else ():  # listed at the same place
                self._removed_at[marker] = places

    def replaced_by_rename(self, node: Node, renamed: Node) -> None:
        """``node`` (a file, a symlink, …) is about to be removed because ``renamed``, renamed
        here, takes its name. Its token is deleted once that rename is written back (if another
        client's change made this mount drop the rename, the token stays: nothing replaced it),
        and only if the listing still shows it where this mount saw it (:meth:`_still_where_seen`).
        Another client that renamed it meanwhile made it its own file under another name
        (``mv config config.bak`` there while a save here renamed ``config.tmp`` over
        ``config``): deleted, it was lost everywhere, though neither order of the two renames
        removes it."""
        if node.token and not node.is_dir and node.remote_name is not None:
            places = self._places(node)
            self._overwritten[node.token] = (renamed.ino, trio.current_time() + OVERWRITE_AFTER_RENAME, places)

    def _places(self, node: Node) -> list[Place]:
        """Where ``node``'s token may be in the vault as this mount knows it: where it last saw
        it, where the node is here now (a rename of its own, not acknowledged yet), and for a
        conflict copy the conflict name it shows under, which another mount's save or removal
        of the file it is a copy of names it (:meth:`_alone_at`): taken for another client's
        rename, a removal or a rename over the copy here was undone (helper hT T2)."""
        context, name, extension, _ = self._target(node)
        places = [remote_place(node), (context, name, extension)]
        if shown_aside(node):
            places.append((node.remote_context, node.name, extension_of(node.name)))
        return places

    def _awaiting_renames(self) -> set[str]:
        """Tokens renames here replaced whose rename is not written back yet (see
        :meth:`replaced_by_rename`)."""
        now = trio.current_time()
        waiting = set()
        for token, (ino, until, _) in self._overwritten.items():
            node = self.ns.nodes.get(ino)
            if (
                now < until
                and node is not None
                and not node.unlinked
                and (node.meta_dirty or node.content_dirty or node.uploading)
            ):
                waiting.add(token)
        return waiting

    def _rename_dropped(self, node: Node) -> None:
        """``node``'s rename was dropped (its token was gone): the tokens it replaced stay."""
        for token, (ino, _, _) in list(self._overwritten.items()):
            if ino != node.ino:
                continue
            log.info("token %s, replaced here by a rename that was dropped, stays", token)
            self._keep_overwritten(token)

    async def _still_where_seen(self, token: str) -> bool:
        """For a tombstoned token a rename here replaced, a removal here removed, or a save
        here replaced whose place could not be looked at then: False if the listing shows it
        elsewhere than where this mount saw it (another client renamed it: it stays, and shows
        where that client put it); True otherwise (also when it is gone). A failed look fails
        the delete, which the tombstone task retries."""
        entry = self._overwritten.get(token)
        places = entry[2] if entry is not None else self._removed_at.get(token)
        if places is None:
            return True
        info = await find(self.tokens, token)
        if info is None or any(same_place(listed_place(info), p) for p in places):
            return True
        log.info(
            "token %s, %s here, was renamed by another client to %s/%s meanwhile; it stays",
            token,
            "replaced by a rename" if entry is not None else "replaced or removed",
            info.context,
            info.file_name,
        )
        self._keep_overwritten(token)
        return False

    def _keep_overwritten(self, token: str) -> None:
        """A token a rename here replaced is not deleted after all: the listing shows it again."""
        self._overwritten.pop(token, None)
        self._removed_at.pop(token, None)
        self._dropped.pop(token, None)  # a manifest: its parts stay with it
        try:
            self.index.drop_tombstone(token)
        except PrivifsError as exc:
            log.warning("could not record that %s stays: %s", token, exc)
        self.recently_deleted.pop(token, None)
        self.remote_changed()

    def _upload_due(self, node: Node) -> bool:
        """``node``'s content is closed (or fsynced here) and on its way to the vault."""
        return not node.unlinked and (
            node.uploading or bool(node.content_dirty) and (node.writers <= 0 or node.ino in self.local_fsynced)
        )

    def _held_for_uploads(self) -> set[str]:
        """Tombstoned tokens of removed entries that wait for files closed before the removal to
        reach the vault (forgetting the closes that did, and the removals that waited long enough)."""
        for ino in list(self._closed):
            node = self.ns.nodes.get(ino)
            if node is None or not self._upload_due(node):
                del self._closed[ino]
        first = min(self._closed.values(), default=math.inf)
        now = trio.current_time()
        held = set()
        for token, (closes, until) in list(self._after_uploads.items()):
            if first <= closes and now < until:
                held.add(token)
            else:
                del self._after_uploads[token]
        return held

    def wake_tombstones(self) -> None:
        self._tomb_wake.set()

    async def run(self, task_status: trio.TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            for i in range(self.workers):
                self.supervisor.start_soon(nursery, f"write-back worker {i + 1}", self._worker)
            self.supervisor.start_soon(nursery, "token deletion", self._tombstone_loop)
            self.supervisor.start_soon(nursery, "retired parts", self._retire_loop)
            for node in self.ns.pending():
                self.schedule(node)
            task_status.started()

    async def _worker(self) -> None:
        while True:
            ino = await self._queue.get()
            node = self.ns.get(ino)
            if node is None or node.unlinked and not node.uploading:
                self._deferred_since.pop(ino, None)
                continue
            wait = node.retry_at - trio.current_time()
            if wait > 0:  # (an fsync sets it to now: commit)
                if self._waiting.get(ino, float("inf")) > node.retry_at:  # one timer per node and time
                    self._waiting[ino] = node.retry_at
                    self._nursery.start_soon(self._later, ino, node.retry_at)
                continue
            self._busy.add(ino)
            try:
                if not await self._yield_to_foreground(ino):
                    self._again.discard(ino)
                    self._queue.put_back(ino)
                    continue  # (the urgent node next)
                if self.ns.get(ino) is node and not node.unlinked:  # it may have gone meanwhile
                    await self.reconcile(node)
            except Exception as exc:  # noqa: BLE001 - write-back must outlive any bug or local failure
                self.supervisor.failed("write-back", exc, f"of {self.ns.describe(node)} failed unexpectedly")
                self._failed(node, PrivifsError(f"unexpected failure: {exc!r}"), lasting=True)
            finally:
                self._busy.discard(ino)
            if ino in self._again:
                self._again.discard(ino)
                self.schedule(node)

    async def _yield_to_foreground(self, ino: int | None = None) -> bool:
        """Background work waits while the mount is busy (requests arriving), so a burst of
        work (untar, git, a build) runs at local speed; it never waits longer than MAX_DEFER
        and never when an fsync asks for this node. A worker deferring node ``ino`` gives way
        (returns False: the caller puts the node back) when an fsync waits on another node that
        no worker holds: with every worker deferring a file closed before, an fsync waited up to
        MAX_DEFER while the mount stayed busy (hT: 25-29 s against 0.13 s quiet, and an fsync a
        second during a ``cp -r`` took 29 s each)."""
        start = self._deferred_since.pop(ino, None) if ino is not None else None
        if start is None:
            start = trio.current_time()
        while not (ino is not None and self._fsync[ino]) and trio.current_time() - start < MAX_DEFER:
            if ino is not None and self._gone(ino):
                return True  # removed meanwhile (a journal SQLite deletes at each commit): nothing to wait for
            quiet_for = trio.current_time() - self.last_activity
            if quiet_for >= QUIET:
                return True
            with trio.move_on_after(QUIET - quiet_for):
                await self._fsync_asked.wait()
            if ino is not None and not self._fsync[ino] and self._queue.urgent_waiting:
                self._deferred_since[ino] = start
                return False
        return True

    def _gone(self, ino: int) -> bool:
        """Whether nothing of the node is to be written back any more (it left the tree, and no
        upload of it is in flight)."""
        node = self.ns.get(ino)
        return node is None or node.unlinked and not node.uploading

    async def _later(self, ino: int, due: float) -> None:
        try:
            await trio.sleep_until(due)
        finally:
            if self._waiting.get(ino) == due:
                del self._waiting[ino]
        node = self.ns.get(ino)
        if node is not None:
            self.schedule(node)

    def refused_since(self, nodes: list[Node], since: float) -> bool:
        """Whether every one of ``nodes`` had its write-back refused (by the server, or by a
        failure of ours that repeats) at or after ``since`` and is not being uploaded now."""
        return all(not n.uploading and self.refused.get(n.ino, -math.inf) >= since for n in nodes)

    def failing_again(self, nodes: list[Node], since: float, grace: float) -> bool:
        """Whether every one of ``nodes`` has failed every write-back attempt for ``grace``
        seconds at least, its last two at or after ``since``, and none is being written back now
        (a file the server always answers 5xx for, while everything else goes through)."""
        now = trio.current_time()
        for n in nodes:
            began, last = self.failures.get(n.ino, (now, ()))
            if n.ino in self._busy or len(last) < 2 or last[0] < since or now - began < grace:
                return False
        return True

    def all_failed_locally(self, nodes: list[Node], since: float) -> bool:
        """Whether every one of ``nodes`` failed its last write-back attempt, made at or after
        ``since`` (trio clock), on damaged content or local state (:attr:`failed_locally`), and
        none is being written back now."""
        for n in nodes:
            last = self.failures.get(n.ino, (0.0, ()))[1]
            if n.ino not in self.failed_locally or n.ino in self._busy or not last or last[-1] < since:
                return False
        return bool(nodes)

    def retry_all_now(self) -> None:
        for node in self.ns.pending():
            self.ns.schedule_retry(node, 0.0)
            self.schedule(node)
        self.wake_tombstones()

    # -- reconciliation ------------------------------------------------------------------------
    async def reconcile(self, node: Node) -> None:
        try:
            if node.is_file and node.content_dirty and node.staged is not None:
                if node.waiting_for_close and not self._fsync[node.ino] and node.ino not in self.local_fsynced:
                    return  # uploaded on the last close
                async with self._big if node.size > BIG_UPLOAD else contextlib.nullcontext():
                    self._still_there(node)  # (removed while it waited for a slot?)
                    await self._upload(node)
            elif awaits_marker(node):
                await self._marker(node)
            if node.token and node.meta_dirty and not node.content_dirty and not node.unlinked:
                await self._update_meta(node)
        except NodeGone:
            self.refused.pop(node.ino, None)
            self.failures.pop(node.ino, None)
            self.failed_locally.discard(node.ino)
            self.ns.release(node, self.staging)  # removed while its write-back waited: nothing to send
            self._meta_attempted(node.ino, None)
            return
        except PrivifsError as exc:
            self._failed(node, exc)
            return
        self.refused.pop(node.ino, None)
        self.failures.pop(node.ino, None)
        self.failed_locally.discard(node.ino)
        self.ns.record_success(node)
        self.last_success_at = time.time()
        self._meta_attempted(node.ino, None)
        self.answered()
        if not node.content_dirty:
            self.local_fsynced.discard(node.ino)

    def remote_changed(self) -> None:
        """Another client changed the vault meanwhile: the refresher should look now."""
        self.look_soon(0.0)

    def answered(self) -> None:
        """The server answered (a write-back, a listing, a probe): it is reachable again, and
        what backed off meanwhile goes now. (Only a write-back's success ended it: while the
        first one after an outage ran, a big file's, status said UNREACHABLE and 'privifs
        umount' gave up on a server that answered.)"""
        self.failing_since = None
        self.answered_at = time.monotonic()
        self.answered_once = True
        if self.unreachable_since is not None:
            self.unreachable_since = None
            self.retry_all_now()

    def answered_lately(self) -> bool:
        """Whether the server answered less than :data:`SERVER_BACK_GRACE` ago: one that stops
        answering then is likely being restarted, and an fsync waits for it."""
        return self.answered_once and time.monotonic() - self.answered_at < SERVER_BACK_GRACE

    def unanswered(self, exc: PrivifsError) -> None:
        """A request (a write-back, a listing) failed with ``exc``: a server that cannot be
        reached counts as unreachable from now on, until it answers (:meth:`answered`)."""
        if isinstance(exc, ServerUnreachable) and self.unreachable_since is None:
            self.unreachable_since = time.time()

    def _failed(self, node: Node, exc: PrivifsError, *, lasting: bool = False) -> None:
        """Record a failed write-back attempt and schedule the retry; ``lasting``: a failure a
        retry soon will meet again (a bug's), as a refusal by the server is."""
        attempts = self.ns.record_error(node, str(exc))
        if isinstance(exc, (IntegrityError, LocalStoreError)):
            self.failed_locally.add(node.ino)
        else:
            self.failed_locally.discard(node.ino)
        self.failures.setdefault(node.ino, (trio.current_time(), deque(maxlen=2)))[1].append(trio.current_time())
        if lasting or isinstance(exc, REFUSALS):
            self.refused[node.ino] = trio.current_time()
        else:
            self.refused.pop(node.ino, None)
        delay = min(MAX_BACKOFF, 0.5 * 2 ** min(attempts, 12))
        if isinstance(exc, CommandRejected):
            delay = max(delay, 30.0)
        if isinstance(exc, VaultFull):
            # room comes back all at once (a file deleted, a filler removed), and nothing here
            # tells when: waiting out the whole backoff left an upload staged for up to five
            # minutes after the engine's disk had room again (helper hAX F1); asking a full
            # engine again costs a few refused requests per pending file
            delay = min(delay, VAULT_FULL_RETRY)
        room_made = self.server_full is not None and isinstance(exc, VaultFull) and self.server_full(node.size) > 0
        waits = self._fsync[node.ino] and fsync_waits_through(
            exc,
            isinstance(exc, ServerUnreachable) and (self.server_restarting() or self.answered_lately()),
            room_made,
            self._odd_answers[node.ino],
        )
        if waits and isinstance(exc, ProtocolError):
            self._odd_answers[node.ino] += 1
        if waits:
            delay = min(delay, FSYNC_RETRY)
        elif self.flushing:
            delay = min(delay, FLUSH_RETRY)
        self.ns.schedule_retry(node, trio.current_time() + delay)
        self.last_error = f"{self.ns.describe(node)}: {exc}"
        self.last_error_at = time.time()
        self.unanswered(exc)
        if isinstance(exc, ServerError) and self.failing_since is None:
            self.failing_since = time.time()
        # an fsync's retries are logged each (they are few and bounded); every other kind of
        # failure once per 10 s, saying for how many more (a full server failed every pending
        # upload alike: a line each filled the log on the disk that lacked room)
        line = ("%s: %s; retrying in %.0fs (attempt %d)", self.ns.describe(node), exc, delay, node.attempts)
        if waits:
            log.warning(*line)
        else:
            self.retry_warnings.warn((type(exc), _alike(str(exc))), *line)
        if node.staged is not None and not waits:
            self._finish_commit(node.staged, exc)
        if not waits:
            self._meta_attempted(node.ino, exc)
        self.schedule(node)

    async def _plaintext(self, staged: StagedFile, ino: int, h: hmac.HMAC | None = None) -> AsyncIterator[bytes]:
        """The staged content piece by piece for one upload attempt (``h`` digests it)."""
        self.sent[ino] = 0  # each attempt streams from the start
        for piece in staged.sealed.chunks(PIECE_CHUNKS):
            self.sent[ino] += len(piece)
            if h is not None:
                h.update(piece)
            yield piece

    async def _put_whole(self, node: Node, staged: StagedFile, meta: FileMeta) -> tuple[str, dict[str, str]]:
        """Store the staged content as one token: the token, and the risk meta that states its
        content digest (privifs.crypto.digest)."""
        attempt: list[hmac.HMAC] = []

        def pieces() -> AsyncIterator[bytes]:
            attempt[:] = [digest.hasher(self.content_key)]
            return self._plaintext(staged, node.ino, attempt[0])

        token = await self.vault.put_stream(pieces, staged.size, meta)
        return token, {digest.FIELD: attempt[0].hexdigest()}

    def _digest_of(self, sealed: SealedFile) -> dict[str, str]:
        """The risk meta stating the content digest of ``sealed``'s plaintext."""
        h = digest.hasher(self.content_key)
        for piece in sealed.chunks(PIECE_CHUNKS):
            h.update(piece)
        return {digest.FIELD: h.hexdigest()}

    def content_check(self, node: Node) -> digest.ContentCheck | None:
        """The check of a download of the node's token (None: its risk meta states no digest)."""
        return digest.check_for(self.content_key, node.risk()) if node.remote_risk else None

    async def fetch_content(self, node: Node, token: str) -> SealedFile:
        """The verified whole content of ``token`` (the node's, stored whole), from the cache or
        downloaded into it. The node's size counts as the content's only when a digest states
        the content too (what privifs writes): another application's meta size is a claim, so
        it decides neither the room made for the download nor how the download is read."""
        check = self.content_check(node)
        size = node.size if check is not None else None
        cached = self.cache.holds(token)
        sealed = await self.cache.fetch(token, self.vault, size, check=check)
        if cached and size is not None and sealed.size != size:
            # the size in a cache entry's header is not authenticated: an entry that disagrees
            # with the size its digest states is damaged (read as it said, the file lost or
            # gained bytes, its size in the mount changing with them); downloaded again
            log.warning("dropping a damaged cache entry (%d bytes where %d are stated)", sealed.size, size)
            sealed.close()
            self.cache.evict(token)
            sealed = await self.cache.fetch(token, self.vault, size, check=check)
        return sealed

    def _target(self, node: Node) -> tuple[str, str, str, str]:
        name, extension = token_naming(node)
        return self.ns.context(node), name, extension, self.ns.path(node)

    @contextlib.contextmanager
    def _claiming(self, context: str, name: str):
        """While an upload is in flight, the name it takes on the server counts as ours (the
        refresher must not show a token appearing under it as a stranger)."""
        key = (tuple(split_context(context)), name)
        self.inflight_names[key] += 1
        try:
            yield
        finally:
            self.inflight_names[key] -= 1
            if not self.inflight_names[key]:
                del self.inflight_names[key]

    def _tombstone(self, token: str) -> None:
        """Have ``token`` deleted from the vault in the background (durably recorded first)."""
        self.index.add_tombstone(token)
        self.wake_tombstones()

    def _recorded(self, node: Node, token: str, context: str, name: str, extension: str) -> None:
        """The node's content now lives in ``token``, named as the server has it."""
        self.ns.mark_uploaded(node, token, context, name, extension, trio.current_time())

    async def _alone_at(self, node: Node) -> None:
        """The conflict copies this mount shows of the name ``node`` is about to be stored under
        are named so in the vault first (their tokens renamed to the conflict names they show
        under: "renaming one makes the new name its own"), so the version stored next is alone at
        its path. Left claiming it, a copy made before it came first in the claim order: within
        a listing the save moved to a conflict name on every mount and the version before it was
        back under the name (hN F1: a program's fsynced save read back as the previous one; after
        a power cut, SQLite's database "malformed"). A copy with changes of its own being written
        back, or renamed here, is left to that; another application's token (no risk meta of
        privifs) is not renamed by privifs on its own. A conflict copy that is itself saved is
        stored under the name it shows: at its token's name it was a copy again, under the
        conflict name of its new token (a file renamed under the program editing it), and a
        copy another mount named so meanwhile was a copy of a copy (helper hP)."""
        if shown_aside(node):
            self.ns.show_as(node, None)
        for copy in self._copies_aside(node.parent, node.name, but=node):
            log.info(
                "%s: stored under the conflict name it shows, as the file it is a copy of is saved here",
                self.ns.describe(copy),
            )
            self._busy.add(copy.ino)
            try:
                self._own_name(copy)
                await self._update_meta(copy)
            finally:
                self._busy.discard(copy.ino)
                if copy.meta_dirty and not copy.unlinked:
                    self.schedule(copy)

    def _copies_aside(self, parent: int, name: str, *, but: Node | None = None) -> list[Node]:
        """The conflict copies this mount shows of ``name`` in the directory ``parent`` (their
        tokens claim that name) that privifs may name so in the vault now: privifs' own tokens,
        with no change of their own being written back, nor renamed here."""
        copies = []
        for ino in self.ns.aside.get((parent, name), ()):
            copy = self.ns.nodes.get(ino)
            if (
                copy is not None
                and copy is not but
                and not copy.unlinked
                and copy.parent == parent
                and copy.token
                and copy.ino not in self._busy
                and not copy.content_dirty
                and not copy.meta_dirty
                and shown_aside(copy)
                and shown_name(copy.remote_name, copy.remote_extension) == name
            ):
                copies.append(copy)
        return copies

    def _own_name(self, copy: Node) -> None:
        """``copy``'s token is to be renamed to the name it shows (its own from now: token_naming)."""
        self.ns.show_as(copy, None)
        self.ns.meta_changed(copy)
        self.index.save(copy)

    def holder_removed(self, parent: int, name: str) -> None:
        """The file holding ``name`` in ``parent`` was removed here: the conflict copies shown
        aside of it are named so in the vault (their meta is written back like a rename's), so that
        none takes the name after it. A copy that did was the
        version before on every mount: a SQLite WAL left in the vault by an upload a power cut
        interrupted came back as the -wal once SQLite deleted it, and SQLite read its old frames
        (helper hP). Seen from the mount that removed the file, the copy just keeps its name."""
        for copy in self._copies_aside(parent, name):
            log.info(
                "%s: stored under the conflict name it shows, as the file it is a copy of is removed",
                self.ns.describe(copy),
            )
            self._own_name(copy)
            self.schedule(copy)

    def _still_there(self, node: Node) -> None:
        """NodeGone if the file ``node`` was removed meanwhile, which let go of its staged content:
        nothing to send."""
        if node.unlinked or node.staged is None:
            raise NodeGone(f"{self.ns.describe(node)} was removed")

    async def _upload(self, node: Node) -> None:
        await self._alone_at(node)
        # (removed while the copies were renamed? requests: the program went on; hAV F1:
        # None.freeze(), a write-back failure)
        self._still_there(node)
        staged = node.staged
        staged.freeze()
        size = staged.size
        context, name, extension, path = self._target(node)
        replaced, seen_at = node.token, remote_place(node)
        replaces_manifest = replaced is not None and is_manifest_node(node.remote_risk)
        self.ns.begin_upload(node, streaming=True)
        self.index.save(node)
        self._flights[node.ino] = (staged, context, name)
        failed = False
        try:
            with self._claiming(context, name):
                meta = FileMeta(name, extension, context, size, path)
                await self._settle_last_store(node)
                stale: list[str] = []
                manifest_risk = content_risk = None
                if size > PARTS_THRESHOLD:
                    token, stale, manifest_risk = await self._store_parts(node, staged, meta)
                else:
                    token, content_risk = await self._put_whole(node, staged, meta)
                    if replaces_manifest:  # shrunk below the threshold: the manifest's parts retire
                        stale = await self._parts_of(replaced, path)
                moved = (
                    replaced is not None
                    and replaced != token
                    and await self._moved_elsewhere(replaced, seen_at, (context, name, extension))
                )
                keep = moved is True
                if replaced is not None and replaced in self._gone_elsewhere:
                    self._gone_elsewhere.discard(replaced)
                    if manifest_risk is not None:
                        token = await self._parts_still_there(node, staged, meta, token, manifest_risk, context)
                self._record_content(
                    node,
                    staged,
                    token,
                    context,
                    name,
                    extension,
                    keep_old=keep,
                    manifest_risk=manifest_risk,
                    content_risk=content_risk,
                    finish=False,
                )
        except PrivifsError as exc:
            failed = True
            self._remember_unsettled(node, exc, FileMeta(name, extension, context, size, path))
            if getattr(exc, "made", None) is not None:
                # a manifest made but not marked: deleted, or it stays at the file's place and,
                # older than the retry's, takes the plain name there on every mount
                log.info("%s: deleting the manifest %s its failed upload made", self.ns.describe(node), exc.made)
                try:
                    self._tombstone(exc.made)
                except PrivifsError as again:
                    log.warning("%s: the manifest %s is left (%s)", self.ns.describe(node), exc.made, again)
            if staged.id in self._superseded:  # failed: no token was made (a cancel keeps it: unknown)
                self._superseded.discard(staged.id)
                try:
                    self.index.drop_superseded(staged.id)
                except PrivifsError as exc:
                    log.warning("could not record the end of an upload: %s", exc)
            raise
        finally:
            self._flights.pop(node.ino, None)
            self.ns.end_upload(node)
            self.sent.pop(node.ino, None)
            if node.staged is staged:
                staged.frozen = False
                if node.opens <= 0:  # (a failed upload: kept, closed until it is tried again)
                    staged.sealed.park()
            elif failed:  # written again meanwhile (a copy took its place): this content is no one's
                self.staging.remove(staged)  # (an upload that succeeds has _record_content remove it)
            if node.unlinked and staged.id not in self._superseded:
                # (still superseded: the upload was cancelled, by a stop; its staged file stays
                # for the next start to tell its token, if the server made one, from a file)
                self.ns.release(node, self.staging)
        self.uploads += 1
        if manifest_risk is not None and not node.unlinked:  # (a removed file's manifest is being deleted)
            self.stored_manifests.add(token)
        try:
            if replaced is not None and replaced != token and moved is None:
                # whether another client renamed it could not be told: deleted once the listing
                # shows it still where this mount saw it (or here), retried by the tombstone task
                # until it can tell (kept for good, it held the plain name on every other mount
                # and on this one after a restart: the fsynced content was a conflict copy, helper
                # hS F1); its parts the new manifest does not name are left to the sweep
                self._removed_at[replaced] = [seen_at, (context, name, extension)]
                self.stored_manifests.discard(replaced)
                await self._delete_tombstone(replaced)
            elif replaced is not None and replaced != token and not keep:
                # before an fsync returns: a crash between the two left both versions at the
                # file's place, where the older keeps the plain name (claim order) on a mount
                # without this one's index, and the fsynced content showed as a conflict copy
                await self._delete_now(replaced)
                self.stored_manifests.discard(replaced)
                self.retire_parts(context, stale)
        finally:
            self._finish_commit(staged, None)
        if not node.unlinked:
            await self._update_meta(node)

    async def _parts_of(self, manifest: str, path: str) -> list[str]:
        """The parts ``manifest`` (the one a file's new content replaces) names; none if it
        cannot be read (they are left to the sweep)."""
        try:
            return (await self.parts.reader.manifest(manifest)).tokens()
        except PrivifsError as exc:
            log.info("%s: the parts of the manifest it replaced are left to the sweep (%s)", path, exc)
            return []

    async def _settle_last_store(self, node: Node) -> None:
        """Before a store of ``node`` (content or marker): the token its last failed store may
        have made all the same is asked for and deleted (:meth:`_drop_unconfigured`)."""
        earlier = self._unconfigured.pop(node.ino, None)
        if earlier is not None:
            await self._drop_unconfigured(node, *earlier)

    def _remember_unsettled(self, node: Node, exc: PrivifsError, meta: FileMeta) -> None:
        """A store of ``node`` under ``meta`` failed at configure-file-meta, after the server may
        have made its token: settled by the next store's start or the node's removal."""
        if getattr(exc, "unconfigured", None) is not None:
            self._unconfigured[node.ino] = (exc.unconfigured, meta)

    async def _drop_unconfigured(self, node: Node, tmp: object, meta: FileMeta) -> None:
        """The node's last upload failed at configure-file-meta, after its data was sent, and the
        server may have made the token all the same (it answered an error after doing it, or the
        answer was lost). Asked again, the server names the token it made; that token is deleted,
        since the node's content is stored anew (or the node is gone). Before, it stayed and
        showed on every mount as a second copy of the file (a conflict name) or as a removed file
        back. A server that still does not answer leaves it for the next try."""
        try:
            token = await self.tokens.configure(tmp, meta)
        except PrivifsError as exc:
            if getattr(exc, "transient", False) and not node.unlinked:
                self._unconfigured[node.ino] = (tmp, meta)
                raise
            log.debug("%s: the last upload's reservation made no token (%s)", self.ns.describe(node), exc)
            return
        if token == node.token or token in self.ns.by_token:  # recorded meanwhile (adopted)
            return
        log.info(
            "%s: the last upload's token %s was made although the server reported a failure; deleting it",
            self.ns.describe(node),
            token,
        )
        self._tombstone(token)

    async def _drop_after_removal(self, node: Node, tmp: object, meta: FileMeta) -> None:
        try:
            await self._drop_unconfigured(node, tmp, meta)
        except PrivifsError as exc:
            log.warning("%s: a token its last upload may have made is left (%s)", self.ns.describe(node), exc)
        except Exception as exc:  # noqa: BLE001 (a bug: logged and shown, never the end of the write-back)
            self.supervisor.failed("write-back", exc, "settling a removed file's last upload failed unexpectedly")

    async def _store_parts(self, node: Node, staged: StagedFile, meta: FileMeta) -> tuple[str, list[str], dict]:
        """Store a big file as parts + a manifest (:mod:`privifs.fs.partwrite`): the manifest
        token, the replaced manifest's parts no longer named, and the manifest's risk meta."""
        old = await self.parts.old_manifest(node.token, is_manifest_node(node.remote_risk), self.ns.describe(node))
        risk = node_risk(node, {})
        ino = node.ino
        self.sent[ino] = 0  # umount's progress: a part counts once uploaded (or kept)

        def progress(n: int) -> None:
            self.sent[ino] = self.sent.get(ino, 0) + n

        token, stale = await self.parts.store_staged(staged, old, meta, risk, node.token, progress)
        # a failed attempt's parts the file changed since (named by no manifest of this file) are
        # retired now: _upload retires stale parts only when a replaced manifest goes, and a new
        # file has none (they were left to the hourly sweep)
        replaced = set(old.tokens()) if old is not None else set()
        self.retire_parts(meta.context, [t for t in stale if t not in replaced])
        return token, [t for t in stale if t in replaced], risk  # with the mark PartStore.put_manifest added

    async def _parts_still_there(
        self, node: Node, staged: StagedFile, meta: FileMeta, token: str, risk: dict, context: str
    ) -> str:
        """The manifest this upload replaced was deleted by another client meanwhile (it
        rewrote or removed the file): the parts the new manifest ``token`` kept from it may have
        been deleted too, a minute after that client stopped naming them, when no manifest named
        them yet (this client held the file open, was offline, or its write-back waited longer).
        A manifest naming a deleted part is EIO on every other machine (and here once the cache
        lets the file go), so every kept part is checked, and if one is gone the whole file is
        stored again from staging (every part uploaded) and the broken manifest deleted."""
        manifest = await self.parts.reader.manifest(token)
        named = list(dict.fromkeys(manifest.tokens()))
        there = {i.token for i in await find_each(self.tokens, named)}
        missing = [t for t in named if t not in there]
        if not missing:
            return token
        log.warning(
            "%s: %d parts kept from the version it replaced were deleted by another client; storing every part again",
            self.ns.describe(node),
            len(missing),
        )
        self._tombstone(token)  # first: if the store below fails, the upload is retried from staging
        self.retire_parts(context, [t for t in manifest.tokens() if t not in missing])
        fresh, _ = await self.parts.store_staged(staged, None, meta, risk, None, lambda n: None)
        return fresh

    # -- parts a rewrite stopped naming ---------------------------------------------------------
    def retire_parts(self, context: str, parts: list[str]) -> None:
        """The replaced manifest's parts the new one does not name: deleted after RETIRE_GRACE
        unless a manifest in the vault names them (see :meth:`_named_in_the_vault`). Another
        client rewriting the same file at the same time based its manifest on the same old one
        and reuses those parts; deleting them at once broke its version (EIO everywhere)."""
        due = trio.current_time() + self.retire_grace
        self._retired.extend((due, context, part) for part in parts)
        try:  # (recorded: a stop before the grace is over leaves them to the next start)
            self.index.add_retired([(part, context, time.time() + self.retire_grace) for part in parts])
        except PrivifsError as exc:
            log.warning("retired parts are kept in memory only (%s); a stop leaves them to the sweep", exc)

    def _load_retired(self) -> None:
        """The parts an earlier run retired and did not get to delete, due as recorded."""
        if self._retired_loaded:
            return
        self._retired_loaded = True
        now, wall = trio.current_time(), time.time()
        known = {r[2] for r in self._retired}
        for part, context, due in self.index.retired():
            if part not in known:
                self._retired.append((now + max(0.0, due - wall), context, part))

    def manifest_removed(self, token: str, context: str, risk: dict[str, str]) -> None:
        """``token``, the manifest of a file being removed, is tombstoned: when the token
        deletion gets to it, its parts are read from it before it goes and then retired as a
        rewrite's stale parts are (:meth:`retire_parts`), so removing a big file frees its space
        in the vault within about a minute, not at the hour-old sweep. Kept in memory only: after
        a restart the sweep (``PartReader.sweep``) collects them. ``risk``: the token's risk meta,
        which states the manifest's digest (another file's manifest is no guide to what to delete)."""
        self._dropped[token] = (context, risk)
        self.stored_manifests.discard(token)

    async def _parts_of_dropped(self, token: str) -> list[str]:
        """The parts named by ``token`` if it is a removed file's manifest (else none); a
        manifest that cannot be read leaves its parts to the sweep."""
        if token not in self._dropped:
            return []
        try:
            return (await self.parts.reader.manifest(token, self._dropped[token][1])).tokens()
        except PrivifsError as exc:
            log.info("the parts of a removed file's manifest are left to the sweep: %s", exc)
            return []

    async def _retire_loop(self) -> None:
        self._load_retired()
        while True:
            await trio.sleep(min(RETIRE_CHECK, self.retire_grace))
            await self.retire_due()
            self.parts.unfinished.let_go_old()  # a failed store's parts no store came back for
            self.retire_unfinished()

    def retire_unfinished(self) -> None:
        """The parts failed stores uploaded for files removed (or recopied) since: retired (see
        :meth:`Unfinished.let_go_gone <privifs.fs.partwrite.Unfinished.let_go_gone>`)."""
        gone = self.parts.unfinished.let_go_gone(lambda sid: self.staging.path(sid).exists())
        if gone:
            log.info("retiring %d parts of failed stores whose files are gone", len(gone))
            self.retire_parts(fmt.PARTS_CONTEXT, gone)

    async def retire_due(self, now: float | None = None) -> int:
        """Delete the retired parts whose grace is over (see :meth:`retire_parts`); returns how
        many went. A directory whose listing fails keeps its parts for the next round; the
        parts of a mount that stops first are left to the sweep (``PartReader.sweep``)."""
        now = trio.current_time() if now is None else now
        due = [r for r in self._retired if r[0] <= now]
        by_context: dict[str, list[str]] = {}
        for _, context, part in due:
            by_context.setdefault(context, []).append(part)
        gone = 0
        if not by_context:
            return 0
        try:
            named, parts_listed = await self._named_in_the_vault()
        except PrivifsError as exc:
            log.info("retired parts wait for the next round: %s", exc)
            return 0
        handled: set[tuple[str, str]] = set()
        try:
            for context, parts in by_context.items():
                for part in parts:
                    if part in named:
                        log.info("a part a rewrite stopped naming is kept: another manifest names it")
                    elif part not in parts_listed:
                        # a manifest can name any token: another application's naming an
                        # ordinary file had that file deleted with it (helper hAG F1); a part
                        # already gone needs nothing, and one the listings missed is collected
                        log.info("token %s a manifest named is not a part privifs stored; not deleted", part)
                    else:
                        self._tombstone(part)
                        gone += 1
                    handled.add((context, part))
        except PrivifsError as exc:  # the index cannot record a deletion (a full disk): it failed the task as a bug
            log.warning("retired parts wait for the next round: a deletion cannot be recorded (%s)", exc)
        self._retired = [r for r in self._retired if (r[1], r[2]) not in handled]
        try:  # (a tombstone now records each deletion)
            self.index.drop_retired([part for _, part in handled])
        except PrivifsError as exc:
            log.warning("could not record the end of retired parts (%s); the next start retires them again", exc)
        return gone

    async def _lost_for_good(self, token: str, exc: NotFoundError) -> bool:
        """After a 404 for manifest ``token``'s content: False when the vault no longer lists it
        (deleted since the listing); MalformedAnswer (the retirement waits for its next round)
        while it is still listed, as a 404 changed on its way would be; True once that happened
        :data:`LOST_MANIFEST_TRIES` times: a token whose blob the server lost (a damaged engine, a
        blob removed by hand) held back every retirement for good and the vault's space leaked
        (hAT F9); a manifest that cannot be read keeps no part, as a damaged one."""
        try:
            await confirm_gone(self.tokens, token, exc, "download of a manifest")
            return False
        except MalformedAnswer:
            self._lost_manifests[token] = self._lost_manifests.get(token, 0) + 1
            if self._lost_manifests[token] < LOST_MANIFEST_TRIES:
                raise
            return True

    async def _named_in_the_vault(self) -> tuple[set[str], set[str]]:
        """The parts named by the vault's manifests that are not going away (not deleted or being
        deleted by this mount), wherever they are, from two listings read one after the other;
        and the tokens those listings show as parts privifs stored (:func:`is_part`).
        This mount's own live manifests count too: when two clients rewrote one big file at
        once, the writer whose version became the conflict copy and that then rewrote the plain
        one (the other's version) retired parts its own conflict copy still named; skipped as
        "stored here", they were deleted and that copy read EIO. So do manifests in other
        directories: a conflict copy moved elsewhere lost those parts the same way. Two
        listings: one is read page by page, and a deletion (this mount's own tombstones, say)
        while it is read makes a page start one token later, so a manifest can be missing from
        one, and the parts it names were deleted under its file."""
        named: set[str] = set()
        parts_listed: set[str] = set()
        going = self.index.tombstones()
        listed: dict[str, frozenset[str]] = {}
        for _ in range(2):
            async for info in self.tokens.list():
                if is_part(info):
                    parts_listed.add(info.token)
                    continue
                marked = is_manifest(info)
                if not marked and not maybe_unmarked_manifest(info) or info.token in going or info.token in listed:
                    continue
                if info.token in self.recently_deleted:  # deleted here; a listing may still show it
                    continue
                parts = self._manifest_parts.get(info.token)
                if parts is None:  # a token's content never changes: each manifest is read once
                    try:
                        # a manifest whose writer was killed before its mark was written names
                        # its parts as much: they were deleted, and its file (shown under the
                        # plain name) read EIO on every mount for good (helper hAP F2)
                        parts = (
                            frozenset(await self._parts_named(info))
                            if marked
                            else await self.parts.reader.unmarked_parts(info)
                        )
                    except NotFoundError as exc:
                        # (still listed: a 404 changed on its way; taken for a deletion, the parts
                        # it names, a conflict copy's, were deleted)
                        if not await self._lost_for_good(info.token, exc):
                            continue  # deleted since the listing: it names nothing
                        log.warning(
                            "manifest %s is listed but its content answered 404 %d times; it keeps no part",
                            info.token,
                            LOST_MANIFEST_TRIES,
                        )
                        parts = frozenset()  # (remembered: not downloaded again)
                    except IntegrityError as exc:
                        # not a manifest (another application's token with the mark), or its
                        # ciphertext is damaged: it names no part it could be read for; waiting
                        # for it held back every retirement for good
                        log.info("manifest %s cannot be read (%s); it keeps no part", info.token, exc)
                        continue
                listed[info.token] = parts
                named.update(parts)
        self._manifest_parts = listed  # those still in the vault
        return named, parts_listed

    async def _parts_named(self, info: TokenInfo) -> list[str]:
        """The part tokens the manifest ``info`` names. One that decodes but is not the manifest
        its risk meta states (a stale or swapped digest: its file reads EIO) still counts, read
        unchecked and not kept in the reader's memory: its parts may be what a repair needs."""
        try:
            return (await self.parts.reader.manifest(info.token, info.risk)).tokens()
        except IntegrityError:
            return (await self.parts.reader.store.manifest(info.token)).tokens()

    async def _delete_now(self, token: str) -> None:
        """Delete a replaced token right after the check that it did not move (the shorter the
        gap, the less room for a rename elsewhere to slip in); the tombstone task retries."""
        try:
            await self.tokens.delete(token)
        except PrivifsError:
            return
        self._deleted(token)

    def _deleted(self, token: str) -> None:
        """``token`` is gone from the vault: forget its tombstone, have the refresher ignore it in
        listings taken before the delete, and drop its cached content (a version this mount
        replaced or a file it removed: no entry names it any more; a handle still reading it
        keeps its open file). Left cached, every such version stayed until the cache was full."""
        try:
            self.index.drop_tombstone(token)
        except PrivifsError as exc:
            log.warning("could not record the deletion of %s: %s", token, exc)
        self.recently_deleted[token] = trio.current_time()
        self._overwritten.pop(token, None)  # (a rename's replaced token: nothing left to delete)
        self.cache.evict(token)

    async def _moved_elsewhere(
        self,
        token: str,
        seen_at: Place,
        ours: tuple[str, str, str] | None = None,
    ) -> bool | None:
        """Whether ``token`` (the content being replaced) now has another place or name than
        ``seen_at`` (context, fileName, extension as this mount last saw it) and than ``ours``
        (where this mount puts the file now): then another client renamed it meanwhile and it
        must not be deleted. None when that cannot be told now (the look-up failed). At
        ``ours`` it is this mount's own rename, whose update landed though its answer was lost
        (a 502 after the work, a dropped acknowledgement) or though the mount was killed before
        recording it: taken for another client's, it left the old content beside the new as a
        conflict copy (found by kill -9 cycles against a faulty engine)."""
        try:
            info = await find(self.tokens, token)
        except PrivifsError as exc:
            log.warning("cannot tell yet whether token %s was renamed elsewhere (%s); looked at again", token, exc)
            return None
        if info is None:
            self._gone_elsewhere.add(token)
            return False  # deleted elsewhere: nothing to keep

        def at(place: Place | None) -> bool:
            if place is None:
                return False
            context, name, extension = place
            return (
                same_context(info.context, context)
                and info.file_name == name
                and (info.extension or "") == (extension or "")
            )

        moved = not (at(seen_at) or at(ours))
        if moved:
            log.info(
                "token %s was renamed by another client to %s/%s while this mount replaced its content; both stay",
                token,
                info.context,
                info.file_name,
            )
            self.remote_changed()
        return moved

    def _record_content(
        self,
        node: Node,
        staged: StagedFile,
        token: str,
        context: str,
        name: str,
        extension: str,
        *,
        keep_old: bool = False,
        manifest_risk: dict | None = None,
        content_risk: dict | None = None,
        finish: bool = True,
    ) -> None:
        """The vault acknowledged ``token`` with ``staged``'s content: switch the node to it (the
        token it replaces is deleted unless ``keep_old``). ``manifest_risk`` (a file stored as
        parts) or ``content_risk`` (one stored whole: its digest) is the risk meta that states
        the content, kept by every later meta update. ``finish``: an fsync waiting for this
        content returns (else the caller ends it)."""
        with self.index.kept():
            if staged.id in self._superseded:
                self._superseded.discard(staged.id)
                self.index.drop_superseded(staged.id)
            if node.unlinked:
                if manifest_risk is not None:  # its parts go with it (the file was removed)
                    self.manifest_removed(token, context, manifest_risk)
                self._tombstone(token)
                if node.staged is not staged:
                    self.staging.remove(staged)
                elif node.opens <= 0 and node.lookups <= 0:
                    self.ns.clear_staged(node)
                    self.staging.remove(staged)
                # else still open (or held by the kernel): its descriptors read the staged copy,
                # which Namespace.release removes once they let go (it was removed here, and a
                # reader that had the file open when it was unlinked read it as empty)
                self._finish_commit(staged, None)
                self.ns.release(node, self.staging)
                return
            old = node.token
            if old and old != token and not keep_old:
                self._tombstone(old)
            self._recorded(node, token, context, name, extension)
            stated = manifest_risk if manifest_risk is not None else content_risk
            if stated is not None:  # kept by later meta updates (tokenmeta.CARRIED)
                self.ns.set_remote_risk(node, json.dumps(stated, sort_keys=True))
            self.ns.meta_pending(node)
            if node.staged is staged:
                self.ns.clear_staged(node, content_clean=True)
                # the staged file moves into the cache only once the index records the token: a
                # crash before the commit finds it still staged (and the next start adopts the
                # token as an interrupted upload); one after it finds an orphan, removed at start
                self.index.after_commit(lambda: self._to_cache(token, staged))
            else:
                self.index.after_commit(lambda: self.staging.remove(staged))
            self.index.save(node)
        if finish:
            self._finish_commit(staged, None)

    def _to_cache(self, token: str, staged: StagedFile) -> None:
        """An uploaded staged file becomes ``token``'s cache entry (or goes, if it cannot),
        bound to the token while it is still open here (the cache would open it again for that)."""
        try:
            staged.sealed.move_to(staged.path, token)
        except PrivifsError as exc:
            log.debug("not caching uploaded content: %s", exc)
            self.staging.remove(staged)
            return
        staged.sealed.close()
        if not self._adopt(token, staged):
            self.staging.remove(staged)

    def _adopt(self, token: str, staged: StagedFile) -> bool:
        try:
            return self.cache.adopt(token, staged.path, bound_to=token)
        except OSError as exc:  # e.g. the cache on another filesystem
            log.debug("not caching uploaded content: %s", exc)
            return False

    async def _marker(self, node: Node) -> None:
        context, name, extension, path = self._target(node)
        self.ns.begin_upload(node, streaming=False)
        self.index.save(node)
        meta = FileMeta(name, extension, context, 0, path)
        with self._claiming(context, name):
            # settled as a file's upload is (helper hS F3: the retry's marker was made, the first
            # one adopted, and the other showed as an empty file on every mount)
            await self._settle_last_store(node)
            try:
                token = await self.vault.put_bytes(b"", meta)
            except PrivifsError as exc:
                self._remember_unsettled(node, exc, meta)
                raise
            with self.index.kept():
                if node.unlinked:
                    self._tombstone(token)
                    return
                self._recorded(node, token, context, name, extension)
                self.index.save(node)

    def _moved_by_another(self, node: Node, token: str, ours: tuple[str, str, str]) -> tuple[str, str, str] | None:
        """Where the refresher's last listing shows ``token``, if that listing started after this
        mount last wrote the node and shows the token elsewhere than this mount last knew it
        (``remote_*``), than this mount last asked for (an update whose answer was lost) and than
        ``ours`` (where it puts the node now: an update that landed though the mount was killed
        before recording it): another client renamed or moved it meanwhile. None otherwise."""
        info = self.listed.get(token)
        if info is None or self.listed_started <= node.synced_at:
            return None
        listed = (info.context, info.file_name, info.extension or "")
        for place in (remote_place(node), self._asked.get(token), ours):
            if place is not None and same_place(place, listed):
                return None
        return listed

    async def _update_meta(self, node: Node) -> None:
        version = node.meta_version
        token = node.token
        context, name, extension, _ = self._target(node)
        moved = self._moved_by_another(node, token, (context, name, extension))
        if moved is not None and not same_place(remote_place(node), (context, name, extension)):
            # another client renamed or moved it after this mount last saw it, and this mount's
            # rename was made before it listed that: in each field that client changed (its
            # context, or its name and extension) its value wins, as if this rename had come
            # first; this rename keeps the others. A directory renamed here no longer takes back
            # an entry moved out of it elsewhere, nor does one directory renamed on two mounts
            # end up split between the two new names
            listed_context, listed_name, listed_extension = moved
            theirs_context = not same_context(listed_context, node.remote_context)
            theirs_name = listed_name != node.remote_name or listed_extension != (node.remote_extension or "")
            if (theirs_context and not same_context(context, node.remote_context)) or (
                theirs_name and (name != node.remote_name or extension != (node.remote_extension or ""))
            ):
                log.info(
                    "%s: renamed or moved by another client to %s/%s meanwhile; that change wins over the "
                    "rename made here",
                    self.ns.describe(node),
                    listed_context,
                    listed_name,
                )
                self.remote_changed()
            if theirs_context:
                context = listed_context
            if theirs_name:
                name, extension = listed_name, listed_extension
            self.ns.set_remote_name(node, listed_context, listed_name, listed_extension)
        try:
            if not same_place(remote_place(node), (context, name, extension)):
                await self._alone_at(node)
                before = remote_place(node)
                naming_a_copy = names_its_conflict_copy(node, token, (context, name, extension))
                if (
                    node.is_file
                    and not naming_a_copy
                    and (node.remote_name != name or (node.remote_extension or "") != extension)
                ):
                    await self._keep_a_copy(node, token)
                self._asked[token] = (context, name, extension)
                # only the fields this mount changed: another client's rename of the file or move
                # of a directory above it, not listed here yet, keeps what it changed (both
                # renames land, as in any serial order, instead of the later undoing the other)
                await self.tokens.update(
                    token,
                    file_name=name if node.remote_name != name else None,
                    extension=extension if (node.remote_extension or "") != extension else None,
                    context=context if not same_context(node.remote_context, context) else None,
                )
                self._asked.pop(token, None)
                if node.token != token:
                    return
                self.ns.set_remote_name(node, context, name, extension)
                if node.is_file and not naming_a_copy:  # (every mount shows a copy so: no rename to rescue)
                    self.renamed[token] = (trio.current_time(), *before)
                    # a listing that shows it renamed tells a delete made after it from one that
                    # raced it (rescue_renamed): soon, so a file another client removes on
                    # purpose once it saw the rename does not come back (helper hP: 2 of 3)
                    self.look_soon(RENAME_SEEN_AFTER)
                if self.ns.retire_markers(node):  # another mkdir's marker would keep the old path
                    self.wake_tombstones()
            if node.is_file and not written_by_privifs(node.risk()):  # listed before its writer's risk meta?
                current, young, info = await self._current_risk(token, node.risk())
                if node.token != token:
                    return
                self.ns.set_remote_risk(node, json.dumps(current, sort_keys=True) if current else None)
                if young and not written_by_privifs(current):  # its writer's risk meta may be on its way
                    self.ns.schedule_retry(node, trio.current_time() + YOUNG_RETRY)
                    self.schedule(node)
                    return
                if current.get("privifs.type", node.kind) != node.kind:
                    # listed bare, it showed as a file; its writer's risk meta says it is something
                    # else (a directory or symlink marker): "a file" written over that would turn
                    # a directory into an empty file on every other mount. Its place is written;
                    # the listing shows it as what it is
                    log.info(
                        "%s: its writer stored it as a %s meanwhile; shown as one after the next listing",
                        self.ns.describe(node),
                        current.get("privifs.type"),
                    )
                    self.remote_changed()
                    self._meta_written(node, version)
                    if not node.unlinked:
                        self.index.save(node)
                    return
                if info is not None and written_by_privifs(current):
                    self._take_writers_attributes(node, info)
            risk = node_risk(node, node.risk())
            if risk != node.risk():
                await self.tokens.set_risk(token, risk)
                if node.token != token:
                    return
                self.ns.set_remote_risk(node, json.dumps(risk, sort_keys=True))
        except NotFoundError as exc:  # also a rejected command's TokenMissing (errors.REFUSAL_REASONS)
            if node.token != token:
                raise
            # (still listed: a 404 changed on its way; taken for a deletion by another client,
            # the rename or chmod was lost)
            await confirm_gone(self.tokens, token, exc, "meta update")
            self._token_gone(node, renamed=node.remote_name != name or not same_context(node.remote_context, context))
            return
        self._meta_written(node, version)
        if not node.unlinked:
            self.index.save(node)

    def _meta_written(self, node: Node, version: int) -> None:
        """The token's meta was written from ``node`` as it was at ``version``."""
        if node.ino in self._meta_commits or self._fsync[node.ino]:
            self._meta_done[node.ino] = max(version, self._meta_done.get(node.ino, version))
        if not self.ns.meta_written(node, version, trio.current_time()):
            self.schedule(node)

    async def _current_risk(self, token: str, base: dict[str, str]) -> tuple[dict[str, str], bool, TokenInfo | None]:
        """The risk meta ``token`` has on the server now (``base`` if it is not listed). A risk
        meta write replaces the whole field set, and the node's base (``remote_risk``) may come
        from a listing taken between another client's configure-file-meta and its risk meta
        write: written over that, a chmod or rename dropped the fields of the token's content
        (tokenmeta.CARRIED: a manifest's mark, the content digest), and every mount then served
        a big file's manifest as its content. Also whether the token is young (made less than
        YOUNG_TOKEN seconds ago): its writer may still be about to write its risk meta, and a
        write made now could land after that and drop it all the same (no compare-and-set); and
        the token as listed (None if it is not)."""
        info = await find(self.tokens, token)
        if info is None:
            return base, False, None
        made = info.created_at  # the server's clock: an age far below 0 is skew, not youth
        return dict(info.risk), made is not None and -YOUNG_TOKEN < time.time() - made < YOUNG_TOKEN, info

    def _take_writers_attributes(self, node: Node, info: TokenInfo) -> None:
        """``info`` is ``node``'s token re-listed with its writer's risk meta; the node was listed
        before it (bare). The attributes for which the node still holds only what the bare
        listing gave it (the mount's file mode, its createdAt as mtime, no owner) become the
        writer's, so that a rename or another attribute's change made here, written over the
        writer's risk meta, does not put those defaults in place of its mode and mtime (an
        executable lost its x bit on every mount, a build tool saw another mtime)."""
        writer = attributes(info)
        values: dict[str, int | str | None] = {}
        made = info.created_at
        if made is not None and writer.mtime_ns is not None and node.mtime_ns == int(made * 1e9):
            values.update(mtime_ns=writer.mtime_ns, ctime_ns=writer.mtime_ns, atime_ns=writer.atime_ns)
        if writer.mode is not None and stat.S_IMODE(node.mode) == stat.S_IMODE(self.ns.file_mode):
            values["mode"] = writer.mode
        if node.uid is None and writer.uid is not None:
            values["uid"] = writer.uid
        if node.gid is None and writer.gid is not None:
            values["gid"] = writer.gid
        if node.xattrs is None and writer.xattrs is not None:
            values["xattrs"] = writer.xattrs
        if values:
            self.ns.set_attributes(node, **values)

    async def _keep_a_copy(self, node: Node, token: str) -> None:
        """Before renaming a file, have its content in the cache (small files only): if a writer
        elsewhere that has not seen the rename replaces the content and deletes this token, the
        renamed entry can still be stored again (see :meth:`rescue_renamed`). Never for a file
        stored as parts: its token is a manifest, and the cache's entry under a manifest's token
        is the file's whole content (see :mod:`privifs.fs.partwrite`)."""
        if node.size > RENAME_FETCH_LIMIT or is_manifest_node(node.remote_risk):
            return
        try:
            sealed = await self.fetch_content(node, token)
        except PrivifsError as exc:  # gone already (the update will say so), or unreachable
            log.debug("%s: not fetched before the rename (%s)", self.ns.describe(node), exc)
            return
        sealed.close()

    def listing_taken(self, listed: dict[str, Seen], started: float) -> None:
        """The refresher's listing ``listed``, started at ``started`` (trio time): the tokens
        renamed here before it that it shows renamed are recorded (see :meth:`rescue_renamed`)."""
        self.listed, self.listed_started = listed, started
        for token, (at, *before) in self.renamed.items():
            info = listed.get(token)
            if at < started and info is not None and not same_place(listed_place(info), tuple(before)):
                self.renames_listed.add(token)

    def renaming(self, node: Node, parent: int) -> None:
        """A program renames the file ``node`` (in the directory ``parent``) here: the tokens of
        the conflict copies this mount shows of its name are remembered (see rescue_renamed)."""
        if not node.token or node.is_dir or node.remote_name is None:
            return
        copies = {
            c.token
            for ino in self.ns.aside.get((parent, shown_name(node.remote_name, node.remote_extension)), ())
            if (c := self.ns.nodes.get(ino)) is not None and c.token and c is not node
        }
        if copies:
            _, before = self.copies_at_rename.get(node.token, (0.0, set()))
            self.copies_at_rename[node.token] = (trio.current_time(), before | copies)

    def rescue_renamed(self, node: Node, infos: list[TokenInfo]) -> bool:
        """The listing no longer shows ``node``'s token, which this mount renamed a moment ago.
        The renamed entry keeps its version (its content, from the cache, is stored again under
        the new name) when the token went before any listing showed it renamed: another client
        deleted it where it saw it before the rename (its check of the token's place and its
        delete are two requests, and the server may apply a rename it acknowledged later: helper
        hM, 10 of 19 races of ``mv`` against ``rm`` lost the file everywhere, without a word);
        and when the listing shows another token at the name it had before (a writer elsewhere
        replaced the content without seeing the rename and deleted the version it replaced,
        which by then was ours under the new name). True if it was kept; False: the entry follows
        the vault (it was deleted after a listing showed the rename, or its content is not at hand)."""
        entry = self.renamed.get(node.token or "")
        if entry is None or trio.current_time() - entry[0] > RENAME_RESCUE_WINDOW or not node.is_file:
            return False
        _, context, name, extension = entry
        known = self.copies_at_rename.get(node.token or "", (0.0, set()))[1]
        replaced = any(
            i.token != node.token
            and i.token not in known  # a copy shown here before the rename took the name: no rewrite (hAV F2)
            and i.file_name == name
            and same_context(i.context, context or "/")
            and (i.extension or "") == (extension or "")
            for i in infos
        )
        unlisted = node.token not in self.renames_listed
        if not replaced and not unlisted:
            return False
        del self.renamed[node.token]
        self.renames_listed.discard(node.token)
        if replaced:
            log.info(
                "%s: another client replaced its content at the old name %s without seeing this rename, "
                "and deleted the renamed version; it is kept here",
                self.ns.describe(node),
                name,
            )
        else:
            log.info(
                "%s: another client deleted it before a listing here showed it renamed from %s (taken for "
                "a delete that raced the rename); it is kept here",
                self.ns.describe(node),
                name,
            )
        return self._token_gone(node, renamed=True)

    def _token_gone(self, node: Node, *, renamed: bool) -> bool:
        """The node's token no longer exists: another client deleted or replaced it before this
        mount's rename or attribute change reached it. A rename whose content is still in the
        cache is kept: the content is stored again under the new name (as if the rename came
        first: the other client's version stays at the old name). Otherwise the change is dropped
        and the entry follows the vault at the next listing, as every other mount's does."""
        cached = self.cache.open(node.token) if renamed and node.is_file and not node.unlinked else None
        if cached is not None:
            try:
                fresh = self.staging.from_sealed(cached)
            except PrivifsError as exc:
                log.warning("%s: cannot stage the cached content again (%s)", self.ns.describe(node), exc)
                fresh = None
            finally:
                cached.close()
            if fresh is not None:
                log.info(
                    "%s: its token was deleted or replaced by another client before this rename "
                    "reached it; storing the content again under the new name",
                    self.ns.describe(node),
                )
                with self.index.kept():
                    self.ns.restage(node, fresh)
                    self.index.save(node)
                self.schedule(node)
                self.remote_changed()
                return True
        log.info(
            "%s: its token was deleted or replaced by another client; the change made here "
            "is dropped and the entry follows the vault",
            self.ns.describe(node),
        )
        if renamed:
            self._rename_dropped(node)
        self.ns.drop_meta_change(node)
        if not node.unlinked:
            self.index.save(node)
        self.remote_changed()
        return False

    # -- fsync -----------------------------------------------------------------------------------
    async def reach_vault(self) -> None:
        """Offline, before an fsync fails: one attempt to reach the vault now, waited for at most
        :data:`RECONNECT_GRACE`. The connector retries with backoff (up to a minute), so an fsync
        made just after the server came back, or while a reconnection was running (a mount that
        started offline behind a stalled answer), failed at once with ``offline: …`` (hQ F4)."""
        if self.reconnect is not None:
            await self.reconnect(RECONNECT_GRACE)

    async def commit(self, node: Node, timeout: float) -> None:
        """Wait until the node's current staged content is committed in the vault."""
        staged = node.staged
        event, result = self._commits.setdefault(staged.id, (trio.Event(), []))
        self._fsync[node.ino] += 1
        self._fsync_asked.set()  # a worker deferring this node to the foreground goes on at once
        self._fsync_asked = trio.Event()
        self.ns.schedule_retry(node, 0.0)
        self.schedule(node)
        try:
            with trio.move_on_after(timeout) as scope:
                await event.wait()
        finally:
            self._fsync[node.ino] -= 1
            if not self._fsync[node.ino]:
                del self._fsync[node.ino]
                self._odd_answers.pop(node.ino, None)
        if scope.cancelled_caught:
            log.error(
                "%s: fsync timed out after %.0fs waiting for the upload; the data stays staged and keeps being retried",
                self.ns.describe(node),
                timeout,
            )
            raise WriteBackFailed(
                f"{self.ns.describe(node)}: the upload did not complete within {timeout:.0f}s; "
                "the data stays staged and keeps being retried"
            )
        if result and result[0] is not None:
            exc = result[0]
            log.error(
                "%s: fsync failed, the upload did not complete (%s); the data stays staged and keeps being retried",
                self.ns.describe(node),
                exc,
            )
            if isinstance(exc, CommandRejected):
                raise exc  # the server's refusal itself (a PermissionRefused answers EACCES)
            failed = NoRoomInVault if isinstance(exc, VaultFull) else WriteBackFailed
            raise failed(
                f"{self.ns.describe(node)}: the upload did not complete ({exc}); the data "
                "stays staged and keeps being retried"
            ) from exc

    async def commit_meta(self, node: Node, timeout: float) -> None:
        """Wait until the attributes ``node`` has now (mode, owner, times, extended attributes,
        its name) are written to its token's meta in the vault: what fsync(2) of a file whose
        content is committed but whose attributes changed waits for."""
        version = node.meta_version
        ino = node.ino
        self._fsync[ino] += 1
        self._fsync_asked.set()
        self._fsync_asked = trio.Event()
        error: Exception | None = None
        try:
            with trio.move_on_after(timeout) as scope:
                self.ns.schedule_retry(node, 0.0)
                self.schedule(node)
                while node.meta_dirty and self._meta_done.get(ino, -1) < version and not node.unlinked:
                    event, met = self._meta_commits.setdefault(ino, (trio.Event(), []))
                    await event.wait()
                    if met and met[0] is not None:
                        error = met[0]
                        break
        finally:
            self._fsync[ino] -= 1
            if not self._fsync[ino]:
                del self._fsync[ino]
                self._odd_answers.pop(ino, None)
                self._meta_done.pop(ino, None)
        if scope.cancelled_caught:
            log.error(
                "%s: fsync timed out after %.0fs waiting for its attributes to reach the vault; they keep "
                "being retried",
                self.ns.describe(node),
                timeout,
            )
            raise WriteBackFailed(
                f"{self.ns.describe(node)}: its attributes did not reach the vault within {timeout:.0f}s; "
                "they keep being retried"
            )
        if error is not None:
            log.error(
                "%s: fsync failed, its attributes did not reach the vault (%s); they keep being retried",
                self.ns.describe(node),
                error,
            )
            if isinstance(error, CommandRejected):
                raise error
            raise WriteBackFailed(
                f"{self.ns.describe(node)}: its attributes did not reach the vault ({error}); they keep being retried"
            ) from error

    def _meta_attempted(self, ino: int, error: Exception | None) -> None:
        """A write-back attempt of ``ino`` ended (``error``: one an fsync does not wait through)."""
        entry = self._meta_commits.pop(ino, None)
        if entry is not None:
            entry[1].append(error)
            entry[0].set()

    def _finish_commit(self, staged: StagedFile, error: Exception | None) -> None:
        entry = self._commits.pop(staged.id, None)
        if entry is not None:
            entry[1].append(error)
            entry[0].set()

    # -- deletes ---------------------------------------------------------------------------------
    async def _tombstone_loop(self) -> None:
        failures = 0
        limiter = trio.CapacityLimiter(4)  # deletes in flight
        while True:
            await self._yield_to_foreground()
            # replaced before the round: a token tombstoned while it deletes wakes the next at once
            self._tomb_wake = trio.Event()
            held = self._held_for_uploads() | self._awaiting_renames()
            tokens = [t for t in self.index.tombstones() if t not in self.ns.held and t not in held]
            failed = False
            if tokens:

                async def delete(token: str) -> None:
                    nonlocal failed
                    async with limiter:
                        if not await self._delete_tombstone(token):
                            failed = True

                async with trio.open_nursery() as n:
                    for token in tokens:
                        n.start_soon(delete, token)
            failures = failures + 1 if failed else 0
            now = trio.current_time()
            for token, at in list(self.recently_deleted.items()):
                if now - at > 600:
                    del self.recently_deleted[token]
            for token, entry in list(self.renamed.items()):
                if now - entry[0] > RENAME_RESCUE_WINDOW:
                    del self.renamed[token]
                    self.renames_listed.discard(token)
            for token, (at, _) in list(self.copies_at_rename.items()):
                if now - at > 2 * RENAME_RESCUE_WINDOW and token not in self.renamed:
                    del self.copies_at_rename[token]
            wait = min(MAX_BACKOFF, 2**failures) if failed else 30
            with trio.move_on_after(min(wait, 0.1) if held else wait):  # held: look again soon
                await self._tomb_wake.wait()

    async def _delete_tombstone(self, token: str) -> bool:
        """Delete the tombstoned ``token`` if the listing still shows it where this mount saw it;
        False if the delete failed (retried by the tombstone loop)."""
        try:
            if not await self._still_where_seen(token):
                return True
            parts = await self._parts_of_dropped(token)
            await self.tokens.delete(token)
        except Exception as exc:  # noqa: BLE001 - retried; never fatal
            self.last_error = f"deleting token {token}: {exc}"
            self.last_error_at = time.time()
            log.warning("deleting token %s failed: %s", token, exc)
            return False
        self._deleted(token)
        self.last_success_at = time.time()
        self._removed_at.pop(token, None)
        dropped = self._dropped.pop(token, None)
        if parts and dropped is not None:
            self.retire_parts(dropped[0], parts)
        return True

    def replaces(self, node: Node) -> bool:
        """Whether a token ``node``'s renames replaced is still to be deleted."""
        return any(ino == node.ino for ino, _, _ in self._overwritten.values())

    async def delete_replaced(self, node: Node) -> None:
        """Delete now the tokens ``node``'s renames replaced (``mv new old`` over a file), once
        those renames are in the vault: fsync of the renamed file returns after it. Left to the
        tombstone loop (which waits for a quiet moment), a crash in between left both tokens at
        the name, and a client without this index showed the replaced content there (helper hG)."""
        if node.meta_dirty or node.content_dirty or node.uploading or node.unlinked:
            return  # (a rename not written back: the loop deletes them after it)
        tombstones = set(self.index.tombstones())
        for token, (ino, _, _) in list(self._overwritten.items()):
            # (not held back for files closed before the rename, as a removal is: the rename,
            # in the vault already, did not wait for them either; helper hG's save beside a busy
            # writer returned with the replaced token there)
            if ino == node.ino and token in tombstones and token not in self.ns.held:
                await self._delete_tombstone(token)

    # -- crash recovery --------------------------------------------------------------------------
    def superseded(self, node: Node) -> None:
        """``node`` is being removed, renamed (or a directory above it) or written again while its
        upload is in flight: the token that upload makes is no longer simply the node's. Recorded
        in the caller's transaction (with the change itself), so that when a crash comes after
        the server made the token and before it was recorded, the next start finds the token
        claimed (:meth:`bury`) instead of showing it as a file: the removed file back, the renamed
        one twice, the rewritten one with a conflict copy. The upload's end drops the record."""
        flight = self._flights.get(node.ino)
        if flight is None or flight[0].id in self._superseded:
            return
        staged, context, name = flight
        self.index.add_superseded(staged.id, context, name)
        self._superseded.add(staged.id)

    def superseded_under(self, node: Node) -> None:
        """:meth:`superseded` for ``node`` and every node below it with an upload in flight."""
        for ino in list(self._flights):
            other = self.ns.get(ino)
            if other is not None and (other is node or self.ns.is_ancestor(node, other)):
                self.superseded(other)

    def leftover_at(self, parts: list[str], name: str) -> list[str]:
        """Staged ids of the last run's superseded uploads that went to ``parts``/``name``."""
        return [sid for sid, (ctx, n) in self.leftover.items() if n == name and split_context(ctx) == parts]

    async def bury(self, info: TokenInfo, staged_ids: list[str]) -> bool | None:
        """Whether ``info`` is the token of one of the last run's superseded uploads
        (``staged_ids``, see :meth:`superseded`): then it is recorded for deletion, never shown.
        None when that cannot be told now (the token could not be read: asked again at the next
        listing)."""
        for sid in staged_ids:
            try:
                sealed = self.staging.open_read(sid)
            except PrivifsError:
                self._forget_leftover(sid)
                continue
            try:
                same = await self._same_content(sealed, info)
            finally:
                sealed.close()
            if same is None:
                return None
            if same:
                log.info(
                    "token %s (%s/%s): an upload the last stop cut off after the file was removed, renamed "
                    "or written again; deleting it",
                    info.token,
                    info.context,
                    info.file_name,
                )
                with self.index.kept():
                    self.index.add_tombstone(info.token)
                    self._forget_leftover(sid)
                self.wake_tombstones()
                return True
        return False

    def _forget_leftover(self, staged_id: str) -> None:
        """A superseded upload of the last run is settled: its record and (unless a node still
        has it) its staged file go."""
        self.leftover.pop(staged_id, None)
        self.index.drop_superseded(staged_id)
        if not any(n.staged_id == staged_id for n in self.ns.nodes.values()):
            self.staging.path(staged_id).unlink(missing_ok=True)

    def leftovers_settled(self, claimed: set[str]) -> None:
        """A whole listing was merged: the last run's superseded uploads it showed no token for
        (not in ``claimed``) never made one."""
        for sid in list(self.leftover):
            if sid not in claimed:
                with self.index.kept():
                    self._forget_leftover(sid)

    async def _same_content(self, sealed: SealedFile, info: TokenInfo) -> bool | None:
        """Whether the token ``info`` holds the plaintext of ``sealed`` (None: it cannot be read)."""
        same, _ = await self._holds(sealed, info)
        return same

    async def _holds(self, sealed: SealedFile, info: TokenInfo) -> tuple[bool | None, dict | None]:
        """:meth:`_same_content`, and the risk meta that marks ``info`` as a manifest when it is one
        (None for a token stored whole). A manifest whose mark is not written yet counts as one:
        its upload was cut off between configure-file-meta and the risk meta write (a kill of
        the daemon), and its own bytes are the manifest's, not the file's. Compared as a whole
        token, it was taken for another client's version of the file: older than the one the
        next start stored, it took the file's name, and the file's current content showed as a
        conflict copy."""
        if info.size not in (None, sealed.size):
            return False, None
        want = hashlib.blake2b()
        for piece in sealed.chunks(PIECE_CHUNKS):
            want.update(piece)
        sink = _HashSink()
        risk = None
        try:
            if is_manifest_node(_risk_text(info)):  # a big file stored as parts: its verified parts
                risk = dict(info.risk)
                await self.parts.store.copy(await self.parts.reader.manifest(info.token, info.risk), sink.write)
            elif maybe_unmarked_manifest(info):  # stored as parts, or another application's big file
                sink = _HashSink(keep=fmt.PEEK)  # (the content, while it may be a manifest)
                got = await self.vault.get(info.token, sink)  # (no size: a manifest's is not its meta's)
                manifest = fmt.unmarked(got, info.size, sink.kept) if sink.whole else None
                if manifest is not None:
                    encoded = sink.kept()
                    risk = {**(info.risk or {}), fmt.MARK: str(manifest.version)}
                    risk.update(digest.stated(self.content_key, encoded))
                    sink = _HashSink()
                    await self.parts.store.copy(manifest, sink.write)
            else:
                await self.vault.get(info.token, sink, size=info.size)
        except PrivifsError:
            return None, None
        return sink.h.digest() == want.digest(), risk

    def _adopt_marker(self, node: Node, info: TokenInfo) -> bool:
        """A marker made by the last run, which stopped before recording it (its risk meta may
        not be written yet): recorded, and its meta written by the next reconcile."""
        if info.size not in (None, 0) or (info.risk and attributes(info).kind != node.kind):
            return False
        log.info(
            "%s: found the marker an interrupted store made (%s: a stop, or an answer lost); recording it",
            self.ns.describe(node),
            info.token,
        )
        with self.index.kept():
            self._recorded(node, info.token, info.context, info.file_name, info.extension)
            self.ns.set_remote_risk(node, risk_json(info))
            self.index.save(node)
        self.schedule(node)
        return True

    async def adopt_orphan(self, node: Node, info: TokenInfo) -> bool:
        """Record ``info`` as the node's upload if its content is the staged content (or, for an
        entry awaiting its marker, if it is an empty token its risk meta does not contradict)."""
        if node.staged is None and awaits_marker(node):
            return self._adopt_marker(node, info)
        staged = node.staged
        if staged is None or info.size not in (None, staged.size):
            return False
        same, manifest_risk = await self._holds(staged.sealed, info)
        if not same or node.staged is not staged or node.uploading or info.token in self.index.tombstones():
            # (an upload started meanwhile settles that store itself: its start tombstoned the
            # token, which adopted anyway was the file's token while being deleted, and the
            # upload in flight made one no one settled, older than the next save: it held the
            # plain name on every mount, helper hU N1)
            return False
        log.info(
            "%s: found the upload an interrupted store made (%s: a stop, or an answer lost); recording it",
            self.ns.describe(node),
            info.token,
        )
        staged.freeze()
        self._record_content(
            node,
            staged,
            info.token,
            info.context,
            info.file_name,
            info.extension,
            manifest_risk=manifest_risk,
            content_risk=None if manifest_risk is not None else self._digest_of(staged.sealed),
        )
        self.schedule(node)
        return True

    # -- status and flushing ---------------------------------------------------------------------
    def pending(self, shown: int = PENDING_SHOWN) -> PendingReport:
        """What the vault does not have yet: how many changes and bytes, and the first ``shown``
        of them to name (changes that failed first, then uploads under way, then the rest). Only
        those are described: naming every one made ``privifs status`` take seconds with tens of
        thousands of files waiting (27,682 pending: a 2.6 MB answer, 3.1 s), and the status
        command gave up on a daemon that was only busy."""
        nodes = self.ns.pending()
        size = sum(n.size for n in nodes if n.content_dirty)
        fsynced = sum(1 for n in nodes if n.ino in self.local_fsynced)
        first = heapq.nsmallest(shown, nodes, key=_pending_rank)
        return PendingReport([self._pending_entry(n) for n in first], len(nodes), size, fsynced)

    def _pending_entry(self, node: Node) -> dict:
        state = (
            "uploading"
            if node.uploading
            else "waiting for close"
            if node.waiting_for_close
            else f"retrying: {node.last_error}"
            if node.last_error
            else "queued"
        )
        return {
            "path": self.ns.describe(node),
            "size": node.size if node.content_dirty else 0,
            "kind": "content" if node.content_dirty else "meta",
            "state": state,
            "attempts": node.attempts,
        }

    def tombstone_count(self) -> int:
        return self.index.tombstone_count()


class _HashSink:
    """A PlaintextSink that keeps only a digest, and the content itself while it is at most
    ``keep`` bytes (:attr:`whole` says whether it was)."""

    def __init__(self, keep: int = 0) -> None:
        self.h = hashlib.blake2b()
        self.keep = keep
        self._kept: list[bytes] = []
        self._size = 0

    async def write(self, data: bytes | memoryview) -> None:
        self.h.update(data)
        self._size += len(data)
        if self._size <= self.keep:
            self._kept.append(bytes(data))
        elif self._kept:
            self._kept = []

    async def reset(self) -> None:
        self.h = hashlib.blake2b()
        self._kept, self._size = [], 0

    @property
    def whole(self) -> bool:
        return self._size <= self.keep

    def kept(self) -> bytes:
        return b"".join(self._kept)


def _risk_text(info: TokenInfo) -> str | None:
    return json.dumps(info.risk, sort_keys=True) if info.risk else None

"""Merging the vault's listing into the tree, so changes made elsewhere show up.

The whole listing is read (no request per token) and compared with the tree: soon after another
client of the profile changed the vault (its command acks arrive on the profile's WebSocket
channel, see :meth:`EventHub.foreign_changes`: a listing 0.25 s and another 1.5 s after them,
coalesced, at least 0.5 s apart and apart by four times the last listing's time, so listings
for events take at most a fifth of the time while another client keeps changing things), and
every ``interval`` seconds as the safety net (events are delivered at most once, and a server may
send none). The reference's listing filters (context, token, name, extension, type) cannot ask
for "what changed since", so there is no cheaper incremental listing. Only *clean* nodes follow
the listing — a node with local changes not yet written back, or
written back after the listing was taken, keeps its local state. Then:

* a known token whose name, place or attributes changed → the node moves or changes; a node
  whose place in the tree is not where its token's context puts it (it moved with a directory
  renamed elsewhere while its own token kept the old context) goes back to that place, so every
  mount shows what a fresh mount of the vault shows;
* a known token that is gone → the node goes (a directory with entries stays, implicit); gone
  means asked for by id and not found (:meth:`Refresher.complete`): the listing is read page by
  page, and a deletion elsewhere while it is read makes a page start one token later, so a
  token can be missing from a listing that still exists;
* an unknown token → a new node where its context and name put it; if that path is taken, it
  shows under a deterministic conflict name (no token is hidden or overwritten); if the entry at
  that path just lost its token, the new token replaces the content (another client rewrote it);
* an unknown token where one of our uploads was cut off by a crash → offered to the syncer for
  adoption (compared by content);
* several tokens claiming one path (file or symlink) → a total order every client computes from
  the listing alone decides: the earliest ``createdAt``, then the smallest token id, shows under
  the plain name, every other one as ``name.conflict-<last 8 of its token>.ext`` — the same on
  every mount, whatever each saw first.

Every change is followed by the matching kernel cache invalidation, done on a worker thread so a
kernel callback can never deadlock the trio loop.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable

import pyfuse3
import trio

from privifs.client.datatokens import DataTokens, find_each
from privifs.client.events import EventHub
from privifs.client.shapes import TokenInfo
from privifs.errors import PrivifsError
from privifs.fs.names import conflict_name, listed_name, shown_name, token_name
from privifs.fs.namespace import ROOT, Namespace, Node, risk_json
from privifs.fs.sync import Seen, Syncer, awaits_marker, listed_place, same_place, seen
from privifs.fs.tokenmeta import KIND_DIR, RESERVED_CONTEXT, attributes, listed_kind, same_context, split_context

log = logging.getLogger("privifs.fs.refresh")

RESERVED = split_context(RESERVED_CONTEXT)[0]


# after another client's change: listings this long after its ack (the second catches a store
# whose last step, the synchronous configure-file-meta, sends no ack of its own)
EVENT_SETTLE = 0.25
EVENT_FOLLOW_UPS = (0.0, 1.5)
EVENT_MIN_GAP = 0.5  # while another client keeps changing things: at most two listings a second …
EVENT_LISTING_SHARE = 0.2  # … and listings for events take at most this share of the time (a big vault)
FULL_LISTING_SHARE = 0.05  # the safety net's listings take at most this share of the time (a huge vault)
NO_ANSWER_GRACE = 10.0  # a listing that received nothing for this long: status says the server does not answer
COST_MEMORY = 3  # listings that succeeded, of which the quickest says what listing costs
UNSEEN = float("inf")  # the createdAt order of a token the listing has not shown yet: newest
# a file whose token another mount renamed to its conflict name, saving that name's new version
# (Syncer._alone_at), stays under the name until a token claims it again, this long at most
SAVE_HOLD = 30.0


def event_gap(last_cost: float) -> float:
    """The least time between two listings asked for by other clients' changes, after one that
    took ``last_cost`` seconds: while another client keeps changing things (an untar), listing
    takes at most :data:`EVENT_LISTING_SHARE` of the mount's and the server's time."""
    return max(EVENT_MIN_GAP, last_cost * (1 / EVENT_LISTING_SHARE - 1))


def full_gap(interval: float, last_cost: float) -> float:
    """The time from one safety-net listing to the next, after one that took ``last_cost``
    seconds: ``--refresh-interval``, or longer for a vault so big that listing it every interval
    would take more than :data:`FULL_LISTING_SHARE` of the mount's and the server's time (a
    listing of 30,000 tokens cost the daemon about 1.2 s of CPU under load; at ten times that,
    every 30 s kept a core a third busy for nothing). Other clients' changes still show within
    :func:`event_gap` through the event channel."""
    return max(interval, last_cost * (1 / FULL_LISTING_SHARE - 1))


class ListingCost:
    """What listing the vault costs, for :func:`event_gap` and :func:`full_gap`: the least time
    of the last :data:`COST_MEMORY` listings that succeeded. A listing that failed, or one that
    waited on a stalled server or on retries, says nothing about the vault's size: one listing
    held 45 s made the next safety-net listing about 14 minutes later, and a 60 s time-out about
    19 (helpers hM3, hL3), while a vault that is really big is slow every time."""

    def __init__(self) -> None:
        self._recent: deque[float] = deque(maxlen=COST_MEMORY)

    def listed(self, seconds: float) -> None:
        self._recent.append(seconds)

    @property
    def seconds(self) -> float:
        return min(self._recent, default=0.0)


def claim_order(created: float | None, token: str) -> tuple[float, str]:
    """The total order of tokens claiming one path: earliest ``createdAt`` (whole seconds on the
    wire), then the token id; the first keeps the plain name on every mount."""
    return (UNSEEN if created is None else created, token)


class Refresher:
    def __init__(
        self,
        ns: Namespace,
        tokens: DataTokens,
        syncer: Syncer,
        interval: float,
        *,
        invalidate: bool = True,
        events: EventHub | None = None,
        collect_parts: bool = True,
    ):
        self.ns = ns
        self.index = ns.index
        self.tokens = tokens
        self.syncer = syncer
        self.interval = interval
        self.full_every = interval  # the safety-net listing's gap in effect (see full_gap)
        self.listing_seconds: float | None = None  # what listing the vault takes (ListingCost)
        self.invalidate = invalidate
        self.events = events
        self.collect_parts = collect_parts  # False on a read-only mount: it deletes nothing
        self.last_refresh: float | None = None
        self.last_error: str | None = None
        self.listings = 0
        self.heard_at: float | None = None  # while a listing runs: when the server last sent some of it
        self._invalidations: list[tuple] = []
        # batches of invalidations for the kernel, made in order by _tell_kernel: (batch, done)
        self._kernel_todo: list[tuple[list[tuple], trio.Event]] = []
        self._kernel_wake = trio.Event()
        self._kernel_last = trio.Event()  # set once the last batch queued was made
        self._kernel_last.set()
        self._listed: dict[str, TokenInfo] = {}  # the listing being merged (apply)
        self._seen: dict[str, Seen] = {}  # where the last listing showed each token
        self._added: set[int] = set()
        self._took_new_token: set[int] = set()  # files that took a new token at their place, this listing
        self._holding: dict[str, float] = {}  # token -> since when its file is held at its name (_not_held_for_saves)
        self._lock = trio.Lock()
        self._due: list[float] = []
        self._wake = trio.Event()
        syncer.look_soon = lambda delay: self.nudge((delay,))

    async def run(self, task_status: trio.TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            if self.events is not None:
                nursery.start_soon(self._watch_events)
            nursery.start_soon(self._tell_kernel)
            task_status.started()
            next_full = trio.current_time() + self.interval
            last, gap = -EVENT_MIN_GAP, EVENT_MIN_GAP
            cost = ListingCost()
            while True:
                due = max(min(self._due), last + gap) if self._due else next_full
                with trio.move_on_at(min(next_full, due)):
                    await self._wake.wait()
                self._wake = trio.Event()
                now = trio.current_time()
                if now < next_full and not (self._due and now >= due):
                    continue
                self._due = [t for t in self._due if t > now]
                if await self._refresh_logged():
                    cost.listed(trio.current_time() - now)
                last = trio.current_time()
                gap = event_gap(cost.seconds)
                self.full_every, self.listing_seconds = full_gap(self.interval, cost.seconds), cost.seconds
                next_full = last + self.full_every

    def nudge(self, delays: tuple[float, ...] = EVENT_FOLLOW_UPS) -> None:
        """Read the listing after each of ``delays`` seconds (coalesced with what is due)."""
        now = trio.current_time()
        for d in delays:
            if not any(abs(t - (now + d)) < 0.2 for t in self._due):
                self._due.append(now + d)
        self._wake.set()

    async def _watch_events(self) -> None:
        while True:
            try:
                await self.events.foreign_changes(EVENT_SETTLE)
            except Exception:
                log.exception("watching the event channel for other clients' changes failed")
                await trio.sleep(EVENT_FOLLOW_UPS[-1])
            self.nudge()

    async def _refresh_logged(self) -> bool:
        """One listing merged; False if it failed (logged, and kept for status)."""
        failing = self.last_error is not None
        try:
            await self.refresh_once()
        except PrivifsError as exc:
            self.last_error = str(exc)
            log.warning("refreshing the listing failed: %s", exc)
            self.syncer.unanswered(exc)  # a server lost with nothing to upload is unreachable too
        except Exception as exc:
            self.last_error = repr(exc)
            log.exception("refreshing the listing failed unexpectedly")
        else:
            if failing:  # the server answers again: uploads that backed off (up to 5 min) go now
                log.info("the listing works again; retrying the write-back that waits")
                self.syncer.retry_all_now()
            return True
        return False

    async def fetch(self, tokens: DataTokens | None = None) -> tuple[list[TokenInfo], float]:
        """The whole listing (through ``tokens``, default the refresher's) and when it started."""
        started = trio.current_time()
        self.heard_at = time.time()  # (each token received moves it on)
        try:
            infos = []
            async for info in (tokens or self.tokens).list():
                infos.append(info)
                self.heard_at = time.time()
        finally:
            self.heard_at = None
        self.listings += 1
        return infos, started

    def no_answer_since(self) -> float | None:
        """When the server last sent anything for the listing this mount is waiting for, if that
        was over NO_ANSWER_GRACE ago: a server that stopped answering without closing anything
        (a network cut, a hung host) is told this way long before the listing's time-outs end."""
        heard = self.heard_at
        return heard if heard is not None and time.time() - heard > NO_ANSWER_GRACE else None

    async def refresh_once(self) -> None:
        async with self._lock:  # one listing at a time: an older one never undoes a newer one
            infos, started = await self.fetch()
            self.syncer.answered()
            infos = await self.complete(infos, started)
            await self.apply(infos, started)
            self.syncer.parts.reader.saw_listing(infos, started)
        if not self.collect_parts:
            return
        try:
            await self.syncer.parts.reader.sweep(infos)  # parts no manifest names (rate-limited)
        except PrivifsError as exc:
            log.warning("collecting unreferenced parts failed: %s", exc)

    async def complete(self, infos: list[TokenInfo], started: float, tokens=None) -> list[TokenInfo]:
        """``infos`` and the tokens of nodes that would follow it which it lacks but which
        exist, each asked for by id (through ``tokens``, default the refresher's). The service
        lists by page number: another client's deletion of a token an earlier page showed
        moves every later token one place up while the listing is read, and the first token of
        the next page is never listed. Taken for deleted, such a file vanished until the next
        listing and came back as a new entry at its token's place, not where renames made
        here since had put it (found under a heavy rename/write/unlink workload). Costs one
        request per token really deleted elsewhere."""
        listed = {info.token for info in infos}
        missing = [
            n.token for n in self.ns.nodes.values() if n.token and n.token not in listed and self.eligible(n, started)
        ]
        if not missing:
            return infos
        found = await find_each(tokens or self.tokens, missing)
        if found:
            log.info(
                "the listing skipped %d tokens that exist (tokens deleted while it was read, here or elsewhere, "
                "moved them to an earlier page); asked for each",
                len(found),
            )
        return [*infos, *found]

    # -- merging ---------------------------------------------------------------------------------
    def eligible(self, node: Node, started: float) -> bool:
        return (
            not node.content_dirty
            and not node.meta_dirty
            and not node.uploading
            and (node.writers == 0 or (node.following and node.staged is None))
            and node.synced_at < started
            and not node.unlinked
        )

    async def apply(self, infos: list[TokenInfo], started: float) -> None:
        """Merge the listing ``infos`` (read from ``started``, trio time) into the tree. Of it the
        whole infos are kept while merging, and only where each token was (:class:`Seen`) until
        the next listing."""
        before, self._seen = self._seen, {info.token: seen(info) for info in infos}
        self._listed = {info.token: info for info in infos}
        self.syncer.listing_taken(self._seen, started)
        try:
            await self._merge(infos, started, before)
        finally:
            self._listed = {}

    async def _merge(self, infos: list[TokenInfo], started: float, before: dict[str, Seen]) -> None:
        ns = self.ns
        tombstones = self.index.tombstones()
        deleted = self.syncer.recently_deleted
        present: set[int] = set()  # nodes whose token the listing shows
        changed: list[tuple[Node, TokenInfo]] = []
        unknown: list[TokenInfo] = []
        self._added = set()
        self._took_new_token = set()
        with self.index.kept():
            self._split_markers(started)
        for info in infos:
            if info.token in tombstones or info.token in deleted:
                continue
            parts = split_context(info.context)
            if parts[:1] == [RESERVED]:
                continue
            ino = ns.by_token.get(info.token)
            if ino is None:
                unknown.append(info)
            else:
                present.add(ino)
                changed.append((ns.nodes[ino], info))
        vanished = {
            n.ino: n for n in ns.nodes.values() if n.token and n.ino not in present and self.eligible(n, started)
        }
        with self.index.kept():
            followed = []
            for node, info in changed:
                if not self.eligible(node, started):
                    continue
                if listed_kind(info) != node.kind and not node.children:
                    # listed before its risk meta said what it is (a directory or symlink marker
                    # between configure-file-meta and its risk meta): shown again as what it is
                    self._vanish(node)
                    unknown.append(info)
                    continue
                followed.append((node, info))
            followed = self._not_held_for_saves(followed, started)
            for node, info in followed:
                self._follow(node, info)
            # a directory that moved took its whole subtree along: entries whose own tokens did not
            # move go back to where their context puts them (until nothing moves)
            self._place_until_still(followed)
            # uploads (and markers) a crash may have cut off after the server made the token,
            # looked for where the node is now that the listing was followed (another client
            # may have moved its directory, the token along with it)
            orphans = {}
            for n in ns.nodes.values():
                if (
                    n.upload_started is not None
                    and (n.content_dirty or awaits_marker(n))
                    and not n.uploading
                    and not n.unlinked
                ):
                    orphans.setdefault((self.ns.context(n), token_name(n)), []).append(n)
            adoptions = []
            claimed: set[str] = set()  # the last run's superseded uploads a token here may be
            # in claim order: the first token of a path takes the plain name
            for info in sorted(unknown, key=lambda i: claim_order(i.created_at, i.token)):
                parts = split_context(info.context)
                if (tuple(parts), info.file_name) in self.syncer.inflight_names:
                    continue
                waiting = [
                    n
                    for (ctx, name), nodes in orphans.items()
                    for n in nodes
                    if split_context(ctx) == parts and name == info.file_name
                ]
                superseded = self.syncer.leftover_at(parts, info.file_name)
                if waiting or superseded:
                    claimed.update(superseded)
                    adoptions.append((waiting[0] if waiting else None, info, superseded))
                    continue
                self._add(info, parts, vanished)
            # an entry added before the marker of its directory (claim order) may sit in a
            # conflict-named directory the marker's arrival made needless: placed again
            self._place_until_still(
                [(ns.nodes[ns.by_token[i.token]], i) for i in unknown if ns.by_token.get(i.token) in self._added]
            )
            for node in vanished.values():
                if not self.syncer.rescue_renamed(node, infos) and not self._replaced(node, before, started):
                    self._vanish(node)
            self._settle_names(started)
        self.last_refresh = time.time()
        self.last_error = None
        self._flush_invalidations()
        self.syncer.leftovers_settled(claimed)
        for node, info, superseded in adoptions:
            if superseded:
                buried = await self.syncer.bury(info, superseded)
                if buried or buried is None:  # None: cannot tell yet, looked at again next time
                    continue
            if node is None or not await self.syncer.adopt_orphan(node, info):
                with self.index.kept():
                    self._add(info, split_context(info.context), {})
                self._flush_invalidations()

    def _not_held_for_saves(self, pairs: list[tuple[Node, TokenInfo]], started: float) -> list[tuple[Node, TokenInfo]]:
        """``pairs`` without the files held under their name while another mount saves it. That
        mount renames the version this one shows to its conflict name *before* storing its own
        (:meth:`Syncer._alone_at`: so the save is alone at its path, also after a crash), and
        for as long as its upload takes no token claims the name: followed at once, the file
        was missing here (``ENOENT``, and ``ls`` showing only the copy) though no one removed
        it (helper hAK F1: 0.6 s for a 40 MB save). Held, it shows the version before until the
        listing shows a token at the name again, then moves to its conflict name as before; at
        most :data:`SAVE_HOLD` seconds (a save that never finishes: then what the vault says)."""
        candidates = [(n, i) for n, i in pairs if self._renamed_aside(n, i)]
        if not candidates:
            self._holding.clear()
            return pairs
        claimed = {(tuple(split_context(i.context)), listed_name(i)) for i in self._listed.values()}
        held: set[int] = set()
        holding: dict[str, float] = {}
        for node, info in candidates:
            if (tuple(split_context(info.context)), node.name) in claimed:
                continue  # the save is listed: the copy goes aside now
            since = self._holding.get(node.token, started)
            if started - since < SAVE_HOLD:
                holding[node.token] = since
                held.add(node.ino)
        self._holding = holding
        return [(n, i) for n, i in pairs if n.ino not in held]

    def _renamed_aside(self, node: Node, info: TokenInfo) -> bool:
        """Whether the listing shows the file's token renamed, in its directory, from the name
        the file shows to that name's conflict name for the token (what only a save of that
        name by another privifs mount does)."""
        if not node.is_file or node.remote_name is None or info.token != node.token:
            return False
        before = shown_name(node.remote_name, node.remote_extension)
        return (
            node.name == before
            and listed_name(info) == conflict_name(before, info.token)
            and same_context(info.context, node.remote_context or "")
        )

    def _split_markers(self, started: float) -> None:
        """A directory made by two clients at once has two markers (:meth:`_add`), one directory
        here; another client, to which they were two directories (it had not listed both yet),
        may move one of them away. The markers the listing shows elsewhere than the directory's
        own token leave it: they are directories of their own now (added as any unknown token),
        and an rmdir or rename here would delete them with it (:meth:`Namespace.retire_markers`).
        If that moved token is the directory's own, and moved into the directory itself
        (``mv d0 d/sub`` there), it could never be placed: this mount showed one ``/d`` and no
        ``/d/sub``, for good. The other marker the listing still shows here becomes its token."""
        for node in list(self.ns.nodes.values()):
            if not (node.is_dir and node.token and node.markers and self.eligible(node, started)):
                continue
            info = self._listed.get(node.token)
            if info is None:
                continue
            if node in self._dirs_along(split_context(info.context)):  # moved into itself
                here = [m for m in node.extra_markers if m in self._listed and self._is_here(node, self._listed[m])]
                if not here:
                    continue
                token = min(here, key=lambda m: claim_order(self._created_at(m), m))
                self.ns.set_token(node, token)  # the old one is an unknown token now: added there
                info = self._listed[token]
                self.ns.follow_remote(node, info)
                self.index.save(node)
            away = {
                m
                for m in node.extra_markers
                if m in self._listed and not same_place(listed_place(info), listed_place(self._listed[m]))
            }
            if away:
                node.extra_markers = node.extra_markers - away
                self.index.save(node)

    def _is_here(self, node: Node, info: TokenInfo) -> bool:
        """Whether ``info``'s context and name put it where ``node`` is."""
        parts = split_context(info.context)
        along = self._dirs_along(parts)
        plain = listed_name(info)
        return (
            len(along) == len(parts) + 1
            and along[-1].ino == node.parent
            and (node.name == plain or node.name == conflict_name(plain, info.token))
        )  # (a conflict name only for the few not under their plain name: a listing asks for every token)

    def _place_until_still(self, pairs: list[tuple[Node, TokenInfo]]) -> None:
        """Put each node where its token's context puts it, again while any moved (a directory
        that moved takes its subtree along; entries whose own tokens did not move go back)."""
        for _ in range(4):
            if not sum(self._place(node, info) for node, info in pairs):
                break

    def _follow(self, node: Node, info: TokenInfo) -> None:
        """A known token changed on the server (another client): follow it."""
        moved = self._place(node, info)
        if (
            not moved
            and same_place((node.remote_context, node.remote_name, node.remote_extension), listed_place(info))
            and node.remote_risk == risk_json(info)
            and (self.ns.listed_size(info) in (None, node.size) or node.is_dir)
        ):
            return
        self.ns.follow_remote(node, info)
        self._inval_inode(node.ino, attr_only=True)
        self.index.save(node)

    def _dirs_along(self, parts: list[str]) -> list[Node]:
        """The existing directories on the way to ``parts`` (as :meth:`Namespace.ensure_dirs`
        walks it: a non-directory in the way means its ``.dir`` sibling), from the root on."""
        node, out = self.ns.root, [self.ns.root]
        for part in parts:
            child = self.ns.dir_step(node, part)[1]
            if child is None:
                break
            node = child
            out.append(node)
        return out

    def _place(self, node: Node, info: TokenInfo) -> bool:
        """Put ``node`` where ``info``'s context and name put it; True if it moved."""
        if self._is_here(node, info):
            return False
        parts = split_context(info.context)
        plain = listed_name(info)
        if node in self._dirs_along(parts):
            return False  # it would move into itself: the listing was read in the middle of a rename
        parent = self.ns.ensure_dirs(parts, node.mtime_ns, self._appeared)
        name = plain
        holder = self.ns.child(parent, name)
        if holder is not None and holder is not node and node.is_dir and self._implicit(holder):
            # the listing showed entries of the moved directory before its marker: one directory
            self._merge_dirs(node, holder)
            holder = self.ns.child(parent, name)
        if holder is not None and holder is not node and node.is_dir and not holder.is_dir and holder.token:
            # directories keep their plain name (as in _add, and on a fresh mount): the file moves
            # aside; the directory took its conflict name, or stayed where it was if that one
            # was taken too (by the implicit directory of entries written under it elsewhere)
            aside = conflict_name(name, holder.token)
            if self.ns.child(parent, aside) is None:
                self._show_as(holder, parent, aside)
                holder = None
        if holder is not None and holder is not node:
            name = conflict_name(name, info.token)
            if self.ns.child(parent, name) not in (None, node):
                return False
        old_parent = node.parent
        self._show_as(node, parent, name)
        self._drop_empty_implicit(self.ns.nodes.get(old_parent))
        return True

    @staticmethod
    def _implicit(node: Node) -> bool:
        return node.is_dir and node.token is None and not node.explicit and not node.meta_dirty

    def _merge_dirs(
        self, keep: Node, gone: Node, stays: Callable[[Node], bool] = lambda n: False, *, clashes: bool = False
    ) -> None:
        """Move the entries of the implicit directory ``gone`` into ``keep`` (both stand for the
        same path, so no entry's place in the vault changes); ``gone`` goes once empty. Two
        directories of one name merge likewise; a real clash stays in ``gone``, and so does an
        entry ``stays`` names. ``clashes``: a file of a name ``keep`` holds goes there under its
        conflict name (the names' claim order is settled after), as on a fresh mount."""
        for name, ino in list(gone.children.items()):
            child = self.ns.nodes[ino]
            if stays(child):
                continue
            there = self.ns.child(keep, name)
            if there is not None and child.is_dir and there.is_dir and self._implicit(there):
                self._merge_dirs(child, there, clashes=clashes)
                there = self.ns.child(keep, name)
            elif there is not None and child.is_dir and there.is_dir and self._implicit(child):
                self._merge_dirs(there, child, clashes=clashes)
                continue
            if there is None:
                self.ns.move(child, keep, name)
                self.index.save(child)
                self._inval_entry(gone.ino, name)
                self._inval_entry(keep.ino, name)
            elif clashes and not child.is_dir and not there.is_dir and child.token:
                moved = conflict_name(name, child.token)
                if self.ns.child(keep, moved) is None:
                    self._show_as(child, keep, moved)
        if not gone.children:
            self._drop_empty_implicit(gone, upwards=False)

    def _show_as(self, node: Node, parent: Node, name: str) -> None:
        """Show ``node`` as ``name`` in ``parent`` (where the listing puts it, or a conflict name)."""
        before, old = node.parent, node.name
        self.ns.move(node, parent, name)
        self.ns.show_as(node, name)
        self.index.save(node)
        self._inval_entry(before, old)
        self._inval_entry(parent.ino, name)

    def _add(self, info: TokenInfo, parts: list[str], vanished: dict[int, Node]) -> None:
        a = attributes(info)
        parent = self.ns.ensure_dirs(parts, a.mtime_ns or time.time_ns(), self._appeared)
        name = listed_name(info)
        holder = self.ns.child(parent, name)
        if holder is not None and holder.ino in vanished and (holder.is_dir == (a.kind == KIND_DIR)):
            # the entry lost its token and this one claims its place: its content was replaced
            del vanished[holder.ino]
            self._took_new_token.add(holder.ino)
            self.ns.set_token(holder, info.token)
            self.ns.follow_remote(holder, info)
            self.ns.show_as(holder, name)
            self.index.save(holder)
            self._inval_inode(holder.ino, attr_only=False)
            return
        if holder is not None and a.kind == KIND_DIR and holder.is_dir and holder.token is None:
            # a marker for a directory we only knew implicitly
            self.ns.set_token(holder, info.token)
            self.ns.follow_remote(holder, info)
            self.ns.set_explicit(holder, True)
            self.ns.show_as(holder, name)
            self._added.add(holder.ino)  # placed again with the entries added before it (helper hF)
            self.index.save(holder)
            self._inval_inode(holder.ino, attr_only=True)
            return
        if holder is not None and a.kind == KIND_DIR and holder.is_dir:
            # a second marker of a directory that exists (two mkdirs raced): one directory, whose
            # rmdir here deletes this marker too (or the directory would come back). Its mode,
            # owner and times are the first claim's, as on a fresh mount: each mount kept its own
            # marker's for good (one showed 700 where the others showed 755: hU D3)
            own = holder.token
            if (
                own in self._listed
                and not holder.meta_dirty
                and not holder.uploading
                and claim_order(info.created_at, info.token) < claim_order(self._created_at(own), own)
            ):
                self.ns.set_token(holder, info.token)
                self.ns.follow_remote(holder, info)
                self.ns.add_marker(holder, own)
                self._inval_inode(holder.ino, attr_only=True)
            else:
                self.ns.add_marker(holder, info.token)
            self.index.save(holder)
            return
        if holder is not None:
            if a.kind == KIND_DIR and not holder.is_dir:
                # directories keep their plain name (entries live under it); the file moves aside
                moved_name = conflict_name(name, holder.token or str(holder.ino))
                self.ns.move(holder, parent, moved_name)
                self.ns.show_as(holder, moved_name)
                self.index.save(holder)
                self._inval_entry(parent.ino, name)
            else:
                name = conflict_name(name, info.token)
        mode = a.mode if a.mode is not None else (self.ns.dir_mode if a.kind == KIND_DIR else self.ns.file_mode)
        node = self.ns.new_node(parent, name, a.kind, mode, a.mtime_ns)
        self.ns.set_token(node, info.token)
        self.ns.follow_remote(node, info)
        self.ns.show_as(node, name)
        self.ns.set_explicit(node, a.kind == KIND_DIR)
        self.ns.set_synced(node, trio.current_time())
        self._added.add(node.ino)
        self.index.save(node)
        self._inval_entry(parent.ino, name)

    def _replaced(self, node: Node, before: dict[str, Seen], started: float) -> bool:
        """The file ``node``'s token is gone, and a newer token at its place that an earlier
        listing showed as a conflict copy is left: another client replaced the content (a new
        token, then the old one deleted) and a listing came between the two. As when no listing
        came between (:meth:`_add`), the node takes the new token (its open files follow it to
        the new content) and the copy's node goes; True if so."""
        parent = self.ns.nodes.get(node.parent)
        if not node.is_file or node.remote_name is None or parent is None or parent.children is None:
            return False
        plain = shown_name(node.remote_name, node.remote_extension)
        # whole seconds: a token of the same second may be newer
        mine = before[node.token].created_at if node.token in before else None
        heirs = [
            n
            for n in (self.ns.nodes[i] for i in parent.children.values())
            if n is not node
            # (not the file that took a new token at its place in this listing: a copy shown for
            # T2 of a rewrite T1 → T2 → T3 then took T3 from it, helper hJ)
            and n.ino not in self._took_new_token
            and n.is_file
            and n.token in self._listed
            and n.remote_name is not None
            and shown_name(n.remote_name, n.remote_extension) == plain
            and self.eligible(n, started)
            and (mine is None or (self._created_at(n.token) or mine) >= mine)
        ]
        if not heirs:
            return False
        heir = min(heirs, key=lambda n: claim_order(self._created_at(n.token), n.token))
        info = self._listed[heir.token]
        self.ns.remove(heir, delete_token=False)
        self._inval_entry(parent.ino, heir.name, deleted=heir.ino)
        self.ns.release(heir, self.syncer.staging)
        self.ns.set_token(node, info.token)
        self.ns.follow_remote(node, info)
        self.index.save(node)
        self._inval_inode(node.ino, attr_only=False)
        return True

    def _vanish(self, node: Node) -> None:
        """The node's token is gone from the vault (deleted elsewhere)."""
        if node.is_dir and node.children:
            self.ns.make_implicit(node)
            self.index.save(node)
            self._inval_inode(node.ino, attr_only=True)
            return
        parent = self.ns.nodes.get(node.parent)
        self.ns.remove(node, delete_token=False)
        self._inval_entry(node.parent, node.name, deleted=node.ino)
        self.ns.release(node, self.syncer.staging)
        self._drop_empty_implicit(parent)

    def _drop_empty_implicit(self, node: Node | None, *, upwards: bool = True) -> None:
        while (
            node is not None
            and node.ino != ROOT
            and node.is_dir
            and not node.children
            and node.token is None
            and not node.explicit
            and not node.meta_dirty
        ):
            parent = self.ns.nodes.get(node.parent)
            self.ns.remove(node, delete_token=False)
            self._inval_entry(node.parent, node.name, deleted=node.ino)
            self.ns.release(node, self.syncer.staging)
            node = parent if upwards else None

    def _settle_dirs(self, started: float) -> None:
        """A directory shows under its plain name, as on a fresh mount, where a token of another
        directory and a file claim one path: a directory moved here onto a name another entry
        held took a conflict name (:meth:`_place`); once this listing is merged, it takes the
        plain name: from a file (which moves aside, as :meth:`_add` does), from an implicit
        directory (merged into it), or from a directory with a marker of its own (one
        directory: this token becomes its other marker, as for two mkdirs)."""
        for node in list(self.ns.nodes.values()):
            if not (node.is_dir and node.token and node.remote_name is not None and self.eligible(node, started)):
                continue
            plain = shown_name(node.remote_name, node.remote_extension)
            parent = self.ns.nodes.get(node.parent)
            if parent is None or node.name == plain or node.name != conflict_name(plain, node.token):
                continue
            holder = self.ns.child(parent, plain)
            if holder is not None and holder.is_dir and not self._implicit(holder):
                if not holder.token or not self.eligible(holder, started):
                    continue
                # entries the listing shows under the conflict name stay there (another client
                # wrote them while it showed the directory so): merged, they went back at the
                # next listing and came here again, showing where no fresh mount does
                self._merge_dirs(holder, node, lambda n: n.token in self._listed and self.eligible(n, started))
                tokens = {node.token, *node.extra_markers}
                if node.children:
                    # entries of the same name in both, or the listing's: as on a fresh mount,
                    # the markers are the plain name's and these entries an implicit directory
                    node.extra_markers = set()
                    self.ns.make_implicit(node)
                    self.ns.show_as(node, None)
                    self.index.save(node)
                    self._inval_inode(node.ino, attr_only=True)
                else:
                    self.ns.remove(node, delete_token=False)
                    self._inval_entry(parent.ino, node.name, deleted=node.ino)
                    self.ns.release(node, self.syncer.staging)
                for token in tokens:
                    self.ns.add_marker(holder, token)
                self.index.save(holder)
                continue
            if holder is not None and holder.is_dir:
                self._merge_dirs(node, holder)
                holder = self.ns.child(parent, plain)
                if holder is not None:
                    # entries of one name in both (one was written here while the directory
                    # showed under its conflict name): the marker goes to the plain name
                    self._hand_over_markers(node, holder, plain, started)
                    continue
            elif holder is not None:
                if not holder.token or not self.eligible(holder, started):
                    continue
                aside = conflict_name(plain, holder.token)
                if self.ns.child(parent, aside) is not None:
                    continue
                self.ns.move(holder, parent, aside)
                self.ns.show_as(holder, aside)
                self.index.save(holder)
                self._inval_entry(parent.ino, plain)
                self._inval_entry(parent.ino, aside)
            if self.ns.child(parent, plain) is not None:
                continue
            old = node.name
            self.ns.move(node, parent, plain)
            self.ns.show_as(node, plain)
            self.index.save(node)
            self._inval_entry(parent.ino, old)
            self._inval_entry(parent.ino, plain)

    def _hand_over_markers(self, node: Node, holder: Node, plain: str, started: float) -> None:
        """As on a fresh mount, where the marker and the entries of an implicit directory of its
        name make one directory: the implicit ``holder`` at the plain name takes ``node``'s
        markers, ``node`` stays as an implicit directory under its conflict name, and each of its
        entries goes where its context puts it (the plain name's go to ``holder``; those made
        under the conflict name stay)."""
        info = self._listed.get(node.token)
        if info is None:
            return
        self.ns.hand_over_markers(node, holder, info)
        self.ns.show_as(holder, plain)
        self.ns.show_as(node, None)
        self.index.save(holder)
        self.index.save(node)
        self._inval_inode(holder.ino, attr_only=True)
        self._inval_inode(node.ino, attr_only=True)
        self._place_until_still(
            [
                (n, self._listed[n.token])
                for n in self.ns.descendants(node)
                if n is not node and n.token in self._listed and self.eligible(n, started)
            ]
        )
        self._drop_empty_implicit(node, upwards=False)

    def _subtree_claim(self, node: Node, started: float) -> tuple[float, str] | None:
        """The earliest claim among the tokens in the implicit directory ``node`` (on a fresh
        mount, the first of them made it, at that point of the claim order); None if an entry
        in it has local changes or it holds no token."""
        best = None
        stack = [node]
        while stack:
            n = stack.pop()
            if n is not node and not self.eligible(n, started):
                return None
            for token in (n.token, *n.extra_markers):
                if token:
                    claim = claim_order(self._created_at(token), token)
                    best = claim if best is None or claim < best else best
            if n.children:
                stack.extend(self.ns.nodes[i] for i in n.children.values())
        return best

    def _settle_files_and_implicit_dirs(self, started: float) -> None:
        """A file and an implicit directory (entries whose context passes through a path no
        marker names) claiming one name: as on a fresh mount, whichever claimed it first in the
        claim order keeps the plain name; the file then shows under its conflict name, or the
        directory as ``name.dir`` (:meth:`Namespace.ensure_dirs`)."""
        files: dict[tuple[int, str], list[Node]] = {}
        for node in self.ns.nodes.values():
            if node.token and not node.is_dir and node.remote_name is not None and self.eligible(node, started):
                files.setdefault((node.parent, shown_name(node.remote_name, node.remote_extension)), []).append(node)
        for (parent_ino, plain), claimants in files.items():
            parent = self.ns.nodes.get(parent_ino)
            if parent is None or parent.children is None:
                continue
            holder = self.ns.child(parent, plain)
            aside = self.ns.child(parent, f"{plain}.dir")
            if holder is not None and self._implicit(holder):
                claim = self._subtree_claim(holder, started)
                if claim is None or not self._first_claim(claimants) < claim:  # (the directory claimed it first)
                    pass
                elif aside is None:
                    self.ns.move(holder, parent, f"{plain}.dir")
                    self.index.save(holder)
                    self._inval_entry(parent.ino, plain)
                    self._inval_entry(parent.ino, f"{plain}.dir")
                elif aside.is_dir:
                    # a directory of that name exists: a fresh mount puts the implicit directory's
                    # entries into it (Namespace.ensure_dirs), so this one merges them there too
                    # (helper hF: running mounts kept the two apart, and the file aside, for good)
                    # (helper hH: a file of a name both held stayed here, and with it the implicit
                    # directory at the plain name, the file X aside, for good)
                    self._merge_dirs(aside, holder, clashes=True)
                    self._inval_entry(parent.ino, plain)
            elif holder in claimants and aside is not None and self._implicit(aside):
                claim = self._subtree_claim(aside, started)
                moved = conflict_name(plain, holder.token)
                if claim is not None and claim < self._first_claim(claimants) and self.ns.child(parent, moved) is None:
                    self.ns.move(holder, parent, moved)
                    self.ns.show_as(holder, moved)
                    self.index.save(holder)
                    self.ns.move(aside, parent, plain)
                    self.index.save(aside)
                    for name in (plain, moved, f"{plain}.dir"):
                        self._inval_entry(parent.ino, name)

    def _first_claim(self, nodes: list[Node]) -> tuple[float, str]:
        """The earliest claim order of ``nodes`` (:func:`claim_order`)."""
        return min(claim_order(self._created_at(n.token), n.token) for n in nodes)

    def _settle_names(self, started: float) -> None:
        """Tokens claiming one path (files and symlinks) show under the names their claim order
        gives: the first under the plain name, the others under their conflict names. A
        conflict name goes back to plain once the path is free."""
        self._settle_dirs(started)
        self._settle_files_and_implicit_dirs(started)
        claims: dict[tuple[int, str], list[Node]] = {}
        aside: dict[tuple[int, str], list[int]] = {}  # (with the entries changed here: Namespace.aside)
        for node in self.ns.nodes.values():
            if node.token and not node.is_dir and node.remote_name is not None:
                key = (node.parent, shown_name(node.remote_name, node.remote_extension))
                if not node.unlinked and node.name != key[1]:
                    aside.setdefault(key, []).append(node.ino)
                if self.eligible(node, started) or node.ino in self._added and not node.unlinked:
                    claims.setdefault(key, []).append(node)
        self.ns.aside = aside
        for (parent_ino, plain), nodes in claims.items():
            parent = self.ns.nodes.get(parent_ino)
            if parent is None:
                continue
            if len(nodes) == 1 and nodes[0].name == plain:
                continue  # (nearly every file: one token for its path, shown under it)
            nodes.sort(key=lambda n: claim_order(self._created_at(n.token), n.token))
            holder = self.ns.child(parent, plain)
            if holder is not None and holder not in nodes:
                continue  # a local entry (not yet written back) holds the name: wait for it
            wanted = {n.ino: (plain if i == 0 else conflict_name(plain, n.token)) for i, n in enumerate(nodes)}
            movers = [n for n in nodes if n.name != wanted[n.ino]]
            if not movers:
                continue
            olds = {n.ino: n.name for n in movers}
            for n in movers:
                self.ns.detach(n)
            for n in movers:
                name = wanted[n.ino]
                if self.ns.child(parent, name) is not None:
                    name = olds[n.ino] if self.ns.child(parent, olds[n.ino]) is None else f"{name}~{n.ino}"
                self.ns.attach(parent, name, n)
                self.ns.show_as(n, name)
                self.index.save(n)
                self._inval_entry(parent.ino, olds[n.ino])
                self._inval_entry(parent.ino, name)
                if name != plain:
                    aside.setdefault((parent_ino, plain), []).append(n.ino)

    # -- kernel invalidation --------------------------------------------------------------------
    def _created_at(self, token: str | None) -> float | None:
        """When the last listing says ``token`` was made (None: not listed, or not said)."""
        info = self._listed.get(token)
        return info.created_at if info is not None else None

    def _inval_entry(self, parent: int, name: str, deleted: int = 0) -> None:
        self._invalidations.append(("entry", parent, name.encode("utf-8", "surrogateescape"), deleted))

    def _appeared(self, node: Node) -> None:
        """A directory the listing made (on the way to a token's path): the kernel may hold a
        negative entry for its name."""
        self._inval_entry(node.parent, node.name)

    def _inval_inode(self, ino: int, attr_only: bool) -> None:
        self._invalidations.append(("inode", ino, attr_only))

    def _flush_invalidations(self) -> None:
        """Queue the invalidations gathered so far for :meth:`_tell_kernel`, without waiting for
        the kernel: an inode's may wait there for a page a read holds, and that read may be
        waiting for the refresher to follow another client's replacement (``_moved_on``). The
        refresher then applied no listing at all until the read gave up, 10 s later, with EIO
        (helper hJ: 10 of 21 opens of a file another mount kept rewriting)."""
        todo, self._invalidations = self._invalidations, []
        if not todo or not self.invalidate:
            return
        self._kernel_last = trio.Event()
        self._kernel_todo.append((todo, self._kernel_last))
        self._kernel_wake.set()

    async def told_kernel(self) -> None:
        """Until the kernel has been told every invalidation queued so far (a ``refresh`` asked
        for over the control socket answers after it: what it showed is what programs see)."""
        await self._kernel_last.wait()

    async def _tell_kernel(self) -> None:
        """Make the queued invalidations, batch after batch in order, on a thread (one may wait
        in the kernel)."""
        while True:
            await self._kernel_wake.wait()
            self._kernel_wake = trio.Event()
            batches, self._kernel_todo = self._kernel_todo, []
            try:
                await trio.to_thread.run_sync(_invalidate, [item for batch, _ in batches for item in batch])
            finally:  # (also when it failed: a refresh asked over the control socket waits for them)
                for _, done in batches:
                    done.set()


def _invalidate(items: list[tuple]) -> None:
    """Tell the kernel to drop what it holds of these entries and inodes (a worker thread)."""
    for item in items:
        try:
            if item[0] == "entry":
                pyfuse3.invalidate_entry(item[1], item[2], deleted=item[3])
            else:
                pyfuse3.invalidate_inode(item[1], attr_only=item[2])
        except (OSError, pyfuse3.FUSEError):
            pass  # the kernel did not know the entry: nothing to invalidate
        except Exception:  # one invalidation's failure must not keep the others from the kernel
            log.exception("invalidating %s in the kernel failed", item[:2])

"""``privifs verify``: check the whole vault, like ``fsck.s3ql`` / ``s3ql_verify``.

* Always: the local index (this machine's last view of the vault) against the vault's listing —
  a file the index holds whose token is gone from the vault is **missing**; tokens the index does
  not know yet (added elsewhere) are counted, not errors.
* ``--data``: every token is downloaded and its AES-GCM tag verified (nothing is written to
  disk); one that fails is **damaged**, one that vanished meanwhile is missing, unless the vault
  no longer lists it and this machine's index (read again) does not name it: a client deleted it
  while the check ran (a mount replaced or removed its file), counted, no damage. A big file's parts
  are checked against its manifest as a read checks them (present, size, keyed digest): a part
  missing, swapped or replaced makes the file damaged, named by its path.
* ``--repair`` (with ``--data``): a damaged token whose content this machine's cache holds (sealed,
  and verified again while it is read) is stored again as a new token with the same name, place
  and attributes, and the damaged token is deleted; a mount picks the new token up at its next
  refresh. A file with a newer local version still staged is left to that upload. Missing files
  are never brought back (a deletion made elsewhere looks the same as a loss).

Each problem is printed with its path. Exit status: 0 when nothing is wrong (or everything found
was repaired), 3 when damaged or missing files remain, 1 when the check itself could not run.
Works with or without a mount of the vault running; progress on a terminal.
"""

from __future__ import annotations

import argparse
import contextlib
import sqlite3
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import trio

from privifs import paths
from privifs.account import open_account
from privifs.cli.commands import help_of
from privifs.cli.failures import EXIT_USAGE, ExitStatus
from privifs.client.connect import connect
from privifs.client.datatokens import FileMeta, find, find_each
from privifs.client.shapes import TokenInfo
from privifs.client.sinks import get_checked
from privifs.client.vault import Vault
from privifs.config import load
from privifs.crypto import digest
from privifs.crypto.sealed import SealedFile, local_key
from privifs.errors import IntegrityError, NotFoundError, PrivifsError
from privifs.fs.names import entry_name
from privifs.fs.tokenmeta import RESERVED_CONTEXT, same_context, split_context
from privifs.keycheck import KEYCHECK_PATH, key_checks, naming_check, prove_key
from privifs.parts import format as fmt
from privifs.parts.format import MARK
from privifs.parts.store import PartStore, is_manifest, is_part, maybe_unmarked_manifest
from privifs.words import printable

PROBLEMS_EXIT = 3
PARALLEL = 4
DESCRIPTION = """Check the whole vault. Always: this machine's local index against the vault's listing
(a file whose token is gone is reported missing). With --data: every token is downloaded and its
AES-GCM tag verified, and every part of a big file against its manifest (a file that fails, or a
big file missing a part, is reported damaged). With --repair: a damaged token whose
content this machine's cache holds is stored again and the damaged one deleted.

Exit status: 0 nothing wrong (or all repaired), 3 damaged or missing files remain (or the
configuration or key is missing or wrong), 5 the server cannot be reached, 1 the check could not
run otherwise."""


def register(sub) -> None:
    p = sub.add_parser(
        "verify",
        help=help_of("verify"),
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--data", action="store_true", help="download every token and verify its AES-GCM tag")
    p.add_argument(
        "--repair",
        action="store_true",
        help="with --data: store a damaged token again from a good local copy, when there is one",
    )
    p.add_argument("--cache-dir", type=Path, help="the mount's cache directory, if not the default")
    p.add_argument("--state-dir", type=Path, help=argparse.SUPPRESS)
    p.set_defaults(func=run)


@dataclass
class LocalFile:
    path: str
    token: str
    size: int
    dirty: bool


@dataclass
class Report:
    missing: list[str] = field(default_factory=list)
    damaged: list[str] = field(default_factory=list)
    unchecked: list[str] = field(default_factory=list)
    repaired: list[str] = field(default_factory=list)
    resized: list[str] = field(default_factory=list)  # meta size differs from the verified content (no damage)
    unknown: int = 0
    checked: int = 0
    checked_bytes: int = 0
    unnamed: int = 0  # parts no verified manifest names (an interrupted upload's; the sweep's)
    unnamed_bytes: int = 0
    gone: int = 0  # tokens deleted while the check ran (a mount replaced or removed their files): no damage
    replaced: int = 0  # files of the local index another client replaced (a newer token at their place)
    reserved: int = 0  # other applications' tokens in privifs's reserved context, which mounts do not show

    def line(self, kind: str, text: str) -> None:
        print(f"{kind}: {printable(text)}", flush=True)


def read_index(state_dir: Path) -> tuple[dict[str, LocalFile], set[str], set[str]] | None:
    """The files of the local index by token, its pending deletions, and the other markers of its
    directories (two machines made one at once: Node.extra_markers); None: no index here."""
    db = state_dir / "index.sqlite3"
    if not db.exists():
        return None
    try:
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        try:
            rows = conn.execute("SELECT ino, parent, name, token, size, content_dirty FROM nodes").fetchall()
            tombstones = {r[0] for r in conn.execute("SELECT token FROM tombstones")}
            try:
                markers = {
                    t for (m,) in conn.execute("SELECT markers FROM nodes WHERE markers IS NOT NULL") for t in m.split()
                }
            except sqlite3.OperationalError:  # an index from before markers were kept
                markers = set()
        finally:
            conn.close()
    except sqlite3.Error as exc:
        raise PrivifsError(f"cannot read the local index {db}: {exc}") from None
    parents = {r[0]: (r[1], r[2]) for r in rows}

    def path(ino: int) -> str:
        parts = []
        seen = set()
        while ino in parents and parents[ino][0] != ino and ino not in seen:
            seen.add(ino)
            parent, name = parents[ino]
            parts.append(name)
            ino = parent
        return "/" + "/".join(reversed(parts))

    files = {r[3]: LocalFile(path(r[0]), r[3], r[4], bool(r[5])) for r in rows if r[3]}
    return files, tombstones, markers


def listed_path(info: TokenInfo) -> str:
    return "/" + "/".join([*split_context(info.context), entry_name(info)])


class DiscardSink:
    """Counts verified plaintext and keeps nothing."""

    def __init__(self) -> None:
        self.size = 0

    async def write(self, data) -> None:
        self.size += len(data)

    async def reset(self) -> None:
        self.size = 0


class Bar:
    """A rich progress bar on a terminal; silent otherwise."""

    def __init__(self, total: int):
        self.bar = None
        if sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(
                TextColumn("verifying tokens"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeRemainingColumn(),
                console=Console(stderr=True),
                transient=True,
            )
            self.files = self.bar.add_task("tokens", total=total)
            self.bar.start()

    def done(self) -> None:
        if self.bar is not None:
            self.bar.advance(self.files, 1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def cached_copy(cache_dir: Path, token: str, key: bytes) -> SealedFile | None:
    """This machine's cached content of ``token`` (sealed with the local key), if any."""
    entries = cache_dir / "entries"
    if not entries.exists():
        return None
    import diskcache

    from privifs.fs.cache import AdoptingDisk

    cache = diskcache.Cache(str(entries), disk=AdoptingDisk)
    try:
        f = cache.get(token, read=True)
        if f is None:
            return None
        try:
            sealed = SealedFile.open(f.name, local_key(key), place=token)
            sealed.dense = sealed.header_dense  # a download's: a chunk of zeros is damage (ContentCache.open)
            return sealed
        except OSError:
            return None
        finally:
            f.close()
    finally:
        cache.close()


async def check_keycheck(vault: Vault, infos: list[TokenInfo], report: Report) -> None:
    """WrongKeyError unless the key decrypts this vault (every token would look damaged); a
    damaged key-check token, while the vault's files prove the key, is reported damaged."""
    check = naming_check(infos)
    if check is not None and not await prove_key(vault, check, infos):
        report.damaged.append(KEYCHECK_PATH)
        report.line(
            "damaged",
            f"{KEYCHECK_PATH}: the key-check token {check.token} fails authentication (the key is right: "
            "it decrypts the vault's files); mounts go on without it",
        )


def note_reserved(infos: list[TokenInfo], report: Report) -> None:
    """Name the tokens in privifs's reserved context that are neither a key check nor a part:
    another application's, put there, vanished from every mount without a word (helper hAG L2)."""
    top = split_context(RESERVED_CONTEXT)
    for info in infos:
        if split_context(info.context)[: len(top)] == top and not is_part(info) and not key_checks([info]):
            report.reserved += 1
            report.line(
                "note",
                f"{listed_path(info)} (token {info.token}) is in {RESERVED_CONTEXT}, which privifs keeps for its own "
                "tokens: no mount shows it ('privifs token get' reads it, 'privifs token mv' moves it out)",
            )


async def repair(
    client, vault: Vault, info: TokenInfo, local: LocalFile | None, cache_dir: Path, key: bytes, path: str
) -> str:
    """Store ``info``'s content again from a good local copy; returns what was done (raises if nothing)."""
    if is_part(info):  # a new token would not be the one its manifest names
        raise PrivifsError(
            "a part of a file stored as parts cannot be stored again under a new token; restore the file from a backup"
        )
    if local is not None and local.dirty:
        raise PrivifsError("a newer local version is staged; the mount uploads it and drops this token")
    sealed = cached_copy(cache_dir, info.token, key)
    if sealed is None:
        raise PrivifsError("no local copy (not in this machine's cache); restore the file from a backup")
    try:
        if info.size is not None and sealed.size != info.size:
            raise PrivifsError(f"the cached copy has {sealed.size} bytes, the vault says {info.size}")
        content_key = vault.derive(digest.content_key)
        # a manifest's privifs.digest states the manifest's own encoding; its cache entry is the
        # file's whole content (privifs.fs.partwrite), checked above by its size only
        manifest = MARK in info.risk
        check = None if manifest else digest.check_for(content_key, info.risk)
        whole = digest.hasher(content_key)  # the digest the new whole token states
        for piece in sealed.chunks(16):  # verify the local copy completely before storing anything
            whole.update(piece)
            if check is not None:
                check.block(0, memoryview(piece))
        if check is not None:
            check.verify()  # a copy of what the token states, not of what was served in its place

        async def source() -> AsyncIterator[bytes]:
            for piece in sealed.chunks(16):
                yield piece

        new = await vault.put_stream(
            source, sealed.size, FileMeta(info.file_name, info.extension, info.context, sealed.size, info.path or path)
        )
    except IntegrityError as exc:
        raise PrivifsError(f"the cached copy is damaged too ({exc})") from None
    finally:
        sealed.close()
    risk = {k: v for k, v in info.risk.items() if k != MARK}  # stored again whole: one token, no manifest
    if manifest:  # (the manifest's digest on the whole content would make every read EIO)
        risk[digest.FIELD] = whole.hexdigest()
    if risk:
        await client.tokens.set_risk(new, risk)
    await client.tokens.delete(info.token)
    return new


async def verify(
    args: argparse.Namespace, client, vault: Vault, key: bytes, state_dir: Path, cache_dir: Path
) -> Report:
    report = Report()
    infos = [info async for info in client.tokens.list()]
    await check_keycheck(vault, infos, report)
    note_reserved(infos, report)
    listed = {i.token: i for i in infos}
    local = read_index(state_dir)
    files: dict[str, LocalFile] = {}
    tombstones: set[str] = set()
    markers: set[str] = set()
    if local is None:
        print(f"no local index in {state_dir} (never mounted here): checking the vault only", file=sys.stderr)
    else:
        files, tombstones, markers = local
        # a token the listing lacks may exist (see find_each): reported missing, its file was damaged
        for info in await find_each(client.tokens, [t for t in files if t not in listed and t not in tombstones]):
            infos.append(info)
            listed[info.token] = info
        # where tokens this index does not know are: another client's new version of a file
        elsewhere = {listed_path(i) for t, i in listed.items() if t not in files and not is_part(i)}
        for token, f in sorted(files.items(), key=lambda kv: kv[1].path):
            if token not in listed and token not in tombstones:
                if f.path in elsewhere:  # replaced by another client; the mount here follows at its next listing
                    report.replaced += 1
                    continue
                report.missing.append(f.path)
                report.line(
                    "missing",
                    f"{f.path}: the local index has token {token}, the vault does not"
                    + (" (a newer local version is staged)" if f.dirty else ""),
                )
        report.unknown = sum(
            1
            for t, i in listed.items()
            if t not in files
            and t not in tombstones
            and t not in markers
            and not same_context(i.context, RESERVED_CONTEXT)
            and not is_part(i)
        )
    if not args.data:
        return report
    todo = [i for i in infos if not same_context(i.context, RESERVED_CONTEXT) and i.token not in tombstones]
    content_key = vault.derive(digest.content_key)
    bar = Bar(len(todo))
    limiter = trio.CapacityLimiter(PARALLEL)
    store = PartStore(vault)
    manifests: dict[str, fmt.Manifest] = {}  # the manifests that verified, by token
    named: set[str] = set()  # part tokens a verified manifest names: checked with it (tag, size, digest)

    async def deleted_meanwhile(token: str) -> bool:
        """A token that vanished after the listing was read and that no file needs: deleted by a
        client meanwhile (a mount running here or elsewhere replaced or removed its file, or
        retired a part no manifest names), no damage. One this machine's index still names (but
        for a file another client replaced), or that the vault still lists, is missing."""
        if await find(client.tokens, token) is not None:
            return False
        if local is None:
            return True
        now = read_index(state_dir)
        if now is None or token not in now[0]:
            return True
        # named here still: another client may have replaced the file (a newer token at its place,
        # which the mount here follows at its next listing; helper hJ: reported missing)
        path = now[0][token].path
        context = path.rpartition("/")[0] or "/"
        there = [i async for i in client.tokens.list(context=context)]
        return any(listed_path(i) == path and i.token not in now[0] for i in there)

    def path_of(info: TokenInfo) -> str:
        return files[info.token].path if info.token in files else listed_path(info)

    async def check_manifest(info: TokenInfo) -> None:
        """A big file's manifest: decrypted and decoded here; its parts are checked afterwards
        against it, so a part that is missing, swapped or replaced names the file."""
        path = path_of(info)
        async with limiter, judged(info, path):
            manifests[info.token] = manifest = await store.manifest(info.token, info.risk)
            report.checked += 1
            named.update(p.token for p in manifest.parts if not p.is_hole)
        if info.token in manifests and info.size is not None and manifests[info.token].total != info.size:
            report.resized.append(path)
            report.line(
                "note",
                f"{path}: its meta states {info.size} bytes, its manifest {manifests[info.token].total}; a mount"
                " shows the manifest's size once the file is read",
            )

    async def check_unmarked(info: TokenInfo) -> None:
        """A token at a file's place, not marked, whose meta states a size only files stored as
        parts have: a manifest whose mark another application's risk meta replaced is read
        through its parts by a mount, 'token get' and the sweep, so it is checked as one (its
        parts against it). Anything else is checked as a whole token afterwards."""
        async with limiter:
            try:
                manifest = await store.unmarked_manifest(info)
            except PrivifsError:
                manifest = None  # checked as a whole token, which says what is wrong
        if manifest is not None:
            manifests[info.token] = manifest
            report.checked += 1
            named.update(p.token for p in manifest.parts if not p.is_hole)

    async def check_parts(info: TokenInfo, manifest: fmt.Manifest) -> None:
        path = path_of(info)
        problems: list[str] = []
        unchecked: list[str] = []

        async def one(index: int, token: str) -> None:
            if token not in listed and await find(client.tokens, token) is None:
                problems.append(f"part {index} (token {token}) is missing from the vault")
                return
            async with limiter:
                try:
                    data = await store.get_part(manifest, index)
                except NotFoundError:
                    problems.append(f"part {index} (token {token}) is missing from the vault")
                except IntegrityError as exc:
                    problems.append(f"part {index} (token {token}) fails verification ({exc})")
                except PrivifsError as exc:
                    unchecked.append(f"part {index} (token {token}): {exc}")
                else:
                    report.checked += 1
                    report.checked_bytes += len(data)

        async with trio.open_nursery() as nursery:
            for index, part in enumerate(manifest.parts):
                if not part.is_hole:
                    nursery.start_soon(one, index, part.token)
        bar.done()
        if problems and all("missing" in why for why in problems) and await deleted_meanwhile(info.token):
            report.gone += 1  # the file was replaced or removed meanwhile and its parts retired
            return
        if problems:
            report.damaged.append(path)
            for why in sorted(problems, key=lambda w: int(w.split()[1])):
                report.line("damaged", f"{path}: {why}")
            if args.repair:
                report.line(
                    "not repaired",
                    f"{path}: a part of a file stored as parts cannot be stored again under a new token; "
                    "restore the file from a backup",
                )
        elif unchecked:
            report.unchecked.append(path)
            report.line("not checked", f"{path}: {unchecked[0]}")

    @contextlib.asynccontextmanager
    async def judged(info: TokenInfo, path: str) -> AsyncIterator[None]:
        """The check of ``info``'s token runs inside; how it failed is reported (damaged, and
        stored again with --repair; missing; not checked) and goes no further."""
        try:
            yield
        except IntegrityError as exc:
            report.damaged.append(path)
            report.line("damaged", f"{path}: token {info.token} fails verification ({exc})")
            if args.repair:
                await try_repair(info, path)
        except NotFoundError:
            if await deleted_meanwhile(info.token):
                report.gone += 1
                return
            report.missing.append(path)
            report.line("missing", f"{path}: token {info.token} vanished from the vault")
        except PrivifsError as exc:
            report.unchecked.append(path)
            report.line("not checked", f"{path}: {exc}")

    async def try_repair(info: TokenInfo, path: str) -> None:
        try:
            new = await repair(client, vault, info, files.get(info.token), cache_dir, key, path)
        except PrivifsError as why:
            report.line("not repaired", f"{path}: {why}")
        else:
            report.repaired.append(path)
            report.line("repaired", f"{path}: stored again from the local cache as token {new}")

    async def check(info: TokenInfo) -> None:
        if is_part(info) and info.token in named:
            bar.done()  # checked with the manifest that names it
            return
        path = path_of(info)
        async with limiter:
            sink, check = DiscardSink(), digest.check_for(content_key, info.risk)
            verified = False
            try:
                async with judged(info, path):
                    await get_checked(vault, info.token, sink, check, size=info.size)
                    report.checked += 1
                    report.checked_bytes += sink.size
                    verified = True
                if verified and info.size is not None and sink.size != info.size:
                    report.resized.append(path)
                    report.line(
                        "note",
                        f"{path}: its meta states {info.size} bytes, its verified content has {sink.size}; a mount"
                        " shows the content's size once the file is opened",
                    )
            finally:
                bar.done()

    big = [i for i in todo if is_manifest(i)]
    maybe = [i for i in todo if maybe_unmarked_manifest(i)]
    try:
        async with trio.open_nursery() as nursery:  # first the manifests: they say which parts are whose
            for info in big:
                nursery.start_soon(check_manifest, info)
            for info in maybe:
                nursery.start_soon(check_unmarked, info)
        async with trio.open_nursery() as nursery:
            for info in big:
                if info.token in manifests:
                    nursery.start_soon(check_parts, info, manifests[info.token])
                else:
                    bar.done()
            for info in todo:
                if is_manifest(info):
                    continue
                if info.token in manifests:  # a manifest without its mark
                    nursery.start_soon(check_parts, info, manifests[info.token])
                else:
                    nursery.start_soon(check, info)
    finally:
        bar.close()
    for info in todo:
        if is_part(info) and info.token not in named:
            report.unnamed += 1
            report.unnamed_bytes += info.size or 0
    return report


def run(args: argparse.Namespace) -> int:
    if args.repair and not args.data:  # a bad command line: exit 2, like the parser's own errors
        raise ExitStatus("--repair needs --data (damage is found by downloading every token)", EXIT_USAGE)

    cfg = load(args.config)
    state_dir = args.state_dir or paths.vault_state_dir(cfg)
    cache_dir = args.cache_dir or paths.vault_cache_dir(cfg)
    with open_account(cfg, command=True) as account:

        async def main() -> Report:
            async with connect(account.endpoints, account.credentials, account.client_options()) as client:
                return await verify(args, client, client.vault(account.key), account.key, state_dir, cache_dir)

        report = trio.run(main)
    problems = len(report.missing) + len(report.damaged) - len(report.repaired) + len(report.unchecked)
    summary = [f"{len(report.missing)} missing"]
    if args.data:
        summary += [
            f"{report.checked} tokens ({report.checked_bytes / 2**20:.1f} MiB) verified",
            f"{len(report.damaged)} damaged",
        ]
        if args.repair:
            summary.append(f"{len(report.repaired)} repaired")
        if report.unchecked:
            summary.append(f"{len(report.unchecked)} could not be checked")
        if report.resized:
            summary.append(f"{len(report.resized)} state another size than their content's")
    if report.gone:
        summary.append(f"{report.gone} deleted while the check ran (files replaced or removed meanwhile)")
    if report.replaced:
        summary.append(
            f"{report.replaced} replaced by another client (a newer token at their place; the mount here shows it "
            "at its next listing)"
        )
    if report.unknown:
        summary.append(f"{report.unknown} not yet in the local index (added elsewhere)")
    if report.reserved:
        summary.append(f"{report.reserved} in {RESERVED_CONTEXT}, which mounts do not show")
    if report.unnamed:  # (no damage: a mount's sweep removes them)
        summary.append(
            f"{report.unnamed} parts of no file ({report.unnamed_bytes / 2**20:.1f} MiB: of big files removed or "
            "rewritten less than a minute before the mount stopped, which its next start removes a minute "
            "after it; or left by interrupted or failed uploads, or still being uploaded, which a mount "
            "removes once they are an hour old)"
        )
    print(("verify: " if problems else "verify: ok: ") + ", ".join(summary))
    return PROBLEMS_EXIT if problems else 0

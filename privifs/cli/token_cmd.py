"""privifs token: work on data tokens directly, without a mount - for scripts, debugging and
recovery. put and get stream (bounded memory) and show progress on a terminal; a file larger
than the parts threshold is stored as parts plus a manifest, and get of a manifest reassembles
the file (see docs/format.md). Every action
first checks the AES key against the vault's key check, so a wrong key is refused before it can
write anything."""

from __future__ import annotations

import argparse
import contextlib
import errno
import hashlib
import json
import os
import secrets
import stat
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import trio

from privifs import paths
from privifs.account import open_account
from privifs.cli.commands import help_of
from privifs.cli.failures import LocalFileError
from privifs.cli.options import context_path, file_name, is_utf8, utf8_text
from privifs.client.connect import connect
from privifs.client.datatokens import FileMeta
from privifs.client.shapes import TokenInfo
from privifs.client.sinks import BlockWriter, get_checked
from privifs.config import SECRET_NAMES, load
from privifs.crypto import digest
from privifs.errors import MalformedAnswer, NotFoundError, PrivifsError, VaultError, output_failed, single_error
from privifs.fs.names import NAME_MAX, shown_name
from privifs.fs.tokenmeta import KIND_DIR, KIND_FILE, KIND_SYMLINK, RESERVED_CONTEXT, attributes, split_context
from privifs.keycheck import verify_key
from privifs.parts import format as fmt
from privifs.parts.store import THRESHOLD, PartStore, is_manifest
from privifs.words import printable
from privifs.zeros import all_zero

PIECE = 1024 * 1024
PROGRESS_MIN = 8 * 1024 * 1024


def register(sub) -> None:
    p = sub.add_parser("token", help=help_of("token"), description=__doc__)
    tsub = p.add_subparsers(dest="token_command", required=True, metavar="ACTION")

    def action(name: str, text: str, fn):
        a = tsub.add_parser(name, help=text, description=text[0].upper() + text[1:] + ".")
        a.set_defaults(func=run, action=fn)
        return a

    ls = action("ls", "list every token: size, date, context/name", _ls)
    ls.add_argument("--json", action="store_true", help="one JSON object per line")
    ls.add_argument(
        "--all",
        action="store_true",
        help="also privifs' own tokens in /.privifs: the key check and the parts of big files",
    )
    put = action("put", "encrypt and store a file; prints the permanent token", _put)
    put.add_argument("file", type=Path, help="a regular file")
    put.add_argument("--name", type=file_name, help="file name to record, no '/' (default: the file's name)")
    put.add_argument("--context", type=context_path, default="/", help="context (directory) to record (default /)")
    get = action(
        "get",
        "fetch, verify and decrypt a token into a file (written only if it verifies); a symbolic link's token"
        " becomes that link",
        _get,
    )
    get.add_argument("token", type=utf8_text, help="the token, as 'privifs token ls' prints it")
    get.add_argument("out", type=Path, help="the file to write, or a directory to write it into under its name")
    rm = action("rm", "delete a token (a big file's manifest: its parts too)", _rm)
    rm.add_argument("token", type=utf8_text, help="the token, as 'privifs token ls' prints it")
    mv = action("mv", "rename a token or move it to another context (meta only)", _mv)
    mv.add_argument("token", type=utf8_text, help="the token, as 'privifs token ls' prints it")
    mv.add_argument("--name", type=file_name, required=True, help="the new file name (no '/')")
    mv.add_argument("--context", type=context_path, help="the new context (directory)")
    st = action("stat", "show a token's meta as JSON", _stat)
    st.add_argument("token", type=utf8_text, help="the token, as 'privifs token ls' prints it")


def run(args: argparse.Namespace) -> int:
    cfg = load(args.config)
    args.cfg = cfg
    with open_account(cfg, command=True) as account:

        async def main() -> int:
            async with connect(account.endpoints, account.credentials, account.client_options()) as client:
                vault = client.vault(account.key)
                await verify_key(client, vault)
                args.parts = PartStore(vault)
                return await args.action(args, client, vault) or 0

        return trio.run(main)


class Progress:
    """A rich progress bar on a terminal for large transfers; silent otherwise."""

    def __init__(self, label: str, total: int):
        self.bar = None
        if total >= PROGRESS_MIN and sys.stderr.isatty():
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                TextColumn,
                TransferSpeedColumn,
            )
            from rich.progress import (
                Progress as RichProgress,
            )

            self.bar = RichProgress(
                TextColumn(label), BarColumn(), DownloadColumn(), TransferSpeedColumn(), transient=True
            )
            self.task = self.bar.add_task(label, total=total)
            self.bar.start()

    def advance(self, n: int) -> None:
        if self.bar is not None:
            self.bar.advance(self.task, n)

    def reset(self) -> None:
        if self.bar is not None:
            self.bar.reset(self.task)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def split_name(name: str) -> str:
    stem, dot, ext = name.rpartition(".")
    return ext if dot and stem else ""


def _shown(info: TokenInfo) -> dict:
    """A token's listing entry as ``--json`` prints it (the reference's field names)."""
    return {
        "token": info.token,
        "context": info.context,
        "fileName": info.file_name,
        "extension": info.extension,
        "size": info.size,
        "path": info.path,
        "createdAt": info.created_at,
        "risk": info.risk,
    }


async def _ls(args, client, vault) -> int:
    async for info in client.tokens.list():
        if not args.all and split_context(info.context)[:1] == split_context(RESERVED_CONTEXT):
            continue
        if args.json:
            print(json.dumps(_shown(info)))
        else:
            created = time.strftime("%Y-%m-%d %H:%M", time.localtime(info.created_at)) if info.created_at else "-"
            size = "-" if info.size is None else str(info.size)
            print(f"{info.token}  {size:>12}  {created}  {printable(info.context.rstrip('/') + '/' + info.file_name)}")
    return 0


async def _put(args, client, vault) -> int:
    path: Path = args.file
    try:
        st = await trio.Path(path).stat()
    except OSError as exc:
        raise LocalFileError(f"cannot read {path}: {exc.strerror}") from None
    if stat.S_ISDIR(st.st_mode):
        raise LocalFileError(f"{path} is a directory; 'token put' stores one file (a mount stores trees)")
    if not stat.S_ISREG(st.st_mode):
        raise LocalFileError(f"{path} is not a regular file")
    if not os.access(path, os.R_OK):
        raise LocalFileError(f"cannot read {path}: permission denied")
    size = st.st_size
    name = args.name or path.name
    if not is_utf8(name):
        raise LocalFileError(f"the name of {path} is not valid UTF-8; give the name to record with --name")
    progress = Progress(f"put {name}", size)

    key = vault.derive(digest.content_key)
    h = digest.hasher(key)  # a file stored whole states its content's digest, as a mount's do

    async def source() -> AsyncIterator[bytes]:
        nonlocal h
        progress.reset()
        h = digest.hasher(key)  # each attempt reads the file from the start
        async with await trio.open_file(path, "rb") as f:
            while True:
                chunk = await f.read(PIECE)
                if not chunk:
                    return
                progress.advance(len(chunk))
                h.update(chunk)
                yield chunk

    context = args.context
    meta = FileMeta(name, split_name(name), context, size, context.rstrip("/") + "/" + name)
    try:
        if size > THRESHOLD:
            try:
                token = await args.parts.put(source, size, meta)  # the manifest states its own digest
            except VaultError as exc:
                if exc.made is not None:  # a manifest made but not marked: not left at the name
                    with contextlib.suppress(PrivifsError):
                        await client.tokens.delete(exc.made)
                raise
        else:
            token = await vault.put_stream(source, size, meta)
            await client.tokens.set_risk(token, {digest.FIELD: h.hexdigest()})
    finally:
        progress.close()
    print(token)
    return 0


async def _find(client, token: str):
    from privifs.client import shapes

    for attempt in range(3):  # an answer cut short or a proxy's page: asked again, as a listing's pages are
        resp = await client.transport.call(
            "GET", "/data-token/list-data-tokens", params={"filters[token]": token, "perPage": "1"}, idempotent=True
        )
        try:
            items, _ = shapes.listing(shapes.json_or_text(resp))
            break
        except MalformedAnswer:
            if attempt == 2:
                raise
            await trio.sleep(client.transport.backoff(attempt))
    for item in items:
        info = shapes.TokenInfo.from_item(item)
        if info.token == token:
            return info
    async for info in client.tokens.list():  # servers that ignore the token filter
        if info.token == token:
            return info
    raise NotFoundError(f"token {token} does not exist in this vault")


class FileSink(BlockWriter):
    """Writes unverified plaintext to a private temporary file (on a worker thread while the
    download goes on); linked into place only after the tag verified, removed otherwise.

    The temporary file has no name (``O_TMPFILE``) where the filesystem allows it, so a get
    killed with SIGKILL leaves nothing behind; elsewhere (a FUSE mount, privifs' own included)
    it is ``.NAME.privifs-partial`` beside the output, removed by the next get to that file."""

    def __init__(self, out: Path, progress: Progress, nursery: trio.Nursery):
        super().__init__(nursery)
        self.out = out
        self.tmp = partial_path(out)
        self.unnamed = False
        self.progress = progress
        self.f = None

    def _open(self) -> int:
        # never open a file that is already there: a partial file left by a killed get (of an
        # older privifs, or where files cannot be unnamed), or one another user put in a shared
        # directory (a symlink, or a file they could read the plaintext from) is removed and a
        # new private one made
        self.tmp.unlink(missing_ok=True)
        flags = os.O_RDWR | os.O_CLOEXEC
        try:
            fd = os.open(self.out.parent, flags | os.O_TMPFILE, 0o600)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL, errno.ENOSYS):
                raise
        else:
            self.unnamed = True
            return fd
        return os.open(self.tmp, flags | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)

    def _restart(self) -> None:
        if self.f is None:
            try:
                fd = self._open()
            except OSError as exc:
                if exc.errno == errno.ENOENT and self.out.parent.is_dir():
                    # the directory is there, but takes no new file (/proc, where 'token get T
                    # /proc/version' said only "No such file or directory")
                    from privifs.kernelmounts import filesystem_type

                    kind = filesystem_type(self.out.parent)
                    raise LocalFileError(
                        f"cannot write {self.out}: no new file can be made in {self.out.parent}"
                        + (f" (a {kind} filesystem)" if kind else "")
                        + "; name a file on a disk"
                    ) from None
                raise output_failed(self.out, exc, "the file") from None
            self.f = os.fdopen(fd, "wb")
        else:
            self.f.seek(0)
            self.f.truncate()
        self.progress.reset()

    def _write_block(self, offset: int, data: bytes) -> None:
        try:
            if all_zero(data):  # a hole (a sparse file's, or any block of zeros): skipped, not written
                self.f.seek(len(data), os.SEEK_CUR)
            else:
                self.f.write(data)
        except OSError as exc:  # a write error names no file: say which, and for a full disk what to do
            raise output_failed(self.out, exc, "the file") from None

    async def write(self, data: bytes) -> None:
        await super().write(data)
        self.progress.advance(len(data))

    def written(self) -> bytes:
        """What was written since the last reset (once :meth:`finish` returned)."""
        self.f.flush()
        return os.pread(self.f.fileno(), self.total, 0)

    def commit(self) -> None:
        try:
            self.f.truncate()  # (the size, where the file ends in a hole)
            self.f.flush()
            os.fsync(self.f.fileno())
            os.fchmod(self.f.fileno(), _replaced_mode(self.out))
            if self.unnamed:  # given a name of its own first: a link cannot replace a file
                self.tmp = partial_path(self.out, f".privifs-{secrets.token_hex(6)}")
                _link_unnamed(self.f.fileno(), self.tmp)
                self.unnamed = False  # (named now: a failure from here removes it)
            self.f.close()
            os.replace(self.tmp, self.out)
        except OSError as exc:
            self.discard()
            raise output_failed(self.out, exc, "the file") from None

    def discard(self) -> None:
        if self.f is not None:
            try:
                self.f.close()
            except OSError:  # the buffered rest could not be written either: the file goes anyway
                pass
        if not self.unnamed:
            self.tmp.unlink(missing_ok=True)


def _link_unnamed(fd: int, path: Path) -> None:
    """Give the ``O_TMPFILE`` file open at ``fd`` the name ``path`` (linkat through
    ``/proc/self/fd`` following the link, as open(2) describes: os.link calls link(2), which
    would link the /proc entry itself, EXDEV, unless given a directory descriptor)."""
    fds = os.open("/proc/self/fd", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.link(str(fd), path, src_dir_fd=fds, follow_symlinks=True)
    finally:
        os.close(fds)


PARTIAL = ".privifs-partial"


def partial_path(out: Path, suffix: str = PARTIAL) -> Path:
    """Where the unverified download goes, beside ``out``: ``.NAME.privifs-partial`` (or another
    ``suffix``). A name too long for that (the vault holds names of up to 255 bytes, and 'get'
    failed on any of more than 238 with "File name too long") keeps its start and a mark of the
    whole name instead, so it is still one fixed name per output (a partial file a killed get
    left is found and replaced)."""
    name = f".{out.name}{suffix}"
    encoded = os.fsencode(out.name)
    if len(os.fsencode(name)) > NAME_MAX:
        mark = hashlib.sha256(encoded).hexdigest()[:8]
        room = NAME_MAX - len(os.fsencode(f".~{mark}{suffix}"))
        name = f".{os.fsdecode(encoded[:room])}~{mark}{suffix}"
    return out.with_name(name)


def _replaced_mode(out: Path) -> int:
    """The mode of the file ``get`` writes: that of the regular file it replaces (as ``cp`` keeps
    it: a private file stays private), or the default for a new file."""
    try:
        st = os.lstat(out)
    except OSError:
        st = None
    if st is not None and stat.S_ISREG(st.st_mode):
        return stat.S_IMODE(st.st_mode)
    return 0o644 & ~_umask()


def own_file(out: Path, cfg) -> str | None:
    """What ``out`` is, if it is one of privifs' own files: the configuration, a secret beside
    it or configured, or anything in the embedded engine's data or privifs' state (the index and
    staged changes); None otherwise."""
    named = [(cfg.path, "privifs' configuration")]
    for attr, name in SECRET_NAMES.items():
        named.append((getattr(cfg, attr, None), f"privifs' {name} secret"))
        named.append((cfg.path.parent / name, f"privifs' {name} secret"))
    where = Path(os.path.realpath(out.parent)) / out.name
    for path, what in named:
        if path is None:
            continue
        # by place as well: a secret this account has not made yet (an identity key, OAuth
        # tokens) was written there, mode 0644, and a later init took it for that secret
        if where == Path(os.path.realpath(path.parent)) / path.name:
            return what
        try:
            if os.path.samefile(out, path):
                return what
        except OSError:  # one of them does not exist: nothing to overwrite
            continue
    for base, what in (
        (paths.embedded_engine_dir(), "in the embedded engine's data"),
        (paths.state_dir(), "in privifs' state (the index and staged changes)"),
    ):
        if where.is_relative_to(os.path.realpath(base)):
            return what
    return None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def output_path(out: Path, name: str | None, extension: str | None = None) -> Path:
    """Where ``token get`` writes: ``out``, or ``out/name`` when ``out`` is a directory; its
    directory must exist (checked before anything is downloaded). The name is the token's, which
    any client of the vault (or the server) chose: it is made a single entry of ``out`` as the
    mount shows it (its extension appended when the name lacks it, ``README`` + ``md`` is
    ``README.md``; ``/`` becomes ``∕``; ``.`` and ``..`` become ``unnamed.``, ``unnamed..``), so
    it never reaches outside ``out``."""
    if out.is_dir():
        if not name:
            raise LocalFileError(f"{out} is a directory and the token has no file name; name the output file")
        out = out / shown_name(name, extension)
        if out.is_dir():
            raise LocalFileError(f"{out} is a directory")
    try:
        kind = os.lstat(out).st_mode
    except FileNotFoundError:
        kind = None
    except OSError as exc:
        raise LocalFileError(f"cannot write {out}: {exc.strerror}") from None
    if kind is not None and not (stat.S_ISREG(kind) or stat.S_ISLNK(kind)):
        # the file is renamed into place: it would replace a device node, FIFO or socket
        raise LocalFileError(f"{out} is not a regular file (a device, FIFO or socket); name a file to write")
    parent = out.parent
    if not parent.is_dir():
        raise LocalFileError(f"cannot write {out}: the directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise LocalFileError(f"cannot write {out}: permission denied on {parent}")
    return out


async def _get(args, client, vault) -> int:
    info = await _find(client, args.token)
    shape = attributes(info)
    if shape.kind not in (KIND_FILE, KIND_SYMLINK):
        raise NoContent(
            f"{args.token} is a {KIND_NAMES.get(shape.kind, shape.kind)} in a mount (privifs.type={shape.kind}):"
            " it holds no content to get; nothing was written"
        )
    out = output_path(args.out, info.file_name, info.extension)
    what = own_file(out, args.cfg)
    if what is not None:
        raise LocalFileError(
            f"{out} is {what}; 'token get' never overwrites privifs' own configuration, secrets or data: "
            "name another file"
        )
    if shape.kind == KIND_SYMLINK:
        _make_symlink(out, shape.target or "")
        return 0
    progress = Progress(f"get {info.file_name or args.token}", info.size or 0)
    sink = None
    try:
        with single_error():
            async with trio.open_nursery() as nursery:
                sink = FileSink(out, progress, nursery)
                if is_manifest(info):
                    await sink.reset()
                    manifest = await args.parts.manifest(args.token, info.risk)
                    await args.parts.copy(manifest, sink.write)
                else:
                    check = digest.check_for(vault.derive(digest.content_key), info.risk)
                    await get_checked(vault, args.token, sink, check, size=info.size)
                    await sink.finish()
                    manifest = fmt.unmarked(sink.total, info.size, sink.written)
                    if manifest is not None:  # a manifest whose mark another application's risk meta replaced
                        await sink.reset()
                        await args.parts.copy(manifest, sink.write)
                await sink.finish()
        sink.commit()
    except BaseException:
        if sink is not None:
            sink.discard()
        raise
    finally:
        progress.close()
    return 0


class NoContent(PrivifsError):
    """The token is an entry of a mount that holds no content (a directory, FIFO, device…)."""


KIND_NAMES = {KIND_DIR: "directory", "fifo": "FIFO", "socket": "socket", "chardev": "device", "blockdev": "device"}


def _make_symlink(out: Path, target: str) -> None:
    """A symbolic link token is got as the link it is in a mount (its target is its meta's
    ``privifs.target``), put in place of ``out`` as a file would be."""
    tmp = partial_path(out, f".privifs-{secrets.token_hex(6)}")  # (cut to fit, as the partial file's name)
    try:
        os.symlink(target, tmp)
        os.replace(tmp, out)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise LocalFileError(f"cannot write {out}: {exc.strerror}") from None


async def _rm(args, client, vault) -> int:
    info = await _find(client, args.token)
    if is_manifest(info):  # its parts go after it; a manifest that cannot be read leaves them to collection
        try:
            manifest = await args.parts.manifest(args.token, info.risk)
        except PrivifsError:
            manifest = None
        await args.parts.delete(args.token, manifest)
        return 0
    await client.tokens.delete(args.token)
    return 0


async def _mv(args, client, vault) -> int:
    await _find(client, args.token)
    await client.tokens.update(args.token, file_name=args.name, extension=split_name(args.name), context=args.context)
    return 0


async def _stat(args, client, vault) -> int:
    info = await _find(client, args.token)
    print(
        json.dumps(
            _shown(info),
            indent=2,
        )
    )
    return 0

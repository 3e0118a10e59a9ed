"""``privifs token …``: work on data tokens directly, without a mount — for scripts, debugging
and recovery. ``put`` and ``get`` stream (bounded memory) and show progress on a terminal."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import trio

from privifs.account import open_account
from privifs.client.connect import connect
from privifs.client.datatokens import FileMeta
from privifs.client.sinks import BlockWriter
from privifs.config import load
from privifs.errors import NotFoundError, PrivifsError, single_error

PIECE = 1024 * 1024
PROGRESS_MIN = 8 * 1024 * 1024


def register(sub) -> None:
    p = sub.add_parser("token", help="list, store, fetch, rename and delete data tokens directly")
    tsub = p.add_subparsers(dest="token_command", required=True, metavar="ACTION")
    ls = tsub.add_parser("ls", help="list every token")
    ls.add_argument("--json", action="store_true", help="one JSON object per line")
    ls.set_defaults(func=run, action=_ls)
    put = tsub.add_parser("put", help="encrypt and store a file; prints the permanent token")
    put.add_argument("file", type=Path)
    put.add_argument("--name", help="file name to record (default: the file's name)")
    put.add_argument("--context", default="/", help="context (directory) to record (default /)")
    put.set_defaults(func=run, action=_put)
    get = tsub.add_parser("get", help="fetch, verify and decrypt a token into a file")
    get.add_argument("token")
    get.add_argument("out", type=Path)
    get.set_defaults(func=run, action=_get)
    rm = tsub.add_parser("rm", help="delete a token")
    rm.add_argument("token")
    rm.set_defaults(func=run, action=_rm)
    mv = tsub.add_parser("mv", help="rename a token or move it to another context")
    mv.add_argument("token")
    mv.add_argument("--name", required=True)
    mv.add_argument("--context")
    mv.set_defaults(func=run, action=_mv)
    st = tsub.add_parser("stat", help="show a token's meta as JSON")
    st.add_argument("token")
    st.set_defaults(func=run, action=_stat)


def run(args: argparse.Namespace) -> int:
    cfg = load(args.config)
    with open_account(cfg) as account:
        async def main() -> int:
            async with connect(account.endpoints, account.credentials) as client:
                return await args.action(args, client, client.vault(account.key)) or 0

        return trio.run(main)


class Progress:
    """A rich progress bar on a terminal for large transfers; silent otherwise."""

    def __init__(self, label: str, total: int):
        self.bar = None
        if total >= PROGRESS_MIN and sys.stderr.isatty():
            from rich.progress import (BarColumn, DownloadColumn, Progress as RichProgress, TextColumn,
                                       TransferSpeedColumn)
            self.bar = RichProgress(TextColumn(label), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                                    transient=True)
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


async def _ls(args, client, vault) -> int:
    async for info in client.tokens.list():
        if args.json:
            print(json.dumps({"token": info.token, "context": info.context, "fileName": info.file_name,
                              "extension": info.extension, "size": info.size, "path": info.path,
                              "createdAt": info.created_at, "risk": info.risk}))
        else:
            created = time.strftime("%Y-%m-%d %H:%M", time.localtime(info.created_at)) if info.created_at else "-"
            size = "-" if info.size is None else str(info.size)
            print(f"{info.token}  {size:>12}  {created}  {info.context.rstrip('/')}/{info.file_name}")
    return 0


async def _put(args, client, vault) -> int:
    path: Path = args.file
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise PrivifsError(f"cannot read {path}: {exc.strerror}") from None
    name = args.name or path.name
    progress = Progress(f"put {name}", size)

    async def source() -> AsyncIterator[bytes]:
        progress.reset()
        with open(path, "rb") as f:
            while True:
                chunk = await trio.to_thread.run_sync(f.read, PIECE)
                if not chunk:
                    return
                progress.advance(len(chunk))
                yield chunk

    context = args.context
    meta = FileMeta(name, split_name(name), context, size, context.rstrip("/") + "/" + name)
    try:
        token = await vault.put_stream(source, size, meta)
    finally:
        progress.close()
    print(token)
    return 0


async def _find(client, token: str):
    resp = await client.transport.call("GET", "/data-token/list-data-tokens",
                                       params={"filters[token]": token, "perPage": "1"}, idempotent=True)
    from privifs.client import shapes
    items, _ = shapes.listing(shapes.json_or_text(resp))
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
    download goes on); renamed into place only after the tag verified, removed otherwise."""

    def __init__(self, out: Path, progress: Progress, nursery: trio.Nursery):
        super().__init__(nursery)
        self.out = out
        self.tmp = out.with_name(f".{out.name}.privifs-partial")
        self.progress = progress
        self.f = None

    def _restart(self) -> None:
        if self.f is not None:
            self.f.close()
        fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        self.f = os.fdopen(fd, "wb")
        self.progress.reset()

    def _write_block(self, offset: int, data: bytes) -> None:
        self.f.write(data)

    async def write(self, data: bytes) -> None:
        await super().write(data)
        self.progress.advance(len(data))

    def commit(self) -> None:
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        os.chmod(self.tmp, 0o644 & ~_umask())
        os.replace(self.tmp, self.out)

    def discard(self) -> None:
        if self.f is not None:
            self.f.close()
        self.tmp.unlink(missing_ok=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


async def _get(args, client, vault) -> int:
    info = await _find(client, args.token)
    progress = Progress(f"get {info.file_name or args.token}", info.size or 0)
    sink = None
    try:
        with single_error():
            async with trio.open_nursery() as nursery:
                sink = FileSink(args.out, progress, nursery)
                await vault.get(args.token, sink, size=info.size)
                await sink.finish()
        sink.commit()
    except BaseException:
        if sink is not None:
            sink.discard()
        raise
    finally:
        progress.close()
    return 0


async def _rm(args, client, vault) -> int:
    await _find(client, args.token)
    await client.tokens.delete(args.token)
    return 0


async def _mv(args, client, vault) -> int:
    await _find(client, args.token)
    await client.tokens.update(args.token, file_name=args.name, extension=split_name(args.name),
                               context=args.context)
    return 0


async def _stat(args, client, vault) -> int:
    info = await _find(client, args.token)
    print(json.dumps({"token": info.token, "context": info.context, "fileName": info.file_name,
                      "extension": info.extension, "size": info.size, "path": info.path,
                      "createdAt": info.created_at, "risk": info.risk}, indent=2))
    return 0

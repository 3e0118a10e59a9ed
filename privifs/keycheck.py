"""The vault's key check: proof that the configured AES key is the key a vault was written with.

A vault holds one small *key-check token* in the reserved context (``/.privifs/keycheck``): a
known magic line and random bytes, encrypted with the vault's key. Decrypting it proves the key;
an authentication failure proves the key is wrong before anything is written with it. A vault
without a key check gets one, unless its own files show the key is wrong. ``mount``, ``init``
and every ``token`` command go through here, so no command can write with a foreign key.

A key-check token that fails authentication is either the wrong key or a damaged token; the
vault's own small files tell the two apart (an AES-GCM tag that verifies proves the key). A
damaged key check is logged and the key proven by the files is accepted: the vault stays usable,
and the key check is never written over.
"""

from __future__ import annotations

import logging
import secrets

from privifs.client.datatokens import FileMeta
from privifs.client.shapes import TokenInfo
from privifs.client.vault import Vault
from privifs.errors import IntegrityError, WrongKeyError
from privifs.fs.tokenmeta import KEYCHECK_NAME, RESERVED_CONTEXT, same_context

KEYCHECK_MAGIC = b"privifs key check v1\n"
KEYCHECK_PATH = f"{RESERVED_CONTEXT}/{KEYCHECK_NAME}"  # where the key check shows (verify names it)
TRIED_FILES = 3  # the vault's own small files decrypted when the key check cannot tell

log = logging.getLogger("privifs.keycheck")


def key_checks(infos: list[TokenInfo]) -> list[TokenInfo]:
    return [i for i in infos if same_context(i.context, RESERVED_CONTEXT) and i.file_name == KEYCHECK_NAME]


def naming_check(infos: list[TokenInfo]) -> TokenInfo | None:
    """The key check that names the vault: two clients that found none at once made two, and
    the first made counts."""
    return min(key_checks(infos), key=lambda i: (i.created_at or 0.0, i.token), default=None)


async def _decrypts_files(vault: Vault, infos: list[TokenInfo]) -> bool | None:
    """Whether the key decrypts any of up to :data:`TRIED_FILES` of the vault's own small files
    (``infos``: its listing); None when it has none to try."""
    ours = [i for i in infos if "privifs.type" in i.risk and (i.size or 0) <= 65536 and not key_checks([i])]
    ours = sorted(ours, key=lambda i: i.size or 0)[:TRIED_FILES]
    if not ours:
        return None
    for info in ours:
        try:
            await vault.get_bytes(info.token)
        except IntegrityError:
            continue
        return True
    return False


async def prove_key(vault: Vault, check: TokenInfo, infos: list[TokenInfo]) -> bool:
    """Fail with WrongKeyError unless the AES key decrypts this vault: True when the key-check
    token ``check`` proves it, False when that token is damaged and the vault's own files
    (``infos``: its listing) prove the key instead."""
    try:
        data = await vault.get_bytes(check.token)
    except IntegrityError:
        if await _decrypts_files(vault, infos):
            log.warning(
                "the vault's key-check token %s fails authentication although this key decrypts the "
                "vault's files: that token is damaged (it is kept as it is); the files prove the key",
                check.token,
            )
            return False
        raise WrongKeyError(
            "the configured AES key does not decrypt this vault (its key-check token "
            "fails authentication); use the key this vault was created with"
        ) from None
    if not data.startswith(KEYCHECK_MAGIC):
        raise WrongKeyError("this vault's key-check token holds unexpected content")
    return True


async def check_key(vault: Vault, infos: list[TokenInfo]) -> str:
    """Fail with WrongKeyError unless the AES key decrypts this vault (``infos``: its whole
    listing); create the key check when the vault has none. Returns the key-check token (it
    names the vault: see :mod:`privifs.fs.connector`)."""
    first = naming_check(infos)
    if first is not None:
        await prove_key(vault, first, infos)
        return first.token
    if await _decrypts_files(vault, infos) is False:
        raise WrongKeyError(
            "the configured AES key decrypts none of this vault's files; use the key this vault was created with"
        )
    return await vault.put_bytes(
        KEYCHECK_MAGIC + secrets.token_bytes(32),
        FileMeta(KEYCHECK_NAME, "", RESERVED_CONTEXT, 0, KEYCHECK_PATH),
    )


async def verify_key(client, vault: Vault) -> None:
    """:func:`check_key` for a command without the listing at hand: the reserved context first
    (one short request), the whole listing only when the vault has no key check yet."""
    checks = key_checks([i async for i in client.tokens.list(context=RESERVED_CONTEXT)])
    if checks:
        try:
            await prove_key(vault, checks[0], [])
            return
        except WrongKeyError:  # the wrong key, or a damaged key check: the files tell
            pass
    await check_key(vault, [i async for i in client.tokens.list()])

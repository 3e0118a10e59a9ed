"""The vault's key check: proof that the configured AES key is the key a vault was written with.

A vault holds one small *key-check token* in the reserved context (``/.privifs/keycheck``): a
known magic line and random bytes, encrypted with the vault's key. Decrypting it proves the key;
an authentication failure proves the key is wrong before anything is written with it. A vault
without a key check gets one, unless its own files show the key is wrong. ``mount``, ``init``
and every ``token`` command go through here, so no command can write with a foreign key.
"""

from __future__ import annotations

import secrets

from privifs.client.datatokens import FileMeta
from privifs.client.shapes import TokenInfo
from privifs.client.vault import Vault
from privifs.errors import IntegrityError, WrongKeyError
from privifs.fs.tokenmeta import KEYCHECK_NAME, RESERVED_CONTEXT, same_context

KEYCHECK_MAGIC = b"privifs key check v1\n"


def key_checks(infos: list[TokenInfo]) -> list[TokenInfo]:
    return [i for i in infos if same_context(i.context, RESERVED_CONTEXT) and i.file_name == KEYCHECK_NAME]


async def _verify_check(vault: Vault, check: TokenInfo) -> None:
    try:
        data = await vault.get_bytes(check.token)
    except IntegrityError:
        raise WrongKeyError(
            "the configured AES key does not decrypt this vault (its key-check token "
            "fails authentication); use the key this vault was created with"
        ) from None
    if not data.startswith(KEYCHECK_MAGIC):
        raise WrongKeyError("this vault's key-check token holds unexpected content")


async def check_key(vault: Vault, infos: list[TokenInfo]) -> str:
    """Fail with WrongKeyError unless the AES key decrypts this vault (``infos``: its whole
    listing); create the key check when the vault has none. Returns the key-check token (it
    names the vault: see :mod:`privifs.fs.connector`)."""
    checks = key_checks(infos)
    if checks:  # (two clients that found none at once made two: the first made names the vault)
        first = min(checks, key=lambda i: (i.created_at or 0.0, i.token))
        await _verify_check(vault, first)
        return first.token
    ours = sorted((i for i in infos if "privifs.type" in i.risk and (i.size or 0) <= 65536), key=lambda i: i.size or 0)[
        :3
    ]
    if ours:
        failures = 0
        for info in ours:
            try:
                await vault.get_bytes(info.token)
            except IntegrityError:
                failures += 1
        if failures == len(ours):
            raise WrongKeyError(
                "the configured AES key decrypts none of this vault's files; use the key this vault was created with"
            )
    return await vault.put_bytes(
        KEYCHECK_MAGIC + secrets.token_bytes(32),
        FileMeta(KEYCHECK_NAME, "", RESERVED_CONTEXT, 0, f"{RESERVED_CONTEXT}/{KEYCHECK_NAME}"),
    )


async def verify_key(client, vault: Vault) -> None:
    """:func:`check_key` for a command without the listing at hand: the reserved context first
    (one short request), the whole listing only when the vault has no key check yet."""
    checks = key_checks([i async for i in client.tokens.list(context=RESERVED_CONTEXT)])
    if checks:
        await _verify_check(vault, checks[0])
        return
    await check_key(vault, [i async for i in client.tokens.list()])

"""The four Privicore base URLs: complete them from what a user knows, and check them.

A user usually knows the API URL (and the WebSocket URL) from the service's documentation. The
reference (section 0) documents the other servers as separate ports of the same host: the
WebSocket proxy on 8083, the upstream stream server on 8010, the downstream download server on
8011. :func:`complete` fills in any URL that is not configured from the API URL's host and
scheme and those ports; a full upstream URL the server gives in a temporary token's ``stream``
field is still used as is (see :func:`privifs.client.shapes.upstream_url`).

:func:`validate_urls` checks all four before a configuration is written (``privifs init``):
the right scheme, a host, and something answering there.
"""

from __future__ import annotations

import logging
from urllib.parse import SplitResult, urlsplit

import httpx
import trio
from trio_websocket import HandshakeError, open_websocket_url

from privifs.client.tls import shared_tls_context
from privifs.errors import ConfigError

log = logging.getLogger("privifs.client")

DOCUMENTED_PORTS = {"ws": 8083, "upstream": 8010, "downstream": 8011}
SCHEMES = {
    "api": ("http", "https"),
    "ws": ("ws", "wss"),
    "upstream": ("http", "https"),
    "downstream": ("http", "https"),
}
SETTING = {
    "api": "PRIVICORE_API_URL",
    "ws": "PRIVICORE_WS_URL",
    "upstream": "PRIVICORE_UPSTREAM_URL",
    "downstream": "PRIVICORE_DOWNSTREAM_URL",
}
CHECK_TIMEOUT = 8.0


def _split(url: str) -> SplitResult | None:
    """``url``'s parts, or None when it cannot be parsed (``http://[::1``: an unclosed IPv6 host)."""
    try:
        return urlsplit(url)
    except ValueError:
        return None


def derived(api: str, name: str) -> str | None:
    """The documented URL of server ``name`` on the API URL's host, or None if the API URL has none."""
    parts = _split(api)
    if parts is None or parts.scheme not in SCHEMES["api"] or not parts.hostname:
        return None
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    secure = parts.scheme == "https"
    scheme = ("wss" if secure else "ws") if name == "ws" else ("https" if secure else "http")
    return f"{scheme}://{host}:{DOCUMENTED_PORTS[name]}"


def complete(urls: dict[str, str | None]) -> dict[str, str | None]:
    """``urls`` with the WebSocket, upstream and downstream URLs derived from the API URL where
    they are not given."""
    out = {name: (urls.get(name) or None) for name in SCHEMES}
    if out["api"]:
        out["api"] = out["api"].rstrip("/")
        for name in DOCUMENTED_PORTS:
            if not out[name]:
                out[name] = derived(out["api"], name)
                if out[name]:
                    log.info("no %s URL configured: using %s (the API host and the documented port)", name, out[name])
    return out


def scheme_problems(urls: dict[str, str | None]) -> list[str]:
    problems = []
    for name, schemes in SCHEMES.items():
        url = urls.get(name)
        if not url:
            problems.append(f"no {name} URL: set {SETTING[name]}")
            continue
        parts = _split(url)
        if parts is None:
            problems.append(f"{SETTING[name]}={url!r} is not a valid URL")
        elif parts.scheme not in schemes:
            problems.append(f"{SETTING[name]}={url!r} must start with {' or '.join(s + '://' for s in schemes)}")
        elif not parts.hostname:
            problems.append(f"{SETTING[name]}={url!r} names no host")
    return problems


async def _reachable_http(http: httpx.AsyncClient, name: str, url: str) -> str | None:
    try:
        await http.get(url.rstrip("/") + ("/health" if name == "api" else "/"))
    except httpx.InvalidURL as exc:
        return f"{SETTING[name]}={url!r} is not a valid URL ({exc})"
    except httpx.HTTPError as exc:
        return f"nothing answers at the {name} URL {url} ({SETTING[name]}): {type(exc).__name__}: {exc}"
    return None  # any HTTP answer will do: the stream servers answer bare requests with 4xx


async def _reachable_ws(url: str) -> str | None:
    try:
        with trio.fail_after(CHECK_TIMEOUT):
            async with open_websocket_url(url):
                pass
    except HandshakeError as exc:
        cause = exc.__cause__ or exc
        return f"no WebSocket server answers at {url} ({SETTING['ws']}): {type(cause).__name__}: {cause}"
    except (OSError, trio.TooSlowError) as exc:
        return f"no WebSocket server answers at {url} ({SETTING['ws']}): {type(exc).__name__}: {exc}"
    return None


async def validate_urls(urls: dict[str, str | None]) -> dict[str, str]:
    """Complete ``urls`` (see :func:`complete`) and check each: right scheme, a host, something
    answering. Returns the four URLs; raises :class:`ConfigError` naming every problem."""
    full = complete(urls)
    problems = scheme_problems(full)
    if not problems:
        found: list[str | None] = []

        async def check(coro) -> None:
            found.append(await coro)

        async with httpx.AsyncClient(timeout=CHECK_TIMEOUT, verify=shared_tls_context()) as http:
            async with trio.open_nursery() as nursery:
                for name in ("api", "upstream", "downstream"):
                    nursery.start_soon(check, _reachable_http(http, name, full[name]))
                nursery.start_soon(check, _reachable_ws(full["ws"]))
        problems = [p for p in found if p]
    if problems:
        raise ConfigError("the server URLs do not work:\n  " + "\n  ".join(problems))
    return {name: str(full[name]) for name in SCHEMES}

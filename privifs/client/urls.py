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
from privifs.errors import ConfigError, ServerUnreachable

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


# (what is wrong; if only that nothing could be reached: SETTING=url, and why) or None
Problem = tuple[str, tuple[str, str] | None] | None


async def _reachable_http(http: httpx.AsyncClient, name: str, url: str) -> Problem:
    try:
        await http.get(url.rstrip("/") + ("/health" if name == "api" else "/"))
    except httpx.InvalidURL as exc:
        return f"{SETTING[name]}={url!r} is not a valid URL ({exc})", None
    except httpx.HTTPError as exc:
        why = f"{type(exc).__name__}: {exc}"
        unreachable = isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout, httpx.NetworkError))
        return f"nothing answers at the {name} URL {url} ({SETTING[name]}): {why}", (
            (f"{SETTING[name]}={url}", why) if unreachable else None
        )
    return None  # any HTTP answer will do: the stream servers answer bare requests with 4xx


async def _reachable_ws(url: str) -> Problem:
    try:
        with trio.fail_after(CHECK_TIMEOUT):
            async with open_websocket_url(url):
                pass
    except HandshakeError as exc:  # nothing to connect to, or something answered but not as a WebSocket server
        cause = exc.__cause__ or exc
        why = f"{type(cause).__name__}: {cause}"
        unreachable = isinstance(cause, OSError)
        return f"no WebSocket server answers at {url} ({SETTING['ws']}): {why}", (
            (f"{SETTING['ws']}={url}", why) if unreachable else None
        )
    except (OSError, trio.TooSlowError) as exc:
        why = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        return f"no WebSocket server answers at {url} ({SETTING['ws']}): {why}", (f"{SETTING['ws']}={url}", why)
    return None


async def validate_urls(urls: dict[str, str | None]) -> dict[str, str]:
    """Complete ``urls`` (see :func:`complete`) and check each: right scheme, a host, something
    answering. Returns the four URLs; raises :class:`ConfigError` naming every problem, or
    :class:`ServerUnreachable` (exit 5, as every other command) when the only problem is that
    nothing can be reached at some of them (init exited 3 for a server that was down)."""
    full = complete(urls)
    problems = scheme_problems(full)
    if not problems:
        found: dict[str, Problem] = {}

        async def check(name: str, coro) -> None:
            found[name] = await coro

        async with httpx.AsyncClient(timeout=CHECK_TIMEOUT, verify=shared_tls_context()) as http:
            async with trio.open_nursery() as nursery:
                for name in ("api", "upstream", "downstream"):
                    nursery.start_soon(check, name, _reachable_http(http, name, full[name]))
                nursery.start_soon(check, "ws", _reachable_ws(full["ws"]))
        failed = [p for p in (found.get(name) for name in SCHEMES) if p]
        problems = [text for text, _ in failed]
        unreachable = [where for _, where in failed if where is not None]
        if failed and len(unreachable) == len(failed):
            raise ServerUnreachable(
                f"cannot reach the Privicore server: nothing answers at {', '.join(w for w, _ in unreachable)} "
                f"({unreachable[0][1]}); check the URLs and that the server is running"
            )
    if problems:
        raise ConfigError("the server URLs do not work:\n  " + "\n  ".join(problems))
    return {name: str(full[name]) for name in SCHEMES}

"""Engine options: lifetimes, limits, fault injection and the alternative wire shapes.

Every option can be given at start (``privifs engine --set NAME=VALUE``) and changed while the
engine runs through the admin endpoint (``POST /_engine/options``, see docs/engine.md). Defaults
follow the reference's primary shapes; each alternative recorded in its section 9 is a value
here so clients can be checked against all of them.
"""

from __future__ import annotations

import dataclasses
import math
import random
from dataclasses import dataclass, field
from typing import Any

SHAPES: dict[str, tuple[str, ...]] = {
    # how a 202 carries its command id: {"commandId":…}, a bare JSON string, a one-element array
    "command_id_shape": ("object", "string", "array"),
    # retrieve-temporary-data-token's `stream`: "auth=…" (API) or a full upstream URL (guides)
    "stream_shape": ("auth", "url"),
    # retrieve-temporary-data-token body: the API object, the guide object, or a bare token string
    "temporary_token_shape": ("api", "guide", "string"),
    # configure-file-meta answer: {"token": …} or a bare JSON string
    "file_meta_shape": ("object", "string"),
    # OAuth token answers: API (token/type/expiresAt/…) or guide (accessToken/tokenType/expiresIn)
    "oauth_shape": ("api", "guide"),
    # POST/GET /request-status answer: "succeeded" or ["succeeded"]
    "status_shape": ("string", "array"),
    # X-DPT-CAB-REQUEST-ID: output_type/body in data (flat) or data.body = {body, output_type}
    "request_data_layout": ("flat", "nested"),
    # reauthorize: 200 with a new token, or 202 + command id extending the current token
    "reauthorize_mode": ("sync", "async"),
    # authenticate before a public key is registered: 401 (guides) or allowed (live probe)
    "unkeyed_auth": ("deny", "allow"),
    # OAuth register / request-authorization-code: 202 with the command id in the body (live
    # probe) or 202 with no body and the id only in the x-dpt-cab-id header (API docs)
    "oauth_accept_shape": ("body", "empty"),
    # reservation ttl unit: minutes (API) or seconds (guides)
    "ttl_unit": ("minutes", "seconds"),
    # retrieve-unique-identifier: {"deviceIdentifier"} (live), a bare string, or {"deviceId"} (guides)
    "device_id_shape": ("identifier", "string", "guide"),
    # a listing's meta.count: the tokens matching (total) or the page's items (page; undocumented which)
    "listing_count": ("total", "page"),
}

COMMAND_KINDS = (
    "register-profile",
    "change-password",
    "reauthorize-authorization-token",
    "register-public-key",
    "reserve-token-space",
    "exchange-data-for-token",
    "update-data-token",
    "configure-information-security-risk-meta",
    "delete-data",
    "request-data",
    "oauth-application-register",
    "oauth-application-request-authorization-code",
    "request-unique-identifier",
    "approve-device",
    "reject-device",
    "configure-device-meta",
    "remove-device",
    "register-storage-device",
    "remove-storage-device",
    "register-authenticator",
    "register-voting-configuration",
    "register-policy",
    "activate-policy",
    "deactivate-policy",
)


@dataclass
class EngineOptions:
    # lifetimes and limits
    token_ttl: float = 4 * 3600.0
    max_reauthorize_ttl: int = 30 * 24 * 3600
    oauth_token_ttl: float = 3600.0
    oauth_refresh_ttl: float = 30 * 24 * 3600.0
    downstream_ttl: float = 300.0
    ttl_default: int = 5
    ttl_max: int = 60
    inline_limit: int = 64 * 1024
    inline_threshold: int = 48 * 1024
    per_page_default: int = 25
    per_page_max: int = 1000
    risk_max_fields: int = 64
    risk_max_value: int = 8192
    body_timeout: float = 60.0  # an upstream or downstream request body stalled this long ends; 0: never
    # request bytes the API's bodies still being read may hold at once (all connections); past it
    # the body whose piece went over is answered 503 (Retry-After: 1) and its bytes let go; 0: no limit
    body_budget: int = 64 * 1024 * 1024
    # uploads the upstream port takes at once (each holds a 1 MiB buffer and what its client sent);
    # one more is answered 503 (Retry-After: 1) before its stream authorization is used; 0: no limit
    max_uploads: int = 128
    # downloads the downstream port serves at once (each holds up to a 4 MiB piece of its blob until
    # its client takes it); one more is answered 503 (Retry-After: 1) before its authorization is
    # used; 0: no limit
    max_downloads: int = 64
    # a write to a client (any port) that makes no progress this long (the client does not read)
    # closes its connection; 0: never
    send_timeout: float = 60.0
    # register-profile only from programs of the engine's own user (or root) on this machine: the
    # embedded engine's loopback ports are seen by every local user, who could register a profile
    # of their own and store data in the engine owner's home (helper hAO F3). Using a profile
    # that exists (another user's configuration given its account, a tunnel) is not affected.
    owner_registers_only: bool = False
    # faults
    latency_ms: float = 0.0
    fail_rate: float = 0.0
    fail_context: str = ""  # an inline exchange into a reservation of this context answers 500, always
    fail_after_rate: float = 0.0
    ack_drop_rate: float = 0.0
    ack_delay_ms: float = 0.0
    apply_delay_ms: float = 0.0
    stream_bytes_per_second: float = 0.0  # bytes per second for each upload and download; 0: unlimited
    ws_drop_rate: float = 0.0
    emit_started: bool = False
    reject: frozenset[str] = frozenset()
    reject_reason: str = "policy.rejected"
    seed: int | None = None
    # wire shapes
    command_id_shape: str = "object"
    command_id_shapes: dict[str, str] = field(default_factory=dict)
    stream_shape: str = "auth"
    temporary_token_shape: str = "api"
    file_meta_shape: str = "object"
    oauth_shape: str = "api"
    status_shape: str = "string"
    request_data_layout: str = "flat"
    reauthorize_mode: str = "sync"
    unkeyed_auth: str = "allow"
    oauth_accept_shape: str = "body"
    ttl_unit: str = "minutes"
    device_id_shape: str = "identifier"
    listing_count: str = "total"

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)

    def shape_for(self, kind: str) -> str:
        return self.command_id_shapes.get(kind, self.command_id_shape)

    def chance(self, rate: float) -> bool:
        return rate > 0 and self.rng.random() < rate

    def as_dict(self) -> dict[str, Any]:
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[f.name] = sorted(v) if isinstance(v, frozenset) else v
        return out

    def update(self, values: dict[str, Any]) -> None:
        """Apply ``values`` (names as in :meth:`as_dict`, or ``command_id_shape.KIND``); validates all first."""
        staged: dict[str, Any] = {}
        kinds = dict(self.command_id_shapes)
        for name, raw in values.items():
            if name.startswith("command_id_shape."):
                kind = name.split(".", 1)[1]
                if kind not in COMMAND_KINDS:
                    raise ValueError(f"unknown command kind {kind!r}")
                shape = str(raw)
                if shape not in SHAPES["command_id_shape"]:
                    raise ValueError(f"{name} must be one of {', '.join(SHAPES['command_id_shape'])}")
                kinds[kind] = shape
                continue
            staged[name] = _coerce(self, name, raw)
        for name, value in staged.items():
            setattr(self, name, value)
        self.command_id_shapes = kinds
        if "seed" in staged:
            self.rng = random.Random(self.seed)


def _coerce(opts: EngineOptions, name: str, raw: Any) -> Any:
    fields = {f.name: f for f in dataclasses.fields(opts)}
    if name not in fields or name == "command_id_shapes":
        raise ValueError(f"unknown engine option {name!r}")
    current = getattr(opts, name)
    if name in SHAPES:
        value = str(raw)
        if value not in SHAPES[name]:
            raise ValueError(f"{name} must be one of {', '.join(SHAPES[name])}")
        return value
    if name == "reject":
        items = raw if isinstance(raw, (list, tuple, set, frozenset)) else [s for s in str(raw).split(",") if s.strip()]
        kinds = frozenset(s.strip() for s in items)
        unknown = kinds - set(COMMAND_KINDS)
        if unknown:
            raise ValueError(f"reject: unknown command kinds {', '.join(sorted(unknown))}")
        return kinds
    if name == "seed":
        return None if raw in (None, "", "none") else int(raw)
    if isinstance(current, bool):
        if isinstance(raw, bool):
            return raw
        if str(raw).lower() in ("1", "true", "yes", "on"):
            return True
        if str(raw).lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{name} must be true or false")
    if isinstance(current, int):
        value = int(raw)
    elif isinstance(current, float):
        value = float(raw)
    else:
        value = str(raw)
    if isinstance(value, float) and not math.isfinite(value):
        # NaN or infinity: latency_ms=nan made every API answer a 500 (trio refuses a NaN
        # deadline) and the options themselves unreadable (JSON has no NaN), until a restart
        raise ValueError(f"{name} must be a finite number")
    if name.endswith("_rate") and not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be between 0 and 1")
    if isinstance(value, (int, float)) and value < 0:
        raise ValueError(f"{name} must not be negative")
    return value


def parse_settings(items: list[str]) -> dict[str, str]:
    """Parse ``NAME=VALUE`` strings from the command line."""
    out: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise ValueError(f"--set expects NAME=VALUE, got {item!r}")
        out[name.strip()] = value.strip()
    return out

"""Which browser origins may use the gateway: one policy for the REST API and the WebSocket.

Browsers send `Origin` so a server can refuse pages of other sites; CORS headers only decide what
such a page may *read*, not whether a simple cross-site POST runs, and WebSockets ignore CORS
entirely. So the gateway checks `Origin` itself. A request without one (curl, server-side SDKs)
is not a browser acting for another site and is let through; the API key guards those.

`ALLOWED_ORIGINS` empty (the default) means same origin only: the gateway's own origin, from the
request's scheme and Host (after uvicorn's proxy headers) and from `GATEWAY_PUBLIC_URL`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from common.settings import Settings

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
DEFAULT_PORTS = {"http": 80, "https": 443}
HTTP_SCHEME = {"ws": "http", "wss": "https", "http": "http", "https": "https"}


LOOPBACK_BINDS = frozenset({"127.0.0.1", "localhost", "::1"})
LOOPBACK_NAMES = ("localhost", "*.localhost", "127.0.0.1", "[::1]")  # IPv6 as Host writes it


def trusted_hosts(settings: Settings) -> list[str]:
    """The Host names to answer (for TrustedHostMiddleware).

    Same-origin checks compare `Origin` with `Host`, and a page whose own domain was re-pointed at
    127.0.0.1 (DNS rebinding) sends a matching pair. So a gateway listening on loopback answers
    loopback names only, unless `ALLOWED_HOSTS` says otherwise; one listening on every interface
    (behind a proxy, in compose) answers any name unless `ALLOWED_HOSTS` narrows it.
    """
    listed = [h.strip().lower() for h in settings.allowed_hosts.split(",") if h.strip()]
    if listed:
        hosts = listed
    elif settings.gateway_host in LOOPBACK_BINDS or settings.gateway_host.startswith("127."):
        hosts = [*LOOPBACK_NAMES, settings.gateway_host]
    else:
        return ["*"]
    public = urlsplit(settings.gateway_public_url).hostname if settings.gateway_public_url else None
    return sorted({*hosts, public} - {None})


def normalize(origin: str) -> str | None:
    """`scheme://host[:port]` as a browser serializes it (lower case, no default port); None if not one."""
    try:
        parts = urlsplit(origin.strip())
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    host = parts.hostname
    if scheme not in DEFAULT_PORTS or not host or parts.username or parts.password:
        return None
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        return None
    if ":" in host:
        host = f"[{host}]"  # IPv6
    return f"{scheme}://{host}" if port in (None, DEFAULT_PORTS[scheme]) else f"{scheme}://{host}:{port}"


@dataclass(frozen=True)
class OriginPolicy:
    allow_all: bool
    origins: frozenset[str]  # from ALLOWED_ORIGINS
    public: str | None  # from GATEWAY_PUBLIC_URL

    @classmethod
    def from_settings(cls, settings: Settings) -> OriginPolicy:
        return cls.build(settings.allowed_origins.split(","), settings.gateway_public_url)

    @classmethod
    def build(cls, entries: Iterable[str], public_url: str = "") -> OriginPolicy:
        """Refuses a malformed entry at start-up: a typo would otherwise never match, silently."""
        allow_all, origins = False, set()
        for entry in (e.strip() for e in entries):
            if not entry:
                continue
            if entry == "*":
                allow_all = True
                continue
            origin = normalize(entry)
            if origin is None:
                raise ValueError(f"ALLOWED_ORIGINS: {entry!r} is not an origin like https://app.example.com")
            origins.add(origin)
        public = normalize(_origin_of(public_url)) if public_url else None
        return cls(allow_all, frozenset(origins), public)

    def cors_origins(self) -> list[str]:
        """What CORSMiddleware allows: same-origin requests need no CORS headers."""
        return ["*"] if self.allow_all else sorted(self.origins)

    def allows(self, origin: str | None, scheme: str, host: str | None) -> bool:
        """No Origin: not a browser page of another site. Otherwise listed, or our own origin."""
        if origin is None or self.allow_all:
            return True
        seen = normalize(origin)
        if seen is None:  # "null" (sandboxed frames, file://) or garbage
            return False
        if seen in self.origins or seen == self.public:
            return True
        own = normalize(f"{HTTP_SCHEME.get(scheme, scheme)}://{host}") if host else None
        return seen == own

    def allows_scope(self, scope: Scope) -> bool:
        headers = Headers(scope=scope)
        return self.allows(headers.get("origin"), scope.get("scheme", "http"), headers.get("host"))


def _origin_of(url: str) -> str:
    parts = urlsplit(url.strip())
    return f"{HTTP_SCHEME.get(parts.scheme.lower(), parts.scheme)}://{parts.netloc}"


class OriginGuard:
    """403 for a state-changing request from a page of a disallowed origin (CORS cannot stop it)."""

    def __init__(self, app: ASGIApp, policy: OriginPolicy) -> None:
        self.app = app
        self.policy = policy

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] not in SAFE_METHODS and not self.policy.allows_scope(scope):
            response = JSONResponse(
                {"detail": "origin not allowed: this page's origin is not in the gateway's ALLOWED_ORIGINS"},
                status_code=403,
            )
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)

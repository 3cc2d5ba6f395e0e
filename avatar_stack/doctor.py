"""`avatar-stack doctor`: the settings as the services will resolve them (secrets masked), settings
that look misspelt, and whether Redis and every configured vendor can be reached from here.

A vendor counts as reachable when its server answers HTTP at all (any status): doctor sends no
API key and starts nothing that costs money. Exit 0 when every check passes, 1 otherwise.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import TextIO
from urllib.parse import urlsplit, urlunsplit

import httpx
import redis

from avatar_stack import __version__
from avatar_stack.config import mask_url, resolved, unknown_settings
from common.settings import Settings

TIMEOUT_S = 3.0


@dataclass
class Check:
    name: str
    target: str
    ok: bool
    detail: str


def http_of(url: str) -> str:
    """ws(s):// → http(s)://, path dropped: we only ask whether the server answers."""
    parts = urlsplit(url)
    scheme = {"ws": "http", "wss": "https"}.get(parts.scheme, parts.scheme)
    return urlunsplit((scheme, parts.netloc, "/", "", ""))


def reach_http(name: str, url: str) -> Check:
    target = http_of(url)
    start = time.monotonic()
    try:
        resp = httpx.get(target, timeout=TIMEOUT_S, follow_redirects=False)
    except (httpx.HTTPError, ValueError) as exc:
        return Check(name, target, False, f"unreachable: {type(exc).__name__}: {exc}"[:200])
    ms = (time.monotonic() - start) * 1000
    return Check(name, target, True, f"answers (HTTP {resp.status_code}, {ms:.0f} ms)")


def reach_redis(url: str) -> Check:
    shown = mask_url(url)
    try:
        start = time.monotonic()
        redis.Redis.from_url(url, socket_connect_timeout=TIMEOUT_S, socket_timeout=TIMEOUT_S).ping()
    except (redis.RedisError, OSError, ValueError) as exc:
        return Check("redis", shown, False, f"unreachable: {exc}"[:200])
    return Check("redis", shown, True, f"PING ok ({(time.monotonic() - start) * 1000:.0f} ms)")


def checks(settings: Settings) -> list[Check]:
    from avatar_service.providers.heygen import HeyGenSettings
    from avatar_service.providers.liveavatar import LiveAvatarSettings

    out = [reach_redis(settings.redis_url)]
    stt = settings.resolved_stt_provider()
    if stt == "deepgram":
        if settings.deepgram_api_key:
            out.append(reach_http("stt: deepgram", settings.deepgram_url))
        else:
            out.append(Check("stt: deepgram", settings.deepgram_url, False, "DEEPGRAM_API_KEY is not set"))
    else:
        out.append(Check("stt: local", "bundled Whisper tiny.en", True, "runs in the STT worker, no network"))
    avatar = settings.avatar_provider
    liveavatar, heygen = LiveAvatarSettings(), HeyGenSettings()
    if avatar == "auto":
        avatar = "liveavatar" if liveavatar.api_key else "local"
    if avatar == "liveavatar":
        ok = bool(liveavatar.api_key)
        out.append(
            reach_http("avatar: liveavatar", liveavatar.server_url)
            if ok
            else Check("avatar: liveavatar", liveavatar.server_url, False, "LIVEAVATAR_API_KEY is not set")
        )
    elif avatar == "heygen":
        ok = bool(heygen.api_key)
        out.append(
            reach_http("avatar: heygen", heygen.server_url)
            if ok
            else Check("avatar: heygen", heygen.server_url, False, "HEYGEN_API_KEY is not set")
        )
    else:
        out.append(Check(f"avatar: {avatar}", "piper voice, face in the page", True, "no network"))
    if settings.llm_base_url:
        out.append(reach_http("brain: llm", settings.llm_base_url))
    else:
        out.append(Check("brain: local Q&A", settings.knowledge_file or "bundled knowledge.md", True, "no network"))
    if settings.livekit_url:
        if settings.livekit_api_key and settings.livekit_api_secret:
            out.append(reach_http("livekit", settings.livekit_url))
        else:
            missing = "LIVEKIT_API_KEY and LIVEKIT_API_SECRET must be set"
            out.append(Check("livekit", settings.livekit_url, False, missing))
    if settings.otel_exporter_otlp_endpoint:
        out.append(reach_http("traces: otlp", settings.otel_exporter_otlp_endpoint))
    return out


def doctor(settings: Settings, out: TextIO = sys.stdout) -> int:
    print(f"avatar-stack {__version__} (Python {sys.version.split()[0]})", file=out)
    print("\nSettings (* = set in the environment or .env; secrets masked):", file=out)
    rows = list(resolved(mask=True))
    width = max(len(name) for name, _, _ in rows)
    for name, value, explicit in rows:
        shown = '""' if value == "" else value
        print(f"  {'*' if explicit else ' '} {name:<{width}}  {shown}", file=out)
    unknown = unknown_settings()
    if unknown:
        print("\nNot settings (misspelt?):", file=out)
        for var, hint in unknown:
            print(f"  ! {var}: {hint}", file=out)
    print("\nChecks:", file=out)
    results = checks(settings)
    for c in results:
        print(f"  [{'ok' if c.ok else 'FAIL':<4}] {c.name:<20} {c.target}  {c.detail}", file=out)
    failed = [c for c in results if not c.ok]
    print(f"\n{len(results) - len(failed)} of {len(results)} checks passed", file=out)
    return 1 if failed else 0

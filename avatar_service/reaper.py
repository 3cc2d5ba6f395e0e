"""The orphan reaper: stop vendor avatar sessions (HeyGen, LiveAvatar) no live session of ours owns.

A leaked HeyGen session costs money and a concurrency slot until the vendor's idle timeout. Leaks
happen when every avatar worker dies at once, when a session ends while no avatar worker runs,
or when a `streaming.stop` fails. So, at worker start and every `heygen_reaper_interval_s`:
`streaming.list`, then stop every listed session whose id is not recorded in the hash of a live
(not ended) session in Redis.

Sessions being created are safe: the driver records the vendor id before `streaming.start`, the
vendor list is read before Redis (a session created in between is either not listed or already
recorded), and a session younger than `heygen_reaper_grace_s` is never touched. A Redis lock
makes one pass per interval across all workers. The reaper owns every session of the API key:
do not share a HeyGen key between deployments (or set `HEYGEN_REAPER_INTERVAL_S=0`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from avatar_service.providers import heygen, liveavatar
from common import keys
from common.sessions import STATE_ENDED
from common.settings import Settings

log = logging.getLogger(__name__)

REAPER_LOCK = "heygen:reaper:lock"


@dataclass
class ReaperTarget:
    """One vendor's side of reaping: how to list its sessions, stop one, and find ours in Redis."""

    name: str
    client: Any  # has `list_sessions()` and `aclose()`
    stop: Callable[[str], Awaitable[Any]]
    vendor_field: str
    errors: tuple[type[Exception], ...]
    interval_s: float
    grace_s: float
    lock: str


def target_for(settings: Settings) -> ReaperTarget | None:
    """The reaper of the configured cloud avatar, or None (local avatar, no key, or turned off)."""
    provider = settings.resolved_avatar_provider()
    if provider == "heygen":
        options = heygen.HeyGenOptions.from_settings(settings)
        if not options.api_key or options.reaper_interval_s <= 0:
            return None
        client = heygen.HeyGenClient(options.server_url, options.api_key, timeout_s=options.http_timeout_s)
        return ReaperTarget("HeyGen", client, client.stop, heygen.F_VENDOR_ID, (heygen.HeyGenError,),
                            options.reaper_interval_s, options.reaper_grace_s, REAPER_LOCK)
    if provider == "liveavatar" and settings.liveavatar_api_key and settings.liveavatar_reaper_interval_s > 0:
        client = liveavatar.LiveAvatarClient(
            settings.liveavatar_server_url, settings.liveavatar_api_key.get_secret_value(),
            timeout_s=settings.liveavatar_http_timeout_s,
        )
        return ReaperTarget("LiveAvatar", client, client.reap, liveavatar.F_VENDOR_ID, (liveavatar.LiveAvatarError,),
                            settings.liveavatar_reaper_interval_s, settings.liveavatar_reaper_grace_s,
                            "liveavatar:reaper:lock")
    return None


async def owned_vendor_ids(r: aioredis.Redis, vendor_field: str = heygen.F_VENDOR_ID) -> set[str]:
    """Vendor session ids recorded by sessions that are still live."""
    sids = [s.decode() for s in await r.zrange(keys.SESSIONS_INDEX, 0, -1)]
    if not sids:
        return set()
    async with r.pipeline(transaction=False) as pipe:
        for sid in sids:
            pipe.hmget(keys.session(sid), keys.F_STATE, vendor_field)
        rows = await pipe.execute()
    return {vendor.decode() for state, vendor in rows if vendor and state and state.decode() != STATE_ENDED}


async def reap_once(
    r: aioredis.Redis, client: Any, *, grace_s: float, first_seen: dict[str, float] | None = None,
    target: ReaperTarget | None = None,
) -> list[str]:
    """One pass; returns the ids it stopped. `first_seen` ages sessions the vendor lists without `created_at`.

    Without `target`, `client` is a HeyGen client (the original signature)."""
    name = target.name if target else "HeyGen"
    stop = target.stop if target else client.stop
    errors = target.errors if target else (heygen.HeyGenError,)
    listed = await client.list_sessions()  # before Redis: see the module docstring
    owned = await owned_vendor_ids(r, target.vendor_field if target else heygen.F_VENDOR_ID)
    first_seen = first_seen if first_seen is not None else {}
    now = time.time()
    reaped = []
    for session in listed:
        seen = first_seen.setdefault(session.session_id, now)
        created = session.created_at if session.created_at is not None else seen
        if session.session_id in owned or now - created < grace_s:
            continue
        try:
            await stop(session.session_id)
        except errors as exc:
            log.warning("reaper could not stop %s session %s: %s", name, session.session_id, exc)
            continue
        reaped.append(session.session_id)
        log.warning("reaped orphaned %s session %s (created %.0f s ago)", name, session.session_id, now - created)
    listed_ids = {s.session_id for s in listed}
    for vendor_id in list(first_seen):
        if vendor_id not in listed_ids:
            del first_seen[vendor_id]
    return reaped


async def run_reaper(r: aioredis.Redis, settings: Settings, stop: asyncio.Event) -> None:
    """Reap at once, then every interval, until `stop` is set. For the avatar worker to run as a task."""
    target = target_for(settings)
    if target is None:
        log.info("vendor session reaper off")
        return
    me = uuid.uuid4().hex
    first_seen: dict[str, float] = {}
    lock_ms = max(1, int(target.interval_s * 900))  # a little under the interval
    log.info("%s reaper on: every %g s, grace %g s", target.name, target.interval_s, target.grace_s)
    try:
        while not stop.is_set():
            try:
                if await r.set(target.lock, me, nx=True, px=lock_ms):
                    await reap_once(r, target.client, grace_s=target.grace_s, first_seen=first_seen, target=target)
            except target.errors as exc:
                level = logging.ERROR if getattr(exc, "auth", False) else logging.WARNING
                log.log(level, "%s reaper pass failed: %s", target.name, exc)
            except (RedisError, OSError) as exc:
                log.warning("%s reaper pass failed: %s", target.name, exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), target.interval_s)
    finally:
        await target.client.aclose()

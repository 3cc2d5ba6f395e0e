"""The orphan reaper: stop HeyGen sessions that no live session of ours owns.

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

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from avatar_service.providers.heygen import F_VENDOR_ID, HeyGenClient, HeyGenError, HeyGenOptions
from common import keys
from common.sessions import STATE_ENDED
from common.settings import Settings

log = logging.getLogger(__name__)

REAPER_LOCK = "heygen:reaper:lock"


async def owned_vendor_ids(r: aioredis.Redis) -> set[str]:
    """Vendor session ids recorded by sessions that are still live."""
    sids = [s.decode() for s in await r.zrange(keys.SESSIONS_INDEX, 0, -1)]
    if not sids:
        return set()
    async with r.pipeline(transaction=False) as pipe:
        for sid in sids:
            pipe.hmget(keys.session(sid), keys.F_STATE, F_VENDOR_ID)
        rows = await pipe.execute()
    return {vendor.decode() for state, vendor in rows if vendor and state and state.decode() != STATE_ENDED}


async def reap_once(
    r: aioredis.Redis, client: HeyGenClient, *, grace_s: float, first_seen: dict[str, float] | None = None
) -> list[str]:
    """One pass; returns the ids it stopped. `first_seen` ages sessions the vendor lists without `created_at`."""
    listed = await client.list_sessions()  # before Redis: see the module docstring
    owned = await owned_vendor_ids(r)
    first_seen = first_seen if first_seen is not None else {}
    now = time.time()
    reaped = []
    for session in listed:
        seen = first_seen.setdefault(session.session_id, now)
        created = session.created_at if session.created_at is not None else seen
        if session.session_id in owned or now - created < grace_s:
            continue
        try:
            await client.stop(session.session_id)
        except HeyGenError as exc:
            log.warning("reaper could not stop HeyGen session %s: %s", session.session_id, exc)
            continue
        reaped.append(session.session_id)
        log.warning("reaped orphaned HeyGen session %s (created %.0f s ago)", session.session_id, now - created)
    listed_ids = {s.session_id for s in listed}
    for vendor_id in list(first_seen):
        if vendor_id not in listed_ids:
            del first_seen[vendor_id]
    return reaped


async def run_reaper(r: aioredis.Redis, settings: Settings, stop: asyncio.Event) -> None:
    """Reap at once, then every interval, until `stop` is set. For the avatar worker to run as a task."""
    options = HeyGenOptions.from_settings(settings)
    if not options.api_key or options.reaper_interval_s <= 0:
        log.info("HeyGen reaper off")
        return
    client = HeyGenClient(options.server_url, options.api_key, timeout_s=options.http_timeout_s)
    me = uuid.uuid4().hex
    first_seen: dict[str, float] = {}
    lock_ms = max(1, int(options.reaper_interval_s * 900))  # a little under the interval
    log.info("HeyGen reaper on: every %g s, grace %g s", options.reaper_interval_s, options.reaper_grace_s)
    try:
        while not stop.is_set():
            try:
                if await r.set(REAPER_LOCK, me, nx=True, px=lock_ms):
                    await reap_once(r, client, grace_s=options.reaper_grace_s, first_seen=first_seen)
            except HeyGenError as exc:
                level = logging.ERROR if exc.auth else logging.WARNING
                log.log(level, "HeyGen reaper pass failed: %s", exc)
            except (RedisError, OSError) as exc:
                log.warning("HeyGen reaper pass failed: %s", exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), options.reaper_interval_s)
    finally:
        await client.aclose()

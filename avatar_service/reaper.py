"""The orphan reaper: stop vendor avatar sessions this deployment started that no live session owns.

A leaked cloud avatar session costs money and a concurrency slot until the vendor's own timeout.
Leaks happen when every avatar worker dies at once, when a session ends while no avatar worker
runs, or when a stop call fails. So, at worker start and every interval, for the configured vendor:
list the account's active sessions this deployment could have started (every page; the adapter
matches source and mode), and stop those that are in this deployment's ledger
(`vendor_sessions:{vendor}`, written before each start, see `providers/cloud.py`) while no live
session of ours points at them.

Never stopped: anything not in the ledger. Vendor accounts are shared: LiveAvatar's list holds the
customer's sessions from its dashboard (DEMO), apps (APP), embeds (EMBED) and other deployments
(API); they are not ours to stop. The price is that a session whose ledger entry was lost with
Redis is left to the vendor's idle timeout. Sessions being created are safe: the ledger entry and
the session hash are written before `start`, and nothing younger than the grace period is touched.
A Redis lock makes one pass per interval across all workers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid

import redis.asyncio as aioredis

from avatar_service.providers import make_reaping
from avatar_service.providers.cloud import EndReason, Reaping, VendorLedger, owner_is_live
from common.bus import REDIS_ERRORS
from common.settings import Settings

log = logging.getLogger(__name__)


async def reap_once(target: Reaping, *, r: aioredis.Redis, grace_s: float | None = None) -> list[str]:
    """One pass; returns the vendor ids it stopped."""
    grace = target.grace_s if grace_s is None else grace_s
    ledger = VendorLedger(r, target.name)
    listed = await target.list_own_sessions()  # before Redis: a session created in between is recorded already
    ours = await ledger.entries()
    now = time.time()
    reaped: list[str] = []
    listed_ids = set()
    for session in listed:
        listed_ids.add(session.session_id)
        entry = ours.get(session.session_id)
        if entry is None:
            continue  # not started by this deployment: never ours to stop
        sid, recorded_at = entry
        if now - recorded_at < grace or await owner_is_live(r, sid, session.session_id, target.fields):
            continue
        try:
            await target.stop_session(session.session_id, EndReason.ORPHAN)
        except target.errors as exc:
            log.warning("reaper could not stop %s session %s: %s", target.name, session.session_id, exc)
            continue
        await ledger.forget(session.session_id)
        reaped.append(session.session_id)
        log.warning("reaped orphaned %s session %s (session %s, recorded %.0f s ago)", target.name,
                    session.session_id, sid, now - recorded_at)
    for vendor_id, (sid, recorded_at) in ours.items():  # entries the vendor no longer lists: done with
        if vendor_id not in listed_ids and now - recorded_at >= grace \
                and not await owner_is_live(r, sid, vendor_id, target.fields):
            await ledger.forget(vendor_id)
    return reaped


async def run_reaper(r: aioredis.Redis, settings: Settings, stop: asyncio.Event, *,
                     target: Reaping | None = None) -> None:
    """Reap at once, then every interval, until `stop` is set. For the avatar worker to run as a task."""
    target = target or make_reaping(settings)
    if target is None:
        log.info("vendor session reaper off")
        return
    me = uuid.uuid4().hex
    lock = f"{target.name}:reaper:lock"
    lock_ms = max(1, int(target.interval_s * 900))  # a little under the interval
    log.info("%s reaper on: every %g s, grace %g s", target.name, target.interval_s, target.grace_s)
    try:
        while not stop.is_set():
            try:
                if await r.set(lock, me, nx=True, px=lock_ms):
                    await reap_once(target, r=r)
            except target.errors as exc:
                level = logging.ERROR if getattr(exc, "auth", False) else logging.WARNING
                log.log(level, "%s reaper pass failed: %s", target.name, exc)
            except REDIS_ERRORS as exc:
                log.warning("%s reaper pass failed: %s", target.name, exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), target.interval_s)
    finally:
        await target.aclose()

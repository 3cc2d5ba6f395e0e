"""Admission control: refuse a new session when a worker pool has no room for it.

Workers advertise `{capacity, load, ts}` in `workers:{kind}` on every heartbeat. A pool has room
when some worker advertised recently and the pool's free slots outnumber the sessions already
waiting in its job stream. Better a clear 503 now than a session that never starts.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import orjson
import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from common import keys

POOLS = (("stt", keys.JOBS_STT, keys.GROUP_STT), ("avatar", keys.JOBS_AVATAR, keys.GROUP_AVATAR))


@dataclass
class PoolStatus:
    kind: str
    workers: int
    capacity: int
    load: int
    waiting: int

    @property
    def room(self) -> int:
        return self.capacity - self.load - self.waiting

    def as_dict(self) -> dict[str, int | str | bool]:
        return {"workers": self.workers, "capacity": self.capacity, "load": self.load,
                "waiting": self.waiting, "has_room": self.room > 0}


async def pool_status(r: aioredis.Redis, kind: str, stream: str, group: str, stale_after_s: float) -> PoolStatus:
    now = time.time()
    fresh = []
    for name, raw in (await r.hgetall(keys.workers(kind))).items():
        info = orjson.loads(raw)
        if now - info["ts"] <= stale_after_s:
            fresh.append(info)
        elif now - info["ts"] > 60 * stale_after_s:
            await r.hdel(keys.workers(kind), name)  # long dead: forget it
    return PoolStatus(
        kind, len(fresh), sum(w["capacity"] for w in fresh), sum(w["load"] for w in fresh),
        await _waiting(r, stream, group),
    )


async def _waiting(r: aioredis.Redis, stream: str, group: str) -> int:
    """Sessions submitted but not yet claimed by any worker."""
    try:
        groups = await r.xinfo_groups(stream)
    except ResponseError:
        return 0
    for info in groups:
        if info["name"] in (group, group.encode()):
            lag = info.get("lag")
            if lag is not None:
                return int(lag)
            # Redis < 7: count entries after the group's last delivered id.
            last = info["last-delivered-id"]
            return len(await r.xrange(stream, min=f"({last.decode() if isinstance(last, bytes) else last}",
                                      count=10_000))
    return await r.xlen(stream)


async def all_pools(r: aioredis.Redis, stale_after_s: float) -> list[PoolStatus]:
    return [await pool_status(r, kind, stream, group, stale_after_s) for kind, stream, group in POOLS]

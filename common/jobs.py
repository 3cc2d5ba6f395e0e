"""Session-claiming job streams: how sessions are handed out to workers.

One entry per session in `jobs:stt` / `jobs:avatar`, read through a consumer group. A worker
claims an entry only while it has room, keeps it pending while it serves the session (a
heartbeat re-claims it so its idle time stays near zero), and ACKs + deletes it when the session
ends. If a worker dies, its entries go idle; after `lease_ms` another worker takes them with
XAUTOCLAIM and resumes the session from the cursor stored in the session hash.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

log = logging.getLogger(__name__)

JOBS_MAXLEN = 100_000

@dataclass(frozen=True)
class Job:
    entry_id: str
    session_id: str
    taken_over: bool = False


class JobStream:
    """The job stream of one worker kind, seen by one consumer."""

    # Re-claims each id only if this consumer still owns it, so a heartbeat of a worker that was
    # paused past its lease can never steal a session back from the worker that took it over.
    # Returns the ids this consumer no longer owns.
    HEARTBEAT_LUA = """
    local group, me = ARGV[1], ARGV[2]
    local lost = {}
    for i = 3, #ARGV do
      local p = redis.call('XPENDING', KEYS[1], group, ARGV[i], ARGV[i], 1)
      if p[1] ~= nil and p[1][2] == me then
        redis.call('XCLAIM', KEYS[1], group, me, 0, ARGV[i], 'JUSTID')
      else
        table.insert(lost, ARGV[i])
      end
    end
    return lost
    """

    # Makes the entry idle past any lease (the next XAUTOCLAIM takes it), only if this consumer
    # still owns it: a late hand-back must not take a session away from the worker that took it
    # over (that worker would lose it and resume it a second time).
    HAND_BACK_LUA = """
    local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[3], ARGV[3], 1)
    if p[1] ~= nil and p[1][2] == ARGV[2] then
      redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[3], 'IDLE', ARGV[4], 'JUSTID')
      return 1
    end
    return 0
    """

    def __init__(
        self, r: aioredis.Redis, stream: str, group: str, consumer: str, lease_ms: int
    ) -> None:
        self.r = r
        self.stream = stream
        self.group = group
        self.consumer = consumer
        self.lease_ms = lease_ms
        self._heartbeat = r.register_script(self.HEARTBEAT_LUA)
        self._hand_back = r.register_script(self.HAND_BACK_LUA)

    @staticmethod
    async def submit(r: aioredis.Redis, stream: str, session_id: str) -> str:
        entry_id = await r.xadd(stream, {"sid": session_id}, maxlen=JOBS_MAXLEN, approximate=True)
        return entry_id.decode() if isinstance(entry_id, bytes) else entry_id

    async def ensure_group(self) -> None:
        try:
            await self.r.xgroup_create(self.stream, self.group, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def claim(self, room: int, block_ms: int) -> list[Job]:
        """Take up to `room` sessions: first ones abandoned past their lease, then new ones."""
        if room <= 0:
            return []
        jobs: list[Job] = []
        try:
            reply = await self.r.xautoclaim(
                self.stream, self.group, self.consumer, min_idle_time=self.lease_ms,
                start_id="0-0", count=room,
            )
        except ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            await self.ensure_group()
            reply = [b"0-0", []]
        # Redis 7 answers 3 parts, 6.2 answers 2: read only the first two.
        for entry_id, fields in reply[1]:
            if fields is None:  # deleted while pending
                await self.r.xack(self.stream, self.group, entry_id)
                continue
            jobs.append(_job(entry_id, fields, taken_over=True))
        room -= len(jobs)
        if room > 0:
            try:
                fresh = await self.r.xreadgroup(
                    self.group, self.consumer, {self.stream: ">"}, count=room,
                    block=block_ms if not jobs else None,
                )
            except ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
                await self.ensure_group()
                fresh = []
            for _stream, entries in fresh or []:
                jobs.extend(_job(entry_id, fields) for entry_id, fields in entries)
        return jobs

    async def heartbeat(self, jobs: list[Job]) -> set[str]:
        """Keep our jobs' idle time low; return the entry ids we no longer own."""
        if not jobs:
            return set()
        lost = await self._heartbeat(
            keys=[self.stream], args=[self.group, self.consumer, *(j.entry_id for j in jobs)]
        )
        return {x.decode() if isinstance(x, bytes) else x for x in lost}

    async def done(self, job: Job) -> None:
        """The session has ended: remove its job for good."""
        async with self.r.pipeline(transaction=True) as pipe:
            pipe.xack(self.stream, self.group, job.entry_id)
            pipe.xdel(self.stream, job.entry_id)
            await pipe.execute()

    async def hand_back(self, job: Job) -> bool:
        """Make a live session claimable by another worker at once (graceful shutdown); False
        (and nothing changed) if another worker has taken it over already."""
        handed = bool(await self._hand_back(
            keys=[self.stream], args=[self.group, self.consumer, job.entry_id, self.lease_ms * 1000]
        ))
        if not handed:
            log.warning("session %s was taken over already; not handing it back", job.session_id)
        return handed


def _job(entry_id: bytes | str, fields: dict, *, taken_over: bool = False) -> Job:
    eid = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    sid = fields.get(b"sid") or fields.get("sid")
    return Job(eid, sid.decode() if isinstance(sid, bytes) else sid, taken_over)

"""One XREAD for every session a worker serves: the audio of many sessions per round trip.

Reading `audio:{sid}` with one blocking XREAD per session costs a command, a reply and a
wake-up per 20 ms frame per session — the STT worker's largest cost in the profile. Here one
reader task asks Redis for all of its sessions' streams at once, each from its own cursor, and
hands each session its entries through a small bounded queue. Under load one reply carries frames
of many sessions, so the cost per frame falls as the number of sessions grows.

Flow control: a session whose queue is full (its engine is not keeping up) is left out of the
next XREAD until it has room, so one slow session never holds the others back nor grows memory;
its audio waits in its Redis stream (itself bounded by MAXLEN; the worker counts what MAXLEN
trims before it reads it, from the gateway's per-socket frame numbers).

A Redis failure reaches every subscribed session (its `get` raises), which is what the claim loop
expects: the session is handed back and resumes from its stored cursor.

Note: one XREAD over many keys needs them on one node; with Redis Cluster a reader per hash slot
would be needed (keys are already tagged per session).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import hiredis
import redis.asyncio as aioredis
from prometheus_client import Counter
from redis.exceptions import RedisError

from common import keys

log = logging.getLogger(__name__)

READS = Counter("stt_audio_reads_total", "XREADs of the audio feed (stt_audio_frames_total / this = batching)")

# (entry id, first field name, its value, `seq` or None): audio entries are `pcm` (+ `seq`) or `end`.
Entries = list[tuple[bytes, bytes, bytes, bytes | None]]


class _Subscription:
    def __init__(self, cursor: str, depth: int) -> None:
        self.cursor = cursor
        self.queue: asyncio.Queue[Entries | BaseException] = asyncio.Queue(depth)


class AudioFeed:
    def __init__(self, r: aioredis.Redis, *, block_ms: int = 100, count: int = 50, depth: int = 4) -> None:
        """A session holds at most `depth` batches of `count` entries here (4 s of audio)."""
        # One connection of the pool, held by the reader and spoken to directly: the command is
        # packed by hiredis in C and the reply left raw. redis-py's Python packing of XREAD's
        # 2N arguments, and its per-entry dict building, were a fifth of the worker's CPU.
        self.pool = r.connection_pool
        self._conn: aioredis.Connection | None = None
        self._head = (b"XREAD", b"COUNT", count, b"BLOCK", block_ms, b"STREAMS")
        self.depth = depth
        self._subs: dict[str, _Subscription] = {}  # audio stream key -> its reader state
        self._task: asyncio.Task[None] | None = None
        self.reads = 0  # round trips, for metrics: frames per read shows the batching

    def subscribe(self, sid: str, cursor: str) -> asyncio.Queue[Entries | BaseException]:
        """Start delivering `audio:{sid}` entries after `cursor`; returns the session's queue."""
        sub = _Subscription(cursor, self.depth)
        self._subs[keys.audio(sid)] = sub
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="audio-feed")
        return sub.queue

    def unsubscribe(self, sid: str) -> None:
        self._subs.pop(keys.audio(sid), None)

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._conn is not None:
            await self.pool.release(self._conn)
            self._conn = None

    async def _xread(self, ready: dict[str, str]):
        """XREAD COUNT BLOCK STREAMS k1 k2 ... c1 c2 ...; the reply as Redis sent it:
        {key: [[id, [field, value]], ...]} (a list of pairs in RESP2), None on timeout."""
        if self._conn is None:
            self._conn = await self.pool.get_connection()
        conn = self._conn
        try:
            await conn.send_packed_command(hiredis.pack_command((*self._head, *ready, *ready.values())), False)
            return await conn.read_response()
        except BaseException:
            await conn.disconnect()  # a reply may still be on its way: never reuse the socket mid-command
            raise

    async def _run(self) -> None:
        backoff = 0.05
        while self._subs:
            ready = {key: sub.cursor for key, sub in self._subs.items() if not sub.queue.full()}
            if not ready:
                await asyncio.sleep(0.005)  # every session is behind: let their engines catch up
                continue
            try:
                reply = await self._xread(ready)
            except (RedisError, OSError) as exc:  # every session hears it and is handed back
                self._fail_all(exc)
                await asyncio.sleep(backoff)
                backoff = min(2.0, backoff * 2)
                continue
            except Exception as exc:  # a bug must not leave every session waiting in silence
                log.exception("audio feed failed")
                self._fail_all(exc)
                await asyncio.sleep(backoff)
                continue
            backoff = 0.05
            self.reads += 1
            READS.inc()
            streams = reply.items() if isinstance(reply, dict) else reply or []  # RESP3 map or RESP2 pairs
            for key, entries in streams:
                sub = self._subs.get(key.decode() if isinstance(key, bytes) else key)
                if sub is None or not entries:
                    continue  # unsubscribed while the read was in flight
                sub.cursor = entries[-1][0].decode()
                batch = [
                    (entry_id, fields[0], fields[1], fields[3] if len(fields) > 3 else None)
                    for entry_id, fields in entries if fields
                ]
                sub.queue.put_nowait(batch)  # it had room when the read began, and only we put

    def _fail_all(self, exc: BaseException) -> None:
        log.warning("audio feed read failed: %s", exc)
        for sub in self._subs.values():
            with contextlib.suppress(asyncio.QueueFull):
                sub.queue.put_nowait(exc)


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

Redis Cluster: one XREAD may only name keys of one hash slot, and each session has a slot of its
own. So the feed keeps one reader per Redis node (a single Redis is one node), and each session's
stream goes to the reader of the node that serves its slot (redis-py's slot map). A reader sends
one XREAD per slot group, all in one write: one round trip per node per cycle, not one per
session. On a single Redis there is one group, so it is the one blocking XREAD it always was. When
a node fails, only its reader's sessions hear it (they are handed back and resume from their
cursors, routed by the refreshed slot map); the other nodes' readers go on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import hiredis
import redis.asyncio as aioredis
from prometheus_client import Counter
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.crc import key_slot

from common import keys
from common.bus import REDIS_ERRORS, is_redis_failure

log = logging.getLogger(__name__)

READS = Counter("stt_audio_reads_total", "XREADs of the audio feed (stt_audio_frames_total / this = batching)")

CLUSTER_WAIT_MS = 20  # see _NodeReader._read
IDLE_TICK_S = 0.5  # a session without audio this long gets an empty batch (see _tick_idle)

# (entry id, first field name, its value, `seq` or None): audio entries are `pcm` (+ `seq`) or `end`.
Entries = list[tuple[bytes, bytes, bytes, bytes | None]]


class _Subscription:
    def __init__(self, cursor: str, depth: int, slot: int = 0) -> None:
        self.cursor = cursor
        self.slot = slot
        self.queue: asyncio.Queue[Entries | BaseException] = asyncio.Queue(depth)
        self.last_put = time.monotonic()


class _NodeReader:
    """The streams of one Redis node, read by one blocking XREAD on one connection of its own."""

    def __init__(self, feed: AudioFeed, name: str, node: object) -> None:
        self.feed = feed
        self.name = name
        self.node = node  # a redis.asyncio.cluster.ClusterNode, or the single Redis's pool
        self.subs: dict[str, _Subscription] = {}  # audio stream key -> its reader state
        self.task: asyncio.Task[None] | None = None
        self._conn: aioredis.Connection | None = None
        self.last_key = ""  # the stream that last had entries: a cluster node's reader waits on it

    async def _acquire(self) -> aioredis.Connection:
        if isinstance(self.node, ClusterNode):
            # A connection of our own, outside the node's pool: the cluster client closes every
            # pooled connection when it sees CLUSTERDOWN, which would cut this node's reads too.
            return self.node.connection_class(**self.node.connection_kwargs)
        return await self.node.get_connection()  # type: ignore[attr-defined]

    async def release(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        if isinstance(self.node, ClusterNode):
            await conn.disconnect()
        else:
            await self.node.release(conn)  # type: ignore[attr-defined]

    def _groups(self, ready: dict[str, str]) -> list[dict[str, str]]:
        """The streams that one XREAD may name together: all of them on a single Redis; on a
        cluster node those of one hash slot (Redis refuses a multi-key command across slots even
        on one node), which with one session per slot is one stream each."""
        if not isinstance(self.node, ClusterNode):
            return [ready]
        by_slot: dict[int, dict[str, str]] = {}
        for key, cursor in ready.items():
            by_slot.setdefault(self.subs[key].slot, {})[key] = cursor
        return list(by_slot.values())

    async def _xread(self, groups: list[dict[str, str]], block_ms: int | None):
        """One XREAD COUNT [BLOCK] STREAMS k1 k2 ... c1 c2 ... per group, all in one write and one
        round trip; the replies as Redis sent them: {key: [[id, [field, value]], ...]} (a list of
        pairs in RESP2), None when empty."""
        if self._conn is None:
            self._conn = await self._acquire()
        conn = self._conn
        head = self.feed._head if block_ms is None else (*self.feed._head[:3], b"BLOCK", block_ms, b"STREAMS")
        try:
            await conn.send_packed_command(
                b"".join(hiredis.pack_command((*head, *g, *g.values())) for g in groups), False
            )
            self.feed.reads += 1
            READS.inc()
            return [await conn.read_response() for _ in groups]
        except BaseException:
            await conn.disconnect()  # a reply may still be on its way: never reuse the socket mid-command
            raise

    async def _read(self, ready: dict[str, str]):
        """The next entries of `ready`, waiting up to the feed's block time when there are none.
        One group (a single Redis; one slot): one blocking XREAD. Several (a cluster node): a
        pipeline of non-blocking ones, and if all come back empty, one blocking XREAD on the group
        that last had audio for at most a frame's time (pages send audio every 20 ms, so it wakes
        the reader about as soon as audio comes for anyone), then round again."""
        groups = self._groups(ready)
        if len(groups) == 1:
            return await self._xread(groups, self.feed.block_ms)
        replies = await self._xread(groups, None)
        if any(replies):
            return replies
        leader = next((g for g in groups if self.last_key in g), groups[0])
        return await self._xread([leader], min(self.feed.block_ms, CLUSTER_WAIT_MS))

    async def run(self) -> None:
        backoff = 0.05
        loop = asyncio.get_running_loop()
        last_read = last_ticks = 0.0
        try:
            while self.subs:
                wait = last_read + self.feed.min_interval_s - loop.time()
                if wait > 0:  # under load: let frames of more sessions gather for this read
                    await asyncio.sleep(wait)
                # Who to read is decided after the last await before the read: a session that
                # unsubscribed during the wait (handed back, ended) must not be named in it.
                ready = {key: sub.cursor for key, sub in self.subs.items() if not sub.queue.full()}
                if not ready:
                    await asyncio.sleep(0.005)  # every session is behind: let their engines catch up
                    continue
                last_read = loop.time()
                try:
                    replies = await self._read(ready)
                except Exception as exc:  # every session of this node hears it
                    if is_redis_failure(exc):  # handed back, to resume once the node answers
                        self._fail_all(exc)
                        await self.feed._node_failed()
                        await asyncio.sleep(backoff)
                        backoff = min(2.0, backoff * 2)
                    else:  # a bug must not leave every session waiting in silence
                        log.exception("audio feed failed")
                        self._fail_all(exc)
                        await asyncio.sleep(backoff)
                    continue
                backoff = 0.05
                for reply in replies:
                    self._deliver(reply)
                if last_read - last_ticks >= IDLE_TICK_S / 5:
                    last_ticks = last_read
                    self._tick_idle()
        finally:
            if self.feed._readers.get(self.name) is self and not self.subs:
                del self.feed._readers[self.name]
            await self.release()

    def _deliver(self, reply) -> None:
        streams = reply.items() if isinstance(reply, dict) else reply or []  # RESP3 map or RESP2 pairs
        for key, entries in streams:
            name = key.decode() if isinstance(key, bytes) else key
            sub = self.subs.get(name)
            if sub is None or not entries:
                continue  # unsubscribed while the read was in flight
            self.last_key = name
            sub.cursor = entries[-1][0].decode()
            batch = [
                (entry_id, fields[0], fields[1], fields[3] if len(fields) > 3 else None)
                for entry_id, fields in entries if fields
            ]
            sub.queue.put_nowait(batch)  # it had room when the read began, and only we put
            sub.last_put = time.monotonic()

    def _tick_idle(self) -> None:
        """An empty batch to each session that got nothing for IDLE_TICK_S: its pump waits on its
        queue without a timer of its own per wait, and still learns that the page went quiet."""
        now = time.monotonic()
        for sub in self.subs.values():
            if now - sub.last_put >= IDLE_TICK_S and not sub.queue.full():
                sub.queue.put_nowait([])
                sub.last_put = now

    def _fail_all(self, exc: BaseException) -> None:
        log.warning("audio feed read from %s failed: %s", self.name, exc)
        for sub in self.subs.values():
            with contextlib.suppress(asyncio.QueueFull):
                sub.queue.put_nowait(exc)


class AudioFeed:
    def __init__(
        self, r: aioredis.Redis, *, block_ms: int = 100, count: int = 50, depth: int = 4, min_interval_s: float = 0.0
    ) -> None:
        """A session holds at most `depth` batches of `count` entries here (4 s of audio). Reads
        start at most every `min_interval_s`: a read that returned at once (audio was waiting) is
        not followed at once by another that would carry one frame or two."""
        # One connection per node, held by its reader and spoken to directly: the command is
        # packed by hiredis in C and the reply left raw. redis-py's Python packing of XREAD's
        # 2N arguments, and its per-entry dict building, were a fifth of the worker's CPU.
        self.r = r
        self._head = (b"XREAD", b"COUNT", count, b"STREAMS")
        self.block_ms = block_ms
        self.depth = depth
        self.min_interval_s = min_interval_s
        self._readers: dict[str, _NodeReader] = {}  # node name -> its reader
        self._where: dict[str, _NodeReader] = {}  # audio stream key -> the reader it is subscribed at
        self.reads = 0  # round trips, for metrics: frames per read shows the batching

    def _node_of(self, key: str) -> tuple[str, object]:
        if isinstance(self.r, RedisCluster):
            node = self.r.get_node_from_key(key)
            return node.name, node
        return "redis", self.r.connection_pool

    def subscribe(self, sid: str, cursor: str) -> asyncio.Queue[Entries | BaseException]:
        """Start delivering `audio:{sid}` entries after `cursor`; returns the session's queue."""
        key = keys.audio(sid)
        self.unsubscribe(sid)
        sub = _Subscription(cursor, self.depth, key_slot(key.encode()))
        try:
            name, node = self._node_of(key)
        except Exception as exc:  # no node serves its slot right now: the session hears it
            if not is_redis_failure(exc):
                raise
            sub.queue.put_nowait(exc)
            return sub.queue
        reader = self._readers.get(name)
        if reader is None:
            reader = self._readers[name] = _NodeReader(self, name, node)
        reader.subs[key] = sub
        self._where[key] = reader
        if reader.task is None or reader.task.done():
            reader.task = asyncio.create_task(reader.run(), name=f"audio-feed:{name}")
        return sub.queue

    def unsubscribe(self, sid: str) -> None:
        key = keys.audio(sid)
        reader = self._where.pop(key, None)
        if reader is not None:
            reader.subs.pop(key, None)

    @property
    def nodes(self) -> list[str]:
        """The nodes read from now (one for a single Redis)."""
        return [name for name, reader in self._readers.items() if reader.subs]

    async def _node_failed(self) -> None:
        """A node stopped answering: re-read the cluster's slot map, so sessions that resubscribe
        go to the replica promoted in its place."""
        if isinstance(self.r, RedisCluster):
            with contextlib.suppress(*REDIS_ERRORS):
                await self.r.nodes_manager.initialize()

    async def aclose(self) -> None:
        for reader in list(self._readers.values()):
            if reader.task is not None:
                reader.task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await reader.task
            await reader.release()
        self._readers.clear()
        self._where.clear()

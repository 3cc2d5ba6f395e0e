"""Auto-pipelining: XADDs awaited by many sessions at once go to Redis as one pipeline.

The gateway publishes one audio frame per browser every 20 ms. One command per frame means one
socket write, one wake-up and redis-py's per-command bookkeeping per frame, which the profile
showed as the gateway's largest cost. Here every XADD issued while a batch is in flight waits in
a queue and the next batch carries all of them: one write and one read per batch, whatever the
number of sessions. Each caller still awaits its own entry id (so a session's frames stay in
order and its errors reach it), and a batch never exceeds `max_batch` commands.

Coalescing (`linger_s`, AUDIO_BATCH_MS): the first frame of a batch waits that long for others
before it goes, so under load one write carries tens of frames instead of one or two (the
profile showed the socket write per small batch as the gateway's largest single cost). It bounds
the latency it adds; 0 sends a lone frame at once.

On a single Redis the batch is packed by hiredis (C) and written on a connection this writer holds,
its replies read raw: redis-py's pipeline builds Python objects for every command and reply,
which at 50 frames per second per browser was a tenth of the gateway's CPU.

On a Redis Cluster there is one queue (and one pipeline in flight) per node, by the slot of each
key: a node that fails or fails over holds up and fails only the frames bound for it, never the
other nodes' sessions. A single Redis is one node, so one queue, as before.
"""

from __future__ import annotations

import asyncio
import math
from collections import deque
from typing import Any

import hiredis
import redis.asyncio as aioredis
from prometheus_client import Counter
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import ResponseError

BATCHES = Counter("redis_pipelined_batches_total", "Round trips that carried auto-pipelined XADDs")
COMMANDS = Counter("redis_pipelined_commands_total", "XADDs sent through auto-pipelining")


class PipelinedXadd:
    def __init__(self, r: aioredis.Redis, *, max_batch: int = 512, linger_s: float = 0.0) -> None:
        self.r = r
        self.max_batch = max_batch
        self.linger_s = linger_s
        self._conn: aioredis.Connection | None = None  # single Redis: the connection batches go on
        self._queues: dict[str, deque[tuple[str, dict[str, Any], int, asyncio.Future[bytes]]]] = {}
        self._flushers: dict[str, asyncio.Task[None]] = {}
        self.batches = 0  # for metrics and tests: how many round trips carried the commands
        self.commands = 0
        self._cluster = isinstance(r, RedisCluster)  # (asked once, not per frame)

    def _node(self, key: str) -> str:
        if self._cluster:
            try:
                return self.r.get_node_from_key(key).name
            except Exception:  # no slot map yet: the cluster client finds the node itself
                return ""
        return ""

    async def xadd(self, key: str, fields: dict[str, Any], maxlen: int) -> bytes:
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        node = self._node(key)
        queue = self._queues.get(node)
        if queue is None:
            queue = self._queues[node] = deque()
        queue.append((key, fields, maxlen, future))
        flusher = self._flushers.get(node)
        if flusher is None or flusher.done():
            self._flushers[node] = asyncio.create_task(self._flush(queue))
        return await future

    async def _execute(self, batch: list[tuple[str, dict[str, Any], int, asyncio.Future[bytes]]]) -> list[Any]:
        """One round trip for the batch. On a cluster, commands that failed for a node failing over
        are sent again with backoff (see common.bus), so their frames are late, not lost, and only
        this node's queue waits."""
        if not self._cluster:
            return await self._execute_raw(batch)
        pipe = self.r.pipeline(transaction=False)
        for key, fields, maxlen, _ in batch:
            pipe.xadd(key, fields, maxlen=maxlen, approximate=True)
        from common.bus import FAILOVER_S, _RedisCluster

        loop = asyncio.get_running_loop()
        deadline, delay = loop.time() + FAILOVER_S, 0.05
        results: list[Any] = [None] * len(batch)
        todo = list(range(len(batch)))
        while True:
            try:
                got = await pipe.execute(raise_on_error=False)
            except Exception as exc:
                if not _RedisCluster.retryable(exc):
                    raise
                got = [exc] * len(todo)
            again = []
            for i, result in zip(todo, got, strict=True):
                results[i] = result
                if isinstance(result, Exception) and _RedisCluster.retryable(result):
                    again.append(i)
            if not again or loop.time() + delay > deadline:
                return results
            await asyncio.sleep(delay)
            delay = min(1.0, delay * 2)
            todo = again
            pipe = self.r.pipeline(transaction=False)
            for i in todo:
                key, fields, maxlen, _ = batch[i]
                pipe.xadd(key, fields, maxlen=maxlen, approximate=True)

    async def _execute_raw(self, batch: list[tuple[str, dict[str, Any], int, asyncio.Future[bytes]]]) -> list[Any]:
        """One write, one read of as many replies, on a connection held across batches; a Redis
        error reply is that command's result. A broken connection is reopened and the batch sent
        again with the client's own retry policy (as redis-py's pipeline does)."""
        packed = b"".join(
            hiredis.pack_command((b"XADD", key, b"MAXLEN", b"~", maxlen, b"*", *_flat(fields)))
            for key, fields, maxlen, _ in batch
        )
        if self._conn is None:
            self._conn = await self.r.connection_pool.get_connection()
        conn = self._conn

        async def once() -> list[Any]:
            await conn.send_packed_command(packed, False)
            results: list[Any] = []
            # One socket timeout for the whole batch's replies, not a timer per reply (that was a
            # twentieth of the gateway's CPU).
            async with asyncio.timeout(conn.socket_timeout):
                for _ in batch:
                    try:
                        results.append(await conn.read_response(timeout=math.inf))
                    except ResponseError as exc:  # that command failed; the connection is in step
                        results.append(exc)
            return results

        async def broken(_error: BaseException) -> None:
            await conn.disconnect()

        try:
            return await conn.retry.call_with_retry(once, broken)
        except BaseException:
            await conn.disconnect()  # replies may still be on their way: never reuse it mid-batch
            raise

    async def _flush(self, queue: deque[tuple[str, dict[str, Any], int, asyncio.Future[bytes]]]) -> None:
        if self.linger_s:
            await asyncio.sleep(self.linger_s)  # let the frames of other sessions join this batch
        while queue:
            batch = [queue.popleft() for _ in range(min(self.max_batch, len(queue)))]
            try:
                results = await self._execute(batch)
            except BaseException as exc:  # the connection failed: every caller in the batch hears it
                for *_, future in batch:
                    if not future.done():
                        future.set_exception(exc if isinstance(exc, Exception) else ConnectionError("cancelled"))
                if not isinstance(exc, Exception):
                    raise
                continue
            finally:
                self.batches += 1
                self.commands += len(batch)
                BATCHES.inc()
                COMMANDS.inc(len(batch))
            for (*_, future), result in zip(batch, results, strict=True):
                if future.done():  # its caller was cancelled (socket closed) meanwhile
                    continue
                if isinstance(result, Exception):
                    future.set_exception(result)
                else:
                    future.set_result(result)


def _flat(fields: dict[str, Any]) -> list[Any]:
    return [item for pair in fields.items() for item in pair]

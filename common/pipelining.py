"""Auto-pipelining: XADDs awaited by many sessions at once go to Redis as one pipeline.

The gateway publishes one audio frame per browser every 20 ms. One command per frame means one
socket write, one wake-up and redis-py's per-command bookkeeping per frame, which the profile
showed as the gateway's largest cost. Here every XADD issued while a batch is in flight waits in
a queue and the next batch carries all of them: one write and one read per batch, whatever the
number of sessions. A lone frame still goes out at once (no timer, no added latency), each caller
still awaits its own entry id (so a session's frames stay in order and its errors reach it), and a
batch never exceeds `max_batch` commands.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any

import redis.asyncio as aioredis
from prometheus_client import Counter

BATCHES = Counter("redis_pipelined_batches_total", "Round trips that carried auto-pipelined XADDs")
COMMANDS = Counter("redis_pipelined_commands_total", "XADDs sent through auto-pipelining")


class PipelinedXadd:
    def __init__(self, r: aioredis.Redis, *, max_batch: int = 512) -> None:
        self.r = r
        self.max_batch = max_batch
        self._queue: deque[tuple[str, dict[str, Any], int, asyncio.Future[bytes]]] = deque()
        self._flusher: asyncio.Task[None] | None = None
        self.batches = 0  # for metrics and tests: how many round trips carried the commands
        self.commands = 0

    async def xadd(self, key: str, fields: dict[str, Any], maxlen: int) -> bytes:
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._queue.append((key, fields, maxlen, future))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush())
        return await future

    async def _flush(self) -> None:
        while self._queue:
            batch = [self._queue.popleft() for _ in range(min(self.max_batch, len(self._queue)))]
            pipe = self.r.pipeline(transaction=False)
            for key, fields, maxlen, _ in batch:
                pipe.xadd(key, fields, maxlen=maxlen, approximate=True)
            try:
                results = await pipe.execute(raise_on_error=False)
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

"""Redis Streams helpers: connect, publish events/turns/audio with bounded streams, read them.

Every XADD here carries a MAXLEN so no stream grows without bound.
"""

from __future__ import annotations

import asyncio
import logging

import orjson
import redis.asyncio as aioredis
from pydantic import BaseModel
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from common import keys, tracing
from common.models import Turn, turn_adapter
from common.pipelining import PipelinedXadd
from common.settings import Settings

log = logging.getLogger(__name__)


def connect(settings: Settings, *, max_connections: int = 2000) -> aioredis.Redis:
    """A Redis client that retries with backoff, so a Redis restart is survived, not fatal."""
    return aioredis.Redis.from_url(
        settings.redis_url,
        decode_responses=False,
        max_connections=max_connections,
        health_check_interval=15,
        # Longer than any BLOCK we use (≤ 5 s), so only a read that hangs on a dead socket times out
        # (and is retried) instead of waiting forever.
        socket_timeout=15,
        socket_keepalive=True,
        retry=Retry(ExponentialWithJitterBackoff(base=0.05, cap=2.0), retries=8),
        retry_on_error=[RedisConnectionError, RedisTimeoutError],
    )


async def wait_for_redis(r: aioredis.Redis, timeout_s: float = 30.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        try:
            await r.ping()
            return
        except (RedisConnectionError, RedisTimeoutError, OSError):
            if asyncio.get_running_loop().time() > deadline:
                raise
            await asyncio.sleep(0.2)


def dump(model: BaseModel) -> bytes:
    return orjson.dumps(model.model_dump(mode="json", exclude_none=True))


class Bus:
    """Publishing and reading of one deployment's streams, with its bounds from settings."""

    def __init__(self, r: aioredis.Redis, settings: Settings) -> None:
        self.r = r
        self.settings = settings
        self.audio_writer = PipelinedXadd(r)  # many sessions' frames, one round trip

    # ---- events:{sid} (to the browser)

    async def publish_event(self, sid: str, event: BaseModel, pcm: bytes | None = None) -> bytes:
        fields: dict[str, bytes] = {"e": dump(event)}
        if pcm is not None:
            fields["pcm"] = pcm
        tp = tracing.event_published(sid, event)  # the trace context of a turn's reply, if traced
        if tp:
            fields["tp"] = tp
        return await self.r.xadd(
            keys.events(sid), fields, maxlen=self.settings.events_stream_maxlen, approximate=True
        )

    # ---- turns:{sid} (to the avatar worker)

    async def publish_turn(self, sid: str, turn: BaseModel) -> bytes:
        fields = {"t": dump(turn)}
        tp = tracing.turn_published(sid, turn)  # a user turn starts its trace here
        if tp:
            fields["tp"] = tp
        return await self.r.xadd(keys.turns(sid), fields, maxlen=self.settings.turns_stream_maxlen, approximate=True)

    async def read_turns(
        self, sid: str, after: bytes | str, block_ms: int, count: int = 32
    ) -> list[tuple[bytes, Turn]]:
        reply = await self.r.xread({keys.turns(sid): after}, count=count, block=block_ms)
        out: list[tuple[bytes, Turn]] = []
        for _stream, entries in reply or []:
            for entry_id, fields in entries:
                try:
                    turn = turn_adapter.validate_json(fields[b"t"])
                except Exception:  # a malformed entry must not stop the session
                    log.warning("skipping malformed turn %r in session %s", entry_id, sid)
                    continue
                out.append((entry_id, turn))
                if b"tp" in fields and turn.type == "user.turn":
                    tracing.turn_read(sid, turn.turn_id, fields[b"tp"])
        return out

    # ---- audio:{sid} (to the STT worker)

    async def publish_audio(self, sid: str, pcm: bytes, seq: bytes | None = None) -> bytes:
        """`seq`: `<socket id>:<n>`, n counting this socket's frames from 1, so the STT worker can
        count frames that MAXLEN trimmed before it read them (it fell that far behind)."""
        fields = {"pcm": pcm} if seq is None else {"pcm": pcm, "seq": seq}
        return await self.audio_writer.xadd(keys.audio(sid), fields, self.settings.audio_stream_maxlen)

    async def publish_audio_end(self, sid: str, reason: str) -> bytes:
        return await self.r.xadd(
            keys.audio(sid), {"end": reason.encode()}, maxlen=self.settings.audio_stream_maxlen, approximate=True
        )

"""The session record in Redis: create, read, authenticate, end.

Ending is idempotent and in-band: the first caller flips the state, publishes `session.ended`,
drops end markers into the audio and turn streams (which wakes the owning workers) and sets
every key of the session to expire.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
import uuid

import orjson
import redis.asyncio as aioredis

from common import keys
from common.bus import Bus
from common.models import SessionConfig, SessionEnd, SessionEnded

STATE_CREATED = "created"
STATE_LIVE = "live"
STATE_ENDED = "ended"

_UPDATE_IF_EXISTS = (
    "if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end redis.call('HSET', KEYS[1], unpack(ARGV)) return 1"
)
# Presence: `conns:{sid}` maps socket id → expiry. Expired entries are pruned only by a touch (the
# touched entry outlives them) or by the last drop (which records `disconnected_at` = now, later
# than them), so the latest expiry, and with it when the page left, is never lost.
_TOUCH_CONNECTION = (
    "local s = redis.call('HGET', KEYS[1], 'state') "
    "if (not s) or s == 'ended' then return 0 end "
    "redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', '(' .. ARGV[2]) "
    "redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1]) "
    "redis.call('EXPIRE', KEYS[2], ARGV[4]) return 1"
)
_DROP_CONNECTION = (
    "redis.call('ZREM', KEYS[2], ARGV[1]) "
    "if redis.call('ZCOUNT', KEYS[2], '(' .. ARGV[2], '+inf') > 0 then return 1 end "
    "redis.call('DEL', KEYS[2]) "
    "if redis.call('EXISTS', KEYS[1]) == 1 then redis.call('HSET', KEYS[1], 'disconnected_at', ARGV[2]) end "
    "return 0"
)
PRESENCE_EXPIRY_FACTOR = 3  # a socket entry outlives this many missed refreshes


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_session_id() -> str:
    return uuid.uuid4().hex


class SessionStore:
    def __init__(self, r: aioredis.Redis, bus: Bus) -> None:
        self.r = r
        self.bus = bus
        self.settings = bus.settings

    async def create(self, config: SessionConfig) -> tuple[str, str]:
        sid = new_session_id()
        token = secrets.token_urlsafe(32)
        now = time.time()
        # One transaction per slot (a cluster refuses a cross-slot MULTI): the session's own hash
        # first, then the index, which only lists sessions (a session missing from it still works).
        async with self.r.pipeline(transaction=True) as pipe:
            pipe.hset(
                keys.session(sid),
                mapping={
                    keys.F_STATE: STATE_CREATED,
                    keys.F_TOKEN_HASH: hash_token(token),
                    keys.F_CREATED: f"{now:.3f}",
                    keys.F_LAST_SEEN: f"{now:.3f}",
                    keys.F_DISCONNECTED_AT: f"{now:.3f}",
                    keys.F_CONFIG: orjson.dumps(config.model_dump(mode="json")),
                },
            )
            pipe.expire(keys.session(sid), int(self.settings.session_max_s) + 60)
            await pipe.execute()
        await self.r.zadd(keys.SESSIONS_INDEX, {sid: now})
        return sid, token

    async def get(self, sid: str) -> dict[str, str] | None:
        raw = await self.r.hgetall(keys.session(sid))
        if not raw:
            return None
        return {k.decode(): v.decode() for k, v in raw.items()}

    async def config(self, sid: str) -> SessionConfig:
        raw = await self.r.hget(keys.session(sid), keys.F_CONFIG)
        return SessionConfig.model_validate_json(raw) if raw else SessionConfig()

    async def check_token(self, sid: str, token: str) -> bool | None:
        """True/False for a known session; None when the session does not exist."""
        stored = await self.r.hget(keys.session(sid), keys.F_TOKEN_HASH)
        if stored is None:
            return None
        return hmac.compare_digest(stored.decode(), hash_token(token))

    async def set_fields(self, sid: str, **fields: str) -> bool:
        """Update a session that exists; never re-create the hash of one whose state is gone
        (expired, or lost in a Redis restart), which would leave a session with no state."""
        args = [x for pair in fields.items() for x in pair]
        return bool(await self.r.eval(_UPDATE_IF_EXISTS, 1, keys.session(sid), *args))

    @property
    def presence_expiry_s(self) -> float:
        return PRESENCE_EXPIRY_FACTOR * self.settings.browser_presence_refresh_s

    async def touch_connection(self, sid: str, conn_id: str) -> bool:
        """Mark a browser socket live for `presence_expiry_s` more; the gateway repeats this every
        `browser_presence_refresh_s`, so a socket whose gateway died stops counting on its own.
        False when the session is ended or gone (nothing is written)."""
        now = time.time()
        key_ttl = int(self.settings.session_max_s) + 60
        return bool(await self.r.eval(
            _TOUCH_CONNECTION, 2, keys.session(sid), keys.conns(sid),
            conn_id, f"{now:.3f}", f"{now + self.presence_expiry_s:.3f}", key_ttl,
        ))

    async def drop_connection(self, sid: str, conn_id: str) -> None:
        """A socket closed cleanly: it stops counting now, and if it was the last live one the
        grace period starts now."""
        await self.r.eval(_DROP_CONNECTION, 2, keys.session(sid), keys.conns(sid), conn_id, f"{time.time():.3f}")

    async def disconnected_since(self, sid: str) -> float | None:
        """None while a browser socket is live; else when the last one closed or expired (the
        creation time if none ever connected)."""
        async with self.r.pipeline(transaction=False) as pipe:
            pipe.hget(keys.session(sid), keys.F_DISCONNECTED_AT)
            pipe.zrange(keys.conns(sid), -1, -1, withscores=True)
            left_at, latest = await pipe.execute()
        expires = float(latest[0][1]) if latest else 0.0
        if expires > time.time():
            return None
        return max(float(left_at or 0), expires)

    async def mark_live(self, sid: str) -> None:
        """created → live; an ended session stays ended."""
        await self.r.eval(
            "if redis.call('HGET', KEYS[1], 'state') == 'created' then "
            "redis.call('HSET', KEYS[1], 'state', 'live') end return 1", 1, keys.session(sid),
        )

    async def is_ended(self, sid: str) -> bool:
        """Ended, or gone: a session without a state (expired, lost with Redis) is over too."""
        state = await self.r.hget(keys.session(sid), keys.F_STATE)
        return state is None or state.decode() == STATE_ENDED

    async def avatar_is_talking(self, sid: str) -> bool:
        """A reply is being spoken (the avatar worker holds `avatar_reply` from its start to its end)."""
        return bool(await self.r.hexists(keys.session(sid), keys.F_AVATAR_REPLY))

    async def end(self, sid: str, reason: str) -> bool:
        """End the session once; returns False if it was already ended or never existed."""
        # HSETNX-like flip on a field that only ever goes to "ended": the first caller wins. The
        # presence of an ended session means nothing and goes in the same step, so nobody sees
        # an ended session that still counts sockets.
        previous = await self.r.eval(
            "local s = redis.call('HGET', KEYS[1], 'state') "
            "if (not s) or s == 'ended' then return 0 end "
            "redis.call('HSET', KEYS[1], 'state', 'ended', 'ended_reason', ARGV[1]) "
            "redis.call('DEL', KEYS[2]) return 1",
            2, keys.session(sid), keys.conns(sid), reason,
        )
        if not previous:
            return False
        await self.bus.publish_event(sid, SessionEnded(reason=reason))
        await self.bus.publish_audio_end(sid, reason)
        await self.bus.publish_turn(sid, SessionEnd(reason=reason))
        ttl = self.settings.ended_session_ttl_s
        async with self.r.pipeline(transaction=False) as pipe:
            for k in keys.all_session_keys(sid):
                pipe.expire(k, ttl)
            pipe.zrem(keys.SESSIONS_INDEX, sid)
            await pipe.execute()
        return True

    async def live_ids(self, limit: int = 1000) -> list[str]:
        return [s.decode() for s in await self.r.zrange(keys.SESSIONS_INDEX, 0, limit - 1)]

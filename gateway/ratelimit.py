"""Per-client token buckets: shared by every gateway through Redis, or in this process's memory.

Used to stop one client from creating sessions in a flood (each session claims worker capacity
and may start a paid vendor avatar). `SharedTokenBuckets` (the default, SESSION_CREATE_RATE_SCOPE
=redis) keeps them in Redis, so N gateways behind a load balancer allow the rate once, not N
times. `TokenBuckets` keeps them in one process (SESSION_CREATE_RATE_SCOPE=process, and the
fallback while Redis does not answer); its table holds at most `max_clients` buckets, dropping
the least recently seen, so a flood of addresses cannot grow memory without bound (a dropped
client simply starts again with a full bucket).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

from common.bus import REDIS_ERRORS
from common.keys import rate_limit


class TokenBuckets:
    def __init__(
        self,
        rate_per_min: float,
        burst: int,
        max_clients: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.rate_per_s = rate_per_min / 60.0
        self.burst = float(burst)
        self.max_clients = max_clients
        self.clock = clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # client -> (tokens, at)

    @property
    def enabled(self) -> bool:
        return self.rate_per_s > 0 and self.burst > 0

    def __len__(self) -> int:
        return len(self._buckets)

    def take(self, client: str) -> float:
        """Spend one token of `client`'s bucket: 0.0 when allowed, else the seconds until one is back."""
        if not self.enabled:
            return 0.0
        now = self.clock()
        tokens, at = self._buckets.pop(client, (self.burst, now))
        tokens = min(self.burst, tokens + (now - at) * self.rate_per_s)
        if tokens >= 1.0:
            tokens -= 1.0
            wait = 0.0
        else:
            wait = (1.0 - tokens) / self.rate_per_s
        self._buckets[client] = (tokens, now)  # re-inserted last: the most recently seen
        while len(self._buckets) > self.max_clients:
            self._buckets.popitem(last=False)
        return wait


class SharedTokenBuckets:
    """The same token buckets kept in Redis, so every gateway draws from one bucket per client:
    N gateways behind a load balancer allow the configured rate, not N times it.

    One key per client (`ratelimit:sessions:{client}`, a hash of tokens and time, one slot), updated
    by one script on the Redis clock (gateways' clocks may differ). Each key expires once its bucket
    would be full again, so Redis holds only clients seen within the last `burst / rate`. When Redis
    cannot answer, this gateway's own buckets decide (the per-process limit), so a Redis outage never
    opens the gate wide nor closes it for everyone.
    """

    TAKE_LUA = """
    local burst, rate = tonumber(ARGV[1]), tonumber(ARGV[2])
    local t = redis.call('TIME')
    local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
    local b = redis.call('HMGET', KEYS[1], 'tokens', 'at')
    local tokens = tonumber(b[1]) or burst
    local at = tonumber(b[2]) or now
    tokens = math.min(burst, tokens + math.max(0, now - at) * rate)
    local wait = 0
    if tokens >= 1 then tokens = tokens - 1 else wait = (1 - tokens) / rate end
    redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'at', tostring(now))
    redis.call('EXPIRE', KEYS[1], math.ceil(burst / rate) + 1)
    return tostring(wait)
    """

    def __init__(self, r, rate_per_min: float, burst: int, fallback: TokenBuckets | None = None) -> None:
        self.r = r
        self.rate_per_s = rate_per_min / 60.0
        self.burst = float(burst)
        self.fallback = fallback or TokenBuckets(rate_per_min, burst)
        self._take = r.register_script(self.TAKE_LUA)

    @property
    def enabled(self) -> bool:
        return self.rate_per_s > 0 and self.burst > 0

    async def take(self, client: str) -> float:
        """Spend one token of `client`'s bucket: 0.0 when allowed, else the seconds until one is back."""
        if not self.enabled:
            return 0.0
        try:
            wait = await self._take(keys=[rate_limit("sessions", client)], args=[self.burst, self.rate_per_s])
        except REDIS_ERRORS:
            return self.fallback.take(client)
        return float(wait.decode() if isinstance(wait, bytes) else wait)

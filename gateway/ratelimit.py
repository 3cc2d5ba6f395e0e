"""Per-client token buckets, kept in this process's memory and bounded in size.

Used to stop one client from creating sessions in a flood (each session claims worker capacity
and may start a paid vendor avatar). The buckets live in one gateway process, so N gateways
behind a load balancer allow up to N times the rate; the table holds at most `max_clients`
buckets, dropping the least recently seen, so a flood of addresses cannot grow memory without
bound (a dropped client simply starts again with a full bucket).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable


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

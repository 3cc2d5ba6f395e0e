"""One retry policy for calls to outside services: exponential backoff with jitter, `Retry-After` honoured.

Jitter keeps many workers that failed together (a vendor outage) from retrying in lock-step; a
server's `Retry-After` wins over our own guess, within a cap, so a rate-limited vendor is not hammered.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Backoff:
    base_s: float = 0.25
    max_s: float = 5.0
    jitter: float = 0.5  # the share of each delay that is random
    max_retry_after_s: float = 30.0

    def delay(self, attempt: int, retry_after_s: float | None = None) -> float:
        """Seconds to wait before retry number `attempt` (0 = the first retry)."""
        if retry_after_s is not None and retry_after_s >= 0:
            return min(retry_after_s, self.max_retry_after_s)
        full = min(self.max_s, self.base_s * 2 ** max(0, attempt))
        return full * (1 - self.jitter) + full * self.jitter * random.random()


async def retry(
    call: Callable[[], Awaitable[T]], *, retries: int, retryable: Callable[[Exception], bool],
    backoff: Backoff = Backoff(), retry_after: Callable[[Exception], float | None] = lambda _exc: None,
    on_retry: Callable[[Exception, float], None] | None = None,
) -> T:
    """`call()`, retried up to `retries` times while `retryable(exc)`; the last failure is raised."""
    attempt = 0
    while True:
        try:
            return await call()
        except Exception as exc:
            if attempt >= retries or not retryable(exc):
                raise
            wait = backoff.delay(attempt, retry_after(exc))
            if on_retry is not None:
                on_retry(exc, wait)
            attempt += 1
            await asyncio.sleep(wait)


def parse_retry_after(value: str | None) -> float | None:
    """`Retry-After` in seconds (the delta form; an HTTP date is rare from APIs and is ignored)."""
    if not value:
        return None
    try:
        return max(0.0, float(value.strip()))
    except ValueError:
        return None

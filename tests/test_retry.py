"""The one retry helper: exponential backoff with jitter, a server's Retry-After wins (within a cap)."""

from __future__ import annotations

import asyncio

import pytest

from common.retry import Backoff, parse_retry_after, retry


def test_delays_grow_with_jitter_and_respect_retry_after() -> None:
    b = Backoff(base_s=0.25, max_s=2.0, jitter=0.5, max_retry_after_s=10.0)
    for attempt, full in ((0, 0.25), (1, 0.5), (2, 1.0), (5, 2.0)):
        delays = {b.delay(attempt) for _ in range(50)}
        assert all(full * 0.5 <= d <= full for d in delays) and len(delays) > 1  # jittered, capped
    assert b.delay(3, retry_after_s=7.0) == 7.0  # the server knows best
    assert b.delay(3, retry_after_s=120.0) == 10.0  # within a cap
    assert parse_retry_after("3") == 3.0 and parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") is None


async def test_retry_retries_only_what_is_retryable(monkeypatch: pytest.MonkeyPatch) -> None:
    waits: list[float] = []

    async def no_sleep(seconds: float) -> None:
        waits.append(seconds)

    monkeypatch.setattr(asyncio, "sleep", no_sleep)
    calls = 0

    class Busy(Exception):
        retry_after_s = 4.0

    async def flaky() -> str:
        nonlocal calls
        calls += 1
        if calls < 3:
            raise Busy()
        return "ok"

    assert await retry(flaky, retries=3, retryable=lambda e: isinstance(e, Busy),
                       retry_after=lambda e: getattr(e, "retry_after_s", None)) == "ok"
    assert calls == 3 and waits == [4.0, 4.0]

    async def broken() -> None:
        raise ValueError("not transient")

    with pytest.raises(ValueError):
        await retry(broken, retries=5, retryable=lambda e: isinstance(e, Busy))
    assert len(waits) == 2  # no retry of a permanent failure

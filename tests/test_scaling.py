"""Capacity, admission control and graceful hand-back, with real worker processes."""

from __future__ import annotations

import asyncio
import signal

import httpx
import pytest

from common import keys
from tests.client import Browser, create_session
from tests.conftest import start_stack
from tests.speech import speech_pcm

pytestmark = pytest.mark.slow


async def _eventually(check, timeout_s: float = 20.0):
    async with asyncio.timeout(timeout_s):
        while True:
            result = await check()
            if result:
                return result
            await asyncio.sleep(0.1)


async def test_full_pool_gets_503_and_readyz_says_why(redis_url: str):
    stack = start_stack(redis_url, STT_CAPACITY="1")
    try:
        first = Browser(await create_session(stack.base_url))
        await first.connect()
        await first.wait_type("session.ready", 30)
        async with httpx.AsyncClient(base_url=stack.base_url) as http:
            refused = await _eventually(lambda: _post_status(http, 503))
            assert "stt workers are busy" in refused.json()["detail"]
            assert refused.headers["retry-after"] == "5"
            # Full pools are admission control, per request: the gateway itself can serve, so it
            # stays ready (as a Kubernetes readiness probe it must not leave the load balancer).
            ready = await http.get("/readyz")
            assert ready.status_code == 200 and ready.json()["ready"] is True
            pools = ready.json()["pools"]
            assert pools["stt"]["has_room"] is False and pools["avatar"]["has_room"] is True
            await first.send_json({"type": "end"})
            await _eventually(lambda: _post_status(http, 201))
            assert (await http.get("/readyz")).status_code == 200
        await first.close()
    finally:
        stack.stop_all()


async def _post_status(http: httpx.AsyncClient, wanted: int):
    resp = await http.post("/v1/sessions")
    return resp if resp.status_code == wanted else None


async def test_sigterm_hands_sessions_back_at_once(redis_url: str):
    # A lease of 10 minutes: only a hand-back, not lease expiry, can move the session in time.
    stack = start_stack(redis_url, JOB_LEASE_MS="600000")
    try:
        second = stack.start("stt-worker", JOB_LEASE_MS="600000")
        stack.wait_workers("stt", 2)
        browser = Browser(await create_session(stack.base_url))
        await browser.connect()
        await browser.wait_type("session.ready", 30)
        r = stack.redis()
        owner_key = keys.session(browser.session.session_id)
        owner = (await _eventually(lambda: _owner(r, owner_key))).decode()
        pid = int(owner.split("-")[-2])
        [name] = [n for n, p in stack.procs.items() if p.pid == pid]
        stack.kill(name, signal.SIGTERM)
        assert stack.procs[name].returncode == 0  # a clean exit
        new_owner = await _eventually(lambda: _owner(r, owner_key, other_than=owner))
        assert new_owner.decode() != owner
        await browser.stream(speech_pcm("Good evening, how are you?"))
        final = await browser.wait_type("transcript.final", 60)
        assert final["text"]
        assert second in stack.procs
        await browser.close()
    finally:
        stack.stop_all()


async def _owner(r, key: str, other_than: str | None = None):
    value = r.hget(key, keys.F_STT_OWNER)
    if value is None or (other_than is not None and value.decode() == other_than):
        return None
    return value

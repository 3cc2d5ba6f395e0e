"""Faults injected on real processes: Redis restarting under a live stack."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator

import httpx
import pytest

from avatar_stack.up import free_port, redis_answers, redis_binary
from tests.client import Browser, create_session
from tests.conftest import start_stack

pytestmark = pytest.mark.slow


class RestartableRedis:
    """A private Redis without persistence that a test can restart on the same port."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.dir = tempfile.mkdtemp(prefix="test-redis-restart-")
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        binary = redis_binary()
        assert binary
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", self.dir],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 10
        while not redis_answers(self.url):
            assert time.monotonic() < deadline
            time.sleep(0.02)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(5)
            self.proc = None


@pytest.fixture
def restartable_redis() -> Iterator[RestartableRedis]:
    server = RestartableRedis()
    server.start()
    yield server
    server.stop()
    shutil.rmtree(server.dir, ignore_errors=True)


async def test_redis_restart_ends_lost_sessions_clearly_and_service_recovers(restartable_redis: RestartableRedis):
    stack = await asyncio.to_thread(start_stack, restartable_redis.url)
    try:
        browser = Browser(await create_session(stack.base_url))
        await browser.connect()
        await browser.wait_type("session.ready", 30)

        await asyncio.to_thread(restartable_redis.stop)
        await asyncio.sleep(1.0)  # the services notice and retry with backoff
        await asyncio.to_thread(restartable_redis.start)  # empty: every session's state is gone

        # The page is told, instead of hanging on a session that no longer exists: either the
        # socket closes for a reconnect (1011) or the session is reported ended.
        told_at = time.monotonic()
        async with asyncio.timeout(60):
            while browser.close_code is None and not browser.of_type("session.ended"):  # noqa: ASYNC110
                await asyncio.sleep(0.1)
        print(f"page told after {time.monotonic() - told_at:.1f} s (close code {browser.close_code})")
        assert browser.close_code in (None, 1000, 1011)
        if browser.close_code == 1011:
            again = Browser(browser.session)
            await again.connect()
            assert await again.wait_closed(15) in (4404, 1000)  # the session is gone: said clearly

        # Every service reconnected: a new session works end to end.
        await asyncio.to_thread(stack.wait_workers, "stt", 1, 60)
        await asyncio.to_thread(stack.wait_workers, "avatar", 1, 60)
        async with httpx.AsyncClient(base_url=stack.base_url) as http:
            assert (await http.get("/healthz")).status_code == 200
        fresh = Browser(await create_session(stack.base_url))
        await fresh.connect()
        await fresh.wait_type("session.ready", 30)
        await fresh.send_json({"type": "text", "text": "hello"})
        await fresh.wait_type("avatar.reply", 30)
        await fresh.close()
        stack.assert_alive()
    finally:
        await asyncio.to_thread(stack.stop_all)

"""Turn → first `agent.speak` latency with the LLM brain and LiveAvatar LITE (both faked).

Runs the real stack (gateway, STT worker, avatar worker as processes) against `tests/fakes/llm.py`
(streaming tokens every `--token-ms`) and `tests/fakes/liveavatar.py`, with local piper TTS. For
each of `--turns` user turns, the clock starts when the turn is added to `turns:{sid}` (what the
avatar worker reads) and stops when the fake LiveAvatar receives the reply's first `agent.speak`
chunk. Both ends are in this process, so they share one monotonic clock.

    .venv/bin/python -m bench.liveavatar_latency --turns 10
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import subprocess
import tempfile
import time

import redis.asyncio as aioredis

from avatar_stack.client import Browser, create_session
from avatar_stack.up import free_port, redis_answers, redis_binary
from common.bus import Bus
from common.models import UserTurn
from common.settings import Settings
from tests.conftest import start_stack
from tests.fakes.liveavatar import SANDBOX_AVATAR, FakeLiveAvatar
from tests.fakes.llm import FakeLlm

REPLY = "Sure, here is a short answer for you. It has a second sentence as well."


async def main(turns: int, token_ms: float) -> None:
    port = free_port()
    workdir = tempfile.mkdtemp(prefix="bench-redis-")
    proc = subprocess.Popen(  # noqa: ASYNC220 - a one-off setup step
        [redis_binary(), "--port", str(port), "--save", "", "--dir", workdir],
        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
    )
    url = f"redis://127.0.0.1:{port}/0"
    while not redis_answers(url):
        time.sleep(0.02)  # noqa: ASYNC251
    try:
        with FakeLiveAvatar(api_key="bench-key") as fake, FakeLlm(token_delay_s=token_ms / 1000) as llm:
            llm.default_reply = REPLY
            stack = start_stack(url, AVATAR_PROVIDER="liveavatar", LIVEAVATAR_API_KEY="bench-key",
                                LIVEAVATAR_SERVER_URL=fake.url, LIVEAVATAR_AVATAR_ID=SANDBOX_AVATAR,
                                LLM_BASE_URL=llm.url, LOG_LEVEL="WARNING")
            try:
                await measure(stack.base_url, url, fake, turns)
            finally:
                stack.stop_all()
    finally:
        proc.terminate()
        proc.wait(5)
        shutil.rmtree(workdir, ignore_errors=True)


async def measure(base_url: str, redis_url: str, fake: FakeLiveAvatar, turns: int) -> None:
    browser = Browser(await create_session(base_url))
    await browser.connect()
    await browser.wait_type("session.ready", 60)
    r = aioredis.Redis.from_url(redis_url)
    bus = Bus(r, Settings(_env_file=None, redis_url=redis_url))
    vendor = fake.only()
    results = []
    for i in range(turns + 1):  # the first turn warms up (piper, connections) and is not counted
        seen = {x.event_id for x in vendor.of_type("agent.speak")}
        t0 = time.monotonic()
        await bus.publish_turn(browser.session.session_id, UserTurn(turn_id=f"b{i}", text="hi", source="text"))
        while not (new := [x for x in vendor.of_type("agent.speak") if x.event_id not in seen]):  # noqa: ASYNC110
            await asyncio.sleep(0.001)
        if i:
            results.append((new[0].at - t0) * 1000)
        before = len(browser.of_type("avatar.stopped_talking"))
        await browser.wait_for(lambda _e, b=before: len(browser.of_type("avatar.stopped_talking")) > b, 60)
    results.sort()
    p95 = results[min(len(results) - 1, round(0.95 * (len(results) - 1)))]
    print(f"turn -> first agent.speak over {turns} turns: median {statistics.median(results):.0f} ms, "
          f"p95 {p95:.0f} ms, min {results[0]:.0f} ms, max {results[-1]:.0f} ms")
    await browser.close()
    await r.aclose()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--turns", type=int, default=10)
    parser.add_argument("--token-ms", type=float, default=20.0)
    args = parser.parse_args()
    asyncio.run(main(args.turns, args.token_ms))

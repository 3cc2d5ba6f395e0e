"""LiveAvatar (LITE mode) with the LLM brain, as real processes against the fakes, on loopback.

`tests/fakes/liveavatar.py` plays the vendor (REST + the LITE WebSocket), `tests/fakes/llm.py` an
OpenAI-compatible model; the stack is gateway + STT worker + avatar worker(s). Every wait has a
generous guard so a bug fails instead of hanging; nothing asserts on wall-clock speed.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import orjson
import pytest

from avatar_service.providers.liveavatar import F_VENDOR_ID
from common import keys
from tests.client import Browser, create_session
from tests.conftest import Stack, start_stack
from tests.fakes.liveavatar import SANDBOX_AVATAR, FakeLiveAvatar, FakeSession
from tests.fakes.llm import FakeLlm

KEY = "la-test-key-3f9d1c0e7a"
LLM_KEY = "sk-llm-test-key-77a1b2"
GUARD_S = 45.0
RATE = 24_000


async def until(condition: Callable[[], Any], guard_s: float = GUARD_S, step_s: float = 0.02) -> Any:
    deadline = time.monotonic() + guard_s
    while not (value := condition()):
        assert time.monotonic() < deadline, "condition not met"
        await asyncio.sleep(step_s)
    return value


class Run:
    def __init__(self, stack: Stack, fake: FakeLiveAvatar, llm: FakeLlm) -> None:
        self.stack = stack
        self.fake = fake
        self.llm = llm
        self.browsers: list[Browser] = []

    async def browser(self) -> Browser:
        browser = Browser(await create_session(self.stack.base_url))
        self.browsers.append(browser)
        await browser.connect()
        return browser

    def vendor(self, sid: str) -> FakeSession:
        raw = self.stack.redis().hget(keys.session(sid), F_VENDOR_ID)
        assert raw, "no vendor session recorded"
        return self.fake.sessions[raw.decode()]

    def history(self, sid: str) -> list[dict[str, str]]:
        return [orjson.loads(m) for m in self.stack.redis().lrange(keys.history(sid), 0, -1)]

    async def delete(self, browser: Browser) -> None:
        s = browser.session
        async with httpx.AsyncClient(base_url=self.stack.base_url) as http:
            resp = await http.delete(f"/v1/sessions/{s.session_id}", headers={"Authorization": f"Bearer {s.token}"})
        assert resp.status_code == 204

    def owner_process(self, sid: str) -> str:
        owner = self.stack.redis().hget(keys.session(sid), keys.F_AVATAR_OWNER).decode()
        pid = int(owner.split("-")[-2])
        [name] = [n for n, p in self.stack.procs.items() if p.pid == pid and p.poll() is None]
        return name


async def talk(browser: Browser, text: str) -> dict[str, Any]:
    before = len(browser.of_type("avatar.stopped_talking"))
    await browser.send_json({"type": "text", "text": text})
    return await browser.wait_for(
        lambda e: e["type"] == "avatar.stopped_talking" and len(browser.of_type("avatar.stopped_talking")) > before,
        GUARD_S,
    )


@pytest.fixture(scope="module")
def run(redis_url: str) -> Iterator[Run]:
    with FakeLiveAvatar(api_key=KEY, sandbox_limit_s=600) as fake, FakeLlm(api_key=LLM_KEY, token_delay_s=0.01) as llm:
        stack = start_stack(
            redis_url, AVATAR_PROVIDER="liveavatar", LIVEAVATAR_API_KEY=KEY, LIVEAVATAR_SERVER_URL=fake.url,
            LIVEAVATAR_AVATAR_ID=SANDBOX_AVATAR, LIVEAVATAR_SANDBOX="true", LIVEAVATAR_KEEPALIVE_S="0.3",
            LLM_BASE_URL=llm.url, LLM_API_KEY=LLM_KEY, LLM_MODEL="fake-model", SESSION_GRACE_S="1",
        )
        try:
            yield Run(stack, fake, llm)
        finally:
            stack.stop_all()


REPLIES = [
    "Avatar stack is an open avatar system. It runs on your own machines.",
    "You scale it by adding workers. They share one Redis.",
    "It supports HeyGen, LiveAvatar and a local face. Pick one with a setting.",
]


@pytest.mark.slow
async def test_three_turns_from_the_llm_reach_the_avatar_as_24khz_audio(run: Run) -> None:
    run.llm.script(list(REPLIES))
    browser = await run.browser()
    ready = await browser.wait_type("session.ready", GUARD_S)
    sid = browser.session.session_id
    vendor = run.vendor(sid)
    assert ready["provider"] == "liveavatar"
    assert ready["livekit"] == {"url": run.fake.livekit_url, "token": "lk-client-" + vendor.session_id,
                                "avatar_identity": "heygen"}  # the page takes tracks from it only
    assert vendor.request["mode"] == "LITE" and vendor.request["is_sandbox"] is True
    assert vendor.request["avatar_id"] == SANDBOX_AVATAR
    assert vendor.request["video_settings"] == {"quality": "high", "encoding": "H264"}
    for question in ("What is avatar stack?", "How do I scale it?", "Which avatars?"):
        stopped = await talk(browser, question)
        assert stopped["interrupted"] is False

    speaks = vendor.of_type("agent.speak")
    event_ids = list(dict.fromkeys(r.event_id for r in speaks))
    assert len(event_ids) == 3  # one event_id per reply
    for event_id, text in zip(event_ids, REPLIES, strict=True):
        mine = [i for i, r in enumerate(vendor.received) if r.event_id == event_id]
        kinds = [vendor.received[i].type for i in mine]
        assert kinds[-1] == "agent.speak_end" and set(kinds[:-1]) == {"agent.speak"}  # end after all chunks
        chunks = [vendor.received[i].audio_bytes for i in mine[:-1]]
        assert all(n % 2 == 0 for n in chunks)  # whole PCM16 samples
        assert chunks[0] <= RATE * 2 * 0.4 + 2 and max(chunks) <= RATE * 2 + 2  # short first chunk, ≤ 1 s
        samples = len(vendor.utterances[event_id]) // 2
        seconds = samples / RATE
        assert 0.03 * len(text) < seconds < 0.15 * len(text), (seconds, text)  # speech-length audio at 24 kHz
        # the events of the avatar reached the page
    replies = {e["reply_id"]: e["text"] for e in browser.of_type("avatar.reply")}
    assert list(replies.values()) == REPLIES
    started = [e["reply_id"] for e in browser.of_type("avatar.started_talking")]
    assert started == [e["reply_id"] for e in browser.of_type("avatar.stopped_talking")] == list(replies)
    # the brain kept the conversation, and sent it with each request
    history = run.history(sid)
    assert [m["content"] for m in history if m["role"] == "assistant"] == REPLIES
    assert run.llm.requests[-1].messages[1:5] == history[:4]
    assert all(r.auth_ok for r in run.llm.requests)
    # idle: keep-alives on the socket
    before = len(vendor.of_type("session.keep_alive"))
    await until(lambda: len(vendor.of_type("session.keep_alive")) >= before + 2)
    await run.delete(browser)
    await until(lambda: vendor.status == "closed")
    assert vendor.stop_reason == "USER_CLOSED" and vendor.dropped == 0
    await browser.close()


@pytest.mark.slow
async def test_commands_before_connected_are_queued_not_lost(run: Run) -> None:
    run.fake.connect_delay_s = 3.0
    try:
        run.llm.script(["Queued words. They wait for the avatar."])
        browser = await run.browser()
        await browser.wait_type("session.ready", GUARD_S)
        await browser.send_json({"type": "text", "text": "hello there"})
        vendor = run.vendor(browser.session.session_id)
        await browser.wait_type("avatar.stopped_talking", GUARD_S)
        assert vendor.dropped == 0
        kinds = [r.type for r in vendor.received if r.type != "session.keep_alive"]
        assert kinds[0] == "agent.speak" and kinds[-1] == "agent.speak_end"
    finally:
        run.fake.connect_delay_s = 0.05
    await run.delete(browser)
    await until(lambda: vendor.status == "closed")
    await browser.close()


@pytest.mark.slow
async def test_barge_in_interrupts_and_history_keeps_only_what_was_spoken(run: Run) -> None:
    long_reply = " ".join(f"This is sentence number {i} of a long answer that goes on." for i in range(1, 25))
    run.llm.script([long_reply])
    browser = await run.browser()
    await browser.wait_type("session.ready", GUARD_S)
    sid = browser.session.session_id
    vendor = run.vendor(sid)
    await browser.send_json({"type": "text", "text": "Tell me everything."})
    await browser.wait_type("avatar.started_talking", GUARD_S)
    await asyncio.sleep(1.5)  # a few sentences played
    await browser.send_json({"type": "interrupt"})
    stopped = await browser.wait_type("avatar.stopped_talking", GUARD_S)
    assert stopped["interrupted"] is True
    await until(lambda: vendor.of_type("agent.interrupt"))
    assert not vendor.of_type("agent.speak_end")  # the reply was cut, not finished
    await until(lambda: len(run.history(sid)) == 2)
    said = run.history(sid)[1]["content"]
    assert said and long_reply.startswith(said) and len(said) < len(long_reply) / 2, said
    await run.delete(browser)
    await until(lambda: vendor.status == "closed")
    await browser.close()


@pytest.mark.slow
async def test_leaving_the_page_stops_the_avatar_after_the_grace_period(run: Run) -> None:
    browser = await run.browser()
    await browser.wait_type("session.ready", GUARD_S)
    vendor = run.vendor(browser.session.session_id)
    await browser.close(end=False)
    await until(lambda: vendor.status == "closed")
    assert vendor.stop_reason == "USER_DISCONNECTED"


@pytest.mark.slow
async def test_a_dead_avatar_socket_ends_the_session_with_a_clear_error_and_stops_it(run: Run) -> None:
    browser = await run.browser()
    await browser.wait_type("session.ready", GUARD_S)
    vendor = run.vendor(browser.session.session_id)
    await until(lambda: vendor.ws is not None)
    run.fake.kill_socket(vendor.session_id)
    error = await browser.wait_type("error", GUARD_S)
    assert error["code"] == "avatar_lost" and error["fatal"] is True
    await browser.wait_type("session.ended", GUARD_S)
    await until(lambda: vendor.status == "closed")
    assert vendor.stop_reason == "SERVER_ERROR"
    await browser.close()


@pytest.mark.slow
async def test_sigterm_hands_the_session_back_and_the_new_owner_reconnects(run: Run) -> None:
    browser = await run.browser()
    first = await browser.wait_type("session.ready", GUARD_S)
    sid = browser.session.session_id
    vendor = run.vendor(sid)
    await talk(browser, "hello")
    live = sum(1 for n, p in run.stack.procs.items() if n.startswith("avatar") and p.poll() is None)
    run.stack.start("avatar-worker")
    run.stack.wait_workers("avatar", live + 1)
    run.stack.kill(run.owner_process(sid), signal.SIGTERM)
    await browser.wait_for(lambda e: e["type"] == "session.ready" and e is not first, GUARD_S)
    assert browser.of_type("session.ready")[-1]["livekit"] == first["livekit"]  # the same avatar
    assert vendor.status == "started" and vendor.stop_reason is None  # handed back, not stopped
    await until(lambda: vendor.sockets >= 2)
    await talk(browser, "are you still there?")
    assert len(browser.of_type("session.ready")) == 2  # resumed once, by one worker
    assert len(run.fake.sessions) == len({*run.fake.sessions})  # no second vendor session for this one
    assert run.vendor(sid) is vendor
    await run.delete(browser)
    await until(lambda: vendor.status == "closed")
    await browser.close()


@pytest.mark.slow
def test_no_secret_in_any_event_or_log(run: Run) -> None:
    secrets = [KEY, LLM_KEY] + [s.token for s in run.fake.sessions.values()] + [
        s.ws_token for s in run.fake.sessions.values()]
    events = orjson.dumps([e for b in run.browsers for e in b.events]).decode()
    for name, path in run.stack.logs.items():
        text = path.read_text(errors="replace")
        for secret in secrets:
            assert secret not in text, f"a secret is in the log of {name}"
    for secret in secrets:
        assert secret not in events


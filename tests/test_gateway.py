"""The gateway as a real process: REST, tokens, the browser socket and its bad-input answers."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from avatar_stack.up import free_port
from common import keys
from common.bus import dump
from common.models import AvatarReply, turn_adapter
from tests.client import Browser, create_session
from tests.conftest import Stack, stack_env


def start_gateway(redis_url: str, **extra: str) -> Stack:
    port = free_port()
    extra = {"ADMISSION_CONTROL": "false", **extra}
    stack = Stack(redis_url, stack_env(redis_url, port, **extra), f"http://127.0.0.1:{port}")
    stack.start("gateway")
    deadline = time.monotonic() + 30
    while True:
        try:
            if httpx.get(f"{stack.base_url}/healthz", timeout=1).status_code == 200:
                return stack
        except httpx.HTTPError:
            pass
        stack.assert_alive()
        assert time.monotonic() < deadline
        time.sleep(0.05)


@pytest.fixture(scope="module")
def gateway(redis_url: str):
    stack = start_gateway(redis_url)
    yield stack
    stack.stop_all()


async def test_session_lifecycle_and_hashed_token(gateway: Stack):
    session = await create_session(gateway.base_url)
    r = gateway.redis()
    record = r.hgetall(keys.session(session.session_id))
    assert session.token.encode() not in record.values()
    assert len(record[b"token_sha256"]) == 64
    assert session.ws_url.startswith("ws://127.0.0.1:") and session.ws_url.endswith("/ws")
    # One job per worker kind.
    assert any(f[b"sid"] == session.session_id.encode() for _, f in r.xrange(keys.JOBS_STT))
    assert any(f[b"sid"] == session.session_id.encode() for _, f in r.xrange(keys.JOBS_AVATAR))
    async with httpx.AsyncClient(base_url=gateway.base_url) as http:
        auth = {"Authorization": f"Bearer {session.token}"}
        got = await http.get(f"/v1/sessions/{session.session_id}", headers=auth)
        assert got.status_code == 200 and got.json()["state"] == "created"
        assert (await http.get(f"/v1/sessions/{session.session_id}")).status_code == 401
        assert (await http.get("/v1/sessions/nope", headers=auth)).status_code == 404
        assert (await http.delete(f"/v1/sessions/{session.session_id}", headers=auth)).status_code == 204
        got = await http.get(f"/v1/sessions/{session.session_id}", headers=auth)
        assert got.json()["state"] == "ended" and got.json()["ended_reason"] == "deleted"


async def test_invalid_session_parameters_are_refused(gateway: Stack):
    async with httpx.AsyncClient(base_url=gateway.base_url) as http:
        bad = await http.post("/v1/sessions", json={"avatar_id": "x" * 500})
        assert bad.status_code == 422
        bad = await http.post("/v1/sessions", json={"language": "english please"})
        assert bad.status_code == 422
        bad = await http.post("/v1/sessions", json={"surprise": 1})
        assert bad.status_code == 422


@pytest.mark.parametrize("token, code", [("wrong", 4401), ("", 4401)])
async def test_bad_token_gets_4401(gateway: Stack, token: str, code: int):
    session = await create_session(gateway.base_url)
    browser = Browser(session)
    await browser.connect(token=token)
    assert await browser.wait_closed() == code


async def test_another_sessions_token_gets_4401_and_unknown_session_4404(gateway: Stack):
    a = await create_session(gateway.base_url)
    b = await create_session(gateway.base_url)
    browser = Browser(a)
    await browser.connect(token=b.token)
    assert await browser.wait_closed() == 4401
    ghost = Browser(type(a)("0" * 32, a.token, a.ws_url.replace(a.session_id, "0" * 32)))
    await ghost.connect()
    assert await ghost.wait_closed() == 4404


async def test_bad_frames_get_errors_while_the_session_goes_on(gateway: Stack):
    session = await create_session(gateway.base_url)
    bystander = Browser(await create_session(gateway.base_url))
    await bystander.connect()
    browser = Browser(session)
    await browser.connect()
    r = gateway.redis()

    await browser.ws.send(b"\x01\x02\x03")  # odd length: not PCM16
    err = await browser.wait_for(lambda e: e.get("code") == "bad_audio_frame")
    assert err["type"] == "error" and err["fatal"] is False
    await browser.ws.send("{not json")
    await browser.wait_for(lambda e: e.get("code") == "bad_message")
    await browser.send_json({"type": "teleport"})
    assert len([e for e in browser.events if e.get("code") == "bad_message"]) >= 1
    await browser.send_json({"type": "text", "text": "x" * 5000})
    await browser.wait_for(lambda e: e.get("code") == "text_too_long")

    # The session goes on: a good frame and a typed turn still land.
    await browser.ws.send(b"\x00\x01" * 320)
    await browser.send_json({"type": "text", "text": "hello there"})
    deadline = time.monotonic() + 5
    while r.xlen(keys.audio(session.session_id)) < 1 or r.xlen(keys.turns(session.session_id)) < 1:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.02)
    [(_, fields)] = r.xrange(keys.turns(session.session_id))
    turn = turn_adapter.validate_json(fields[b"t"])
    assert turn.type == "user.turn" and turn.text == "hello there" and turn.source == "text"

    # Oversize closes this socket with 1009; the session survives and a new socket works.
    await browser.ws.send(b"\x00" * (40 * 1024))
    assert await browser.wait_closed() == 1009
    again = Browser(session)
    await again.connect()
    await again.ws.send(b"\x00\x00" * 320)
    await again.send_json({"type": "ping"})
    assert again.close_code is None
    # Nobody else heard any of it.
    assert not [e for e in bystander.events if e.get("type") == "error"]
    await again.close()
    await bystander.close()


async def test_a_flood_of_bad_frames_closes_with_1003(gateway: Stack):
    browser = Browser(await create_session(gateway.base_url))
    await browser.connect()
    for _ in range(25):
        await browser.ws.send(b"\x01")
    assert await browser.wait_closed() == 1003


async def test_audio_faster_than_real_time_is_rate_limited(gateway: Stack):
    session = await create_session(gateway.base_url)
    browser = Browser(session)
    await browser.connect()
    frame = b"\x00\x00" * 320
    for _ in range(600):  # 12 s of audio sent at once
        await browser.ws.send(frame)
    await browser.wait_for(lambda e: e.get("code") == "audio_rate_limited")
    stored = gateway.redis().xlen(keys.audio(session.session_id))
    assert stored < 600
    await browser.close()


async def test_events_reach_only_their_session_and_resume_after_reconnect(gateway: Stack):
    a, b = await create_session(gateway.base_url), await create_session(gateway.base_url)
    browser_a, browser_b = Browser(a), Browser(b)
    await browser_a.connect()
    await browser_b.connect()
    r = gateway.redis()

    def publish(sid: str, n: int) -> None:
        event = AvatarReply(reply_id=f"r{n}", turn_id=f"t{n}", text=f"reply {n}")
        r.xadd(keys.events(sid), {"e": dump(event)})

    publish(a.session_id, 1)
    publish(b.session_id, 100)
    first = await browser_a.wait_type("avatar.reply", 5)
    await browser_b.wait_type("avatar.reply", 5)
    assert [e["text"] for e in browser_a.of_type("avatar.reply")] == ["reply 1"]
    assert [e["text"] for e in browser_b.of_type("avatar.reply")] == ["reply 100"]

    await browser_a.close(end=False)
    publish(a.session_id, 2)  # sent while the page is away
    publish(a.session_id, 3)
    back = Browser(a)
    await back.connect(last_event=first["id"])
    await back.wait_for(lambda e: e.get("text") == "reply 3", 5)
    assert [e["text"] for e in back.of_type("avatar.reply")] == ["reply 2", "reply 3"]
    await back.close()
    await browser_b.close()


async def test_a_page_that_vanishes_while_events_stream_to_it_is_an_ordinary_end_not_an_error(gateway: Stack):
    """Pages whose connection drops (a closed laptop lid, a killed tab) while events are on their
    way to them: the gateway's send then fails, and it once logged that as a bug of its own
    ("socket task failed", with a traceback) for every such page."""
    r = gateway.redis()
    pages = [Browser(await create_session(gateway.base_url)) for _ in range(12)]
    for page in pages:
        await page.connect()
    [name] = [n for n in gateway.procs if n.startswith("gateway")]
    logged_before = gateway.logs[name].read_text().count("socket task failed")
    stop = asyncio.Event()

    async def stream(sid: str) -> None:  # an avatar's audio events, as fast as Redis takes them
        n = 0
        while not stop.is_set():
            n += 1
            event = AvatarReply(reply_id="r1", turn_id="t1", text=f"reply {n} " + "word " * 40)
            await asyncio.to_thread(r.xadd, keys.events(sid), {"e": dump(event)}, maxlen=500)

    streams = [asyncio.create_task(stream(p.session.session_id)) for p in pages]
    for page in pages:
        await page.wait_type("avatar.reply", 5)
    for page in pages:
        page.ws.transport.abort()  # no close frame: the connection is just gone
    await asyncio.sleep(1.0)
    stop.set()
    await asyncio.gather(*streams)
    await asyncio.sleep(0.5)
    text = gateway.logs[name].read_text()
    assert text.count("socket task failed") == logged_before, text[-3000:]
    for page in pages:  # their sockets are gone, their presence with them
        assert r.zcard(keys.conns(page.session.session_id)) == 0


async def test_end_message_ends_the_session(gateway: Stack):
    session = await create_session(gateway.base_url)
    browser = Browser(session)
    await browser.connect()
    await browser.send_json({"type": "end"})
    ended = await browser.wait_type("session.ended", 5)
    assert ended["reason"] == "user_ended"
    assert await browser.wait_closed() == 1000


async def test_api_key_guards_session_creation(redis_url: str):
    stack = start_gateway(redis_url, GATEWAY_API_KEY="s3cret-key")
    try:
        async with httpx.AsyncClient(base_url=stack.base_url) as http:
            assert (await http.post("/v1/sessions")).status_code == 401
            wrong = await http.post("/v1/sessions", headers={"Authorization": "Bearer nope"})
            assert wrong.status_code == 401
            ok = await http.post("/v1/sessions", headers={"Authorization": "Bearer s3cret-key"})
            assert ok.status_code == 201
            assert (await http.get("/v1/sessions", headers={"X-API-Key": "s3cret-key"})).status_code == 200
    finally:
        stack.stop_all()


async def test_the_page_and_health_are_served(gateway: Stack):
    async with httpx.AsyncClient(base_url=gateway.base_url) as http:
        health = await http.get("/healthz")
        assert health.json() == {"status": "ok", "redis": True}
        metrics = await http.get("/metrics")
        assert "avatar_stack_gateway_audio_frames_total" in metrics.text
        page = await http.get("/")
        assert page.status_code == 200 and "<html" in page.text.lower()
        # The page's one npm asset is served locally; the rest of the setup tree is not.
        assert (await http.get("/node_modules/livekit-client/dist/livekit-client.umd.js")).status_code == 200
        for hidden in ("/package.json", "/setup.sh", "/node_modules/livekit-client/package.json"):
            assert (await http.get(hidden)).status_code == 404


async def test_token_never_reaches_the_logs(gateway: Stack):
    session = await create_session(gateway.base_url)
    browser = Browser(session)
    await browser.connect()
    await browser.send_json({"type": "end"})
    await browser.wait_closed()
    [name] = [n for n in gateway.procs if n.startswith("gateway")]
    text = gateway.logs[name].read_text()
    assert session.session_id in text  # the socket was logged...
    assert session.token not in text  # ...but never its token

"""The local avatar over a real LiveKit server: its voice is a track in the session's room.

A Python rtc client joins with the token the page gets in `session.ready` and hears the avatar;
no PCM goes down the WebSocket. Barge-in silences the track; a wrong key or an unreachable server
is one `error` event and the WebSocket voice; the page's token cannot publish; tokens stay out of
the logs; a worker that takes the session over rejoins the same room.
"""

from __future__ import annotations

import asyncio
import signal
import time

import jwt
import pytest

from avatar_service.livekit_room import AVATAR_IDENTITY, MOUTH_TOPIC
from avatar_stack.up import free_port
from common import keys
from common.bus import dump
from common.models import UserSpeech
from tests.client import Browser, create_session
from tests.conftest import Stack
from tests.livekit_util import LiveKitServer, RoomListener

pytestmark = pytest.mark.slow
GUARD_S = 90


@pytest.fixture(scope="module")
def lk_stack(livekit_stack: Stack) -> Stack:
    return livekit_stack


async def open_page(stack: Stack) -> tuple[Browser, dict]:
    browser = Browser(await create_session(stack.base_url))
    await browser.connect()
    ready = await browser.wait_type("session.ready", GUARD_S)
    return browser, ready


def claims(token: str) -> dict:
    return jwt.decode(token, options={"verify_signature": False})


async def test_local_avatar_speaks_into_the_room(lk_stack: Stack, livekit_server: LiveKitServer):
    browser, ready = await open_page(lk_stack)
    sid = browser.session.session_id
    lk = ready["livekit"]
    assert ready["provider"] == "local" and lk["url"] == livekit_server.url
    grant = claims(lk["token"])["video"]
    assert grant["room"].endswith(sid) and grant["roomJoin"] is True
    assert grant.get("canPublish") is False and grant.get("canPublishData") is False
    assert claims(lk["token"])["exp"] - claims(lk["token"])["nbf"] <= 600  # short-lived

    listener = RoomListener()
    await listener.connect(lk["url"], lk["token"])
    try:
        await browser.send_json({"type": "text", "text": "What is avatar stack?"})
        await browser.wait_type("avatar.started_talking", GUARD_S)
        await listener.wait(lambda: listener.loud_frames(AVATAR_IDENTITY) > 50, GUARD_S, "the avatar's voice")
        stopped = await browser.wait_type("avatar.stopped_talking", GUARD_S)
        assert stopped["interrupted"] is False
        mouth = [m for who, topic, m in listener.data if who == AVATAR_IDENTITY and topic == MOUTH_TOPIC]
        assert mouth and mouth[0]["type"] == "avatar.mouth" and mouth[0]["mouth"] and mouth[0]["seq"] == 0
        assert ("avatar-stack-avatar", "audio") in listener.tracks
        # The voice went through LiveKit only: no PCM (and no avatar.audio) down the socket.
        assert browser.audio_bytes == 0 and not browser.of_type("avatar.audio")
        assert not browser.of_type("error")
    finally:
        await listener.close()
        await browser.close()


async def test_barge_in_silences_the_track_at_once(lk_stack: Stack):
    browser, ready = await open_page(lk_stack)
    listener = RoomListener()
    await listener.connect(ready["livekit"]["url"], ready["livekit"]["token"])
    try:
        await browser.send_json({"type": "text", "text": "Tell me everything about avatar stack and how it scales."})
        await listener.wait(lambda: listener.loud_frames(AVATAR_IDENTITY) > 30, GUARD_S, "the avatar's voice")
        await browser.send_json({"type": "interrupt"})
        stopped = await browser.wait_for(lambda e: e.get("type") == "avatar.stopped_talking", GUARD_S)
        assert stopped["interrupted"] is True
        at_stop = len(listener.levels[AVATAR_IDENTITY])
        loud_at_stop = listener.loud_frames(AVATAR_IDENTITY)
        # 100 more frames (1 s of the track's own clock) arrive; the voice ends within the first few.
        await listener.wait(lambda: len(listener.levels[AVATAR_IDENTITY]) > at_stop + 100, 30, "the track to go on")
        after = listener.levels[AVATAR_IDENTITY][at_stop : at_stop + 100]
        tail = [level for level in after[30:] if level > 300]
        late = listener.loud_frames(AVATAR_IDENTITY) - loud_at_stop
        print(f"\n[livekit] loud 10 ms frames after the interrupt: {late}")
        assert not tail, after  # silent at most 300 ms of track time after the stop event
    finally:
        await listener.close()
        await browser.close()


async def test_a_pause_holds_the_track_and_a_resume_plays_on(lk_stack: Stack):
    """Words over the avatar (what the STT worker publishes for an interim) pause the voice in
    the room; no turn follows, so it resumes and finishes its reply."""
    browser, ready = await open_page(lk_stack)
    listener = RoomListener()
    await listener.connect(ready["livekit"]["url"], ready["livekit"]["token"])
    try:
        await browser.send_json({"type": "text", "text": "Tell me everything about avatar stack and how it scales."})
        await listener.wait(lambda: listener.loud_frames(AVATAR_IDENTITY) > 30, GUARD_S, "the avatar's voice")
        sid = browser.session.session_id
        words = UserSpeech(utterance_id="u999999999", text="hold on there", started_at=int(time.time() * 1000))
        lk_stack.redis().xadd(keys.turns(sid), {"t": dump(words)})
        await browser.wait_type("avatar.paused", GUARD_S)
        at_pause = len(listener.levels[AVATAR_IDENTITY])
        await listener.wait(lambda: len(listener.levels[AVATAR_IDENTITY]) > at_pause + 100, 30, "the track to go on")
        held = listener.levels[AVATAR_IDENTITY][at_pause + 30 : at_pause + 100]
        assert not [level for level in held if level > 300], held  # quiet while paused
        await browser.wait_type("avatar.resumed", GUARD_S)
        loud_at_resume = listener.loud_frames(AVATAR_IDENTITY)
        await listener.wait(lambda: listener.loud_frames(AVATAR_IDENTITY) > loud_at_resume + 30, 30, "the rest")
        stopped = await browser.wait_type("avatar.stopped_talking", GUARD_S)
        assert stopped["interrupted"] is False
    finally:
        await listener.close()
        await browser.close()


def swap_avatar_worker(stack: Stack, **env: str) -> str:
    """Replace the running avatar worker(s) by one started with `env` on top of the stack's."""
    for name, proc in list(stack.procs.items()):
        if name.startswith("avatar-worker") and proc.poll() is None:
            stack.kill(name, signal.SIGTERM)
    name = stack.start("avatar-worker", **env)
    stack.wait_workers("avatar", 1)
    return name


@pytest.mark.parametrize(
    ("env", "code"),
    [
        ({"LIVEKIT_API_SECRET": "not-the-secret-of-this-server-at-all"}, "livekit_auth_failed"),
        ({"LIVEKIT_URL": f"ws://127.0.0.1:{free_port()}"}, "livekit_unreachable"),
    ],
    ids=["wrong-key", "unreachable"],
)
async def test_bad_livekit_is_one_error_then_the_websocket_voice(lk_stack: Stack, env: dict, code: str):
    await asyncio.to_thread(swap_avatar_worker, lk_stack, **env)
    try:
        browser, ready = await open_page(lk_stack)
        assert ready.get("livekit") is None
        [error] = browser.of_type("error")
        assert error["code"] == code and error["fatal"] is False and "WebSocket" in error["message"]
        assert "secret" not in error["message"].lower().replace("livekit_api_secret", "")
        await browser.send_json({"type": "text", "text": "What is avatar stack?"})
        await browser.wait_type("avatar.stopped_talking", GUARD_S)
        assert browser.audio_bytes > 0  # the voice came down the socket instead
        assert len(browser.of_type("error")) == 1
        await browser.close()
    finally:
        await asyncio.to_thread(swap_avatar_worker, lk_stack)


async def test_takeover_rejoins_the_same_room_and_the_page_keeps_listening(lk_stack: Stack):
    await asyncio.to_thread(lk_stack.start, "avatar-worker")
    await asyncio.to_thread(lk_stack.wait_workers, "avatar", 2)
    browser, ready = await open_page(lk_stack)
    sid = browser.session.session_id
    listener = RoomListener()
    await listener.connect(ready["livekit"]["url"], ready["livekit"]["token"])
    try:
        await browser.send_json({"type": "text", "text": "What is avatar stack?"})
        await listener.wait(lambda: listener.loud_frames(AVATAR_IDENTITY) > 30, GUARD_S, "the first voice")
        await browser.wait_type("avatar.stopped_talking", GUARD_S)
        owner = lk_stack.redis().hget(keys.session(sid), keys.F_AVATAR_OWNER).decode()
        [victim] = [n for n, p in lk_stack.procs.items() if p.pid == int(owner.split("-")[-2]) and p.poll() is None]
        await asyncio.to_thread(lk_stack.kill, victim)  # kill -9: no goodbye to the room

        second = await browser.wait_for(lambda e: e.get("type") == "session.ready" and e is not ready, GUARD_S)
        assert claims(second["livekit"]["token"])["video"]["room"] == claims(ready["livekit"]["token"])["video"]["room"]
        await listener.wait(lambda: listener.tracks.count((AVATAR_IDENTITY, "audio")) >= 2, GUARD_S, "a new track")
        before = listener.loud_frames(AVATAR_IDENTITY)
        await browser.send_json({"type": "text", "text": "How do I scale it?"})
        await listener.wait(lambda: listener.loud_frames(AVATAR_IDENTITY) > before + 30, GUARD_S, "the new voice")
        assert listener.room.connection_state == rtc_connected()  # the same connection all along
    finally:
        await listener.close()
        await browser.close()


def rtc_connected():
    from livekit import rtc

    return rtc.ConnectionState.CONN_CONNECTED


def test_tokens_never_appear_in_logs(lk_stack: Stack):
    """Runs after the others in this module: none of our services' logs holds a JWT. (livekit-server
    itself logs a token it rejects as invalid, as in the wrong-key test: that log is LiveKit's.)"""
    logs = [*lk_stack.logs.values()]
    leaked = [str(p) for p in logs if p.exists() and "eyJ" in p.read_text(errors="replace")]
    assert not leaked


async def test_the_avatar_rejoins_when_the_sdk_gives_up_on_its_room(livekit_server: LiveKitServer):
    """In process: the room is dropped under the avatar (as when the SDK's own retries are used
    up); it rejoins by itself and the same sink plays into the new track."""
    import numpy as np
    from pydantic import SecretStr

    from avatar_service.livekit_room import AvatarRoom
    from common.models import AvatarAudio
    from common.settings import Settings

    settings = Settings(
        _env_file=None, livekit_url=livekit_server.url, livekit_api_key=SecretStr(livekit_server.api_key),
        livekit_api_secret=SecretStr(livekit_server.api_secret),
    )
    rate = 22_050
    tone = (6000 * np.sin(2 * np.pi * 300 * np.arange(rate) / rate)).astype(np.int16).tobytes()  # 1 s
    room = await AvatarRoom.join(settings, "rejoin-room", rate)
    listener = RoomListener()
    await listener.connect(livekit_server.url, room.viewer_token())
    try:
        meta = AvatarAudio(reply_id="r1", seq=0, sample_rate=rate, samples=rate, mouth=[0.5], mouth_hop_ms=20)
        await room.sink.send(tone, meta)
        await listener.wait(lambda: listener.loud_frames(AVATAR_IDENTITY) > 20, 30, "the first voice")

        await room.room.disconnect()  # what the SDK does when its reconnect attempts are used up
        try:
            await listener.wait(lambda: listener.tracks.count((AVATAR_IDENTITY, "audio")) >= 2, 30, "a new track")
        except AssertionError as exc:  # say whether the avatar rejoined at all
            raise AssertionError(f"{exc}; rejoins {room.rejoins}, tracks seen {listener.tracks}") from None
        assert room.rejoins == 1
        before = listener.loud_frames(AVATAR_IDENTITY)
        await room.sink.send(tone, meta.model_copy(update={"reply_id": "r2"}))
        await listener.wait(lambda: listener.loud_frames(AVATAR_IDENTITY) > before + 20, 30, "the voice again")
    finally:
        await listener.close()
        await room.leave(delete_room=True)

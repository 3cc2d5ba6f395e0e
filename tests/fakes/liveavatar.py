"""A fake of HeyGen LiveAvatar (REST + the LITE-mode WebSocket), on loopback, for tests.

Per `../shared/reference/vendor-protocols.md` §3 and the fake-server notes §3.8:
- `POST /v1/sessions/token` needs `X-API-KEY`; `mode` ∈ FULL/LITE/CUSTOM, `avatar_id` a uuid (422
  otherwise); answers `{code: 1000, data: {session_id, session_token}}`.
- `POST /v1/sessions/start` needs `Bearer <session_token>`, once per token; 201 with LiveKit url and
  tokens and a `ws_url` pointing at this fake (LITE).
- `POST /v1/sessions/keep-alive`, `POST /v1/sessions/stop` (`reason`), `DELETE /v1/sessions`
  (Bearer), `GET /v1/sessions?type=active`. Stop is idempotent and closes the socket with 1000.
- WS: `session.state_updated connecting`, then `connected` after `connect_delay_s`; commands
  received before that are dropped and counted (`dropped`). `agent.speak` → `agent.speak_started`
  once per event_id; `agent.speak_end` → `agent.speak_ended` after the buffered audio's duration
  (bytes / 48 000 s, times `speech_speed`); `agent.interrupt` drops the buffer. A new socket for
  the same session replaces the old one (a new owner reconnecting).

Records: `calls` (no secrets), and per session `received` (every command after `connected`, the
audio as its decoded length), `audio` (event_id → decoded PCM), `stop_reason`, `status`.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import JSONResponse

from tests.fakes.room_avatar import RoomAvatarHost
from tests.fakes.server import ThreadedFake

UUID_RE = re.compile(r"^[0-9a-fA-F-]{36}$")
SANDBOX_AVATAR = "dd73ea75-1218-4ef3-92ce-606d5f7fbc0a"


@dataclass(frozen=True)
class Call:
    method: str
    path: str
    body: dict[str, Any]
    auth: str  # api_key | bearer | none | bad
    status: int
    session_id: str | None


@dataclass
class Received:
    type: str
    event_id: str | None
    audio_bytes: int
    at: float  # monotonic


@dataclass
class FakeSession:
    session_id: str
    token: str
    ws_token: str
    request: dict[str, Any]
    created_at: float
    status: str = "created"  # created | started | closed
    stop_reason: str | None = None
    sockets: int = 0
    dropped: int = 0
    refuse_sockets: bool = False
    received: list[Received] = field(default_factory=list)
    audio: dict[str, bytearray] = field(default_factory=dict)
    ws: WebSocket | None = None
    ws_loop: asyncio.AbstractEventLoop | None = None

    @property
    def utterances(self) -> dict[str, bytes]:
        """event_id → all PCM received under it."""
        return {k: bytes(v) for k, v in self.audio.items() if ":" not in k}

    def of_type(self, kind: str) -> list[Received]:
        return [r for r in self.received if r.type == kind]


class FakeLiveAvatar(ThreadedFake):
    label = "fake LiveAvatar"
    ws_impl = "websockets"

    def __init__(
        self, api_key: str, *, connect_delay_s: float = 0.05, speech_speed: float = 1.0,
        room_avatars: RoomAvatarHost | None = None,
    ) -> None:
        """`room_avatars`: a started session gets a real avatar participant in its room on that test
        LiveKit server, publishing video and the audio it is sent (see `tests/fakes/room_avatar.py`)."""
        self.room_avatars = room_avatars
        self.api_key = api_key
        self.connect_delay_s = connect_delay_s
        self.speech_speed = speech_speed
        self.livekit_url = "ws://127.0.0.1:7880"
        self.calls: list[Call] = []
        self.sessions: dict[str, FakeSession] = {}
        self._by_token: dict[str, str] = {}
        self._failures: dict[str, list[int]] = {}
        self._lock = threading.RLock()
        self.port = 0
        self.app = FastAPI()
        self.app.add_api_websocket_route("/v1/ws/{session_id}", self._ws)
        self.app.add_api_route("/{path:path}", self._handle, methods=["GET", "POST", "DELETE"])

    # ---- test helpers (lifecycle: see ThreadedFake)

    def fail_next(self, path: str, status: int = 503, times: int = 1) -> None:
        with self._lock:
            self._failures.setdefault(path, []).extend([status] * times)

    def only(self) -> FakeSession:
        with self._lock:
            assert len(self.sessions) == 1, list(self.sessions)
            return next(iter(self.sessions.values()))

    def paths(self, session_id: str | None = None) -> list[str]:
        return [f"{c.method} {c.path}" for c in self.calls if session_id is None or c.session_id == session_id]

    def kill_socket(self, session_id: str, code: int = 1011, *, refuse_reconnect: bool = True) -> None:
        """The vendor side drops the socket (an outage); later sockets are refused if asked."""
        s = self.sessions[session_id]
        s.refuse_sockets = refuse_reconnect
        if s.ws is not None and s.ws_loop is not None:
            asyncio.run_coroutine_threadsafe(_close(s.ws, code), s.ws_loop).result(5)

    def add_session(self, age_s: float = 0.0) -> str:
        """A started session nobody in the stack owns (a leak)."""
        with self._lock:
            s = self._new({"mode": "LITE", "avatar_id": SANDBOX_AVATAR}, time.time() - age_s)
            s.status = "started"
            return s.session_id

    # ---- REST

    def _new(self, body: dict[str, Any], created_at: float) -> FakeSession:
        s = FakeSession(str(uuid.uuid4()), "st-" + uuid.uuid4().hex, "ws-" + uuid.uuid4().hex, body, created_at)
        self.sessions[s.session_id] = s
        self._by_token[s.token] = s.session_id
        return s

    async def _handle(self, path: str, request: Request) -> JSONResponse:
        path = "/" + path
        raw = await request.body()
        try:
            body = json.loads(raw) if raw else {}
        except ValueError:
            body = {}
        if not isinstance(body, dict):
            body = {}
        auth_header = request.headers.get("authorization", "")
        key = request.headers.get("x-api-key")
        bearer_sid: str | None = None
        if key is not None:
            auth = "api_key" if key == self.api_key else "bad"
        elif auth_header.startswith("Bearer "):
            bearer_sid = self._by_token.get(auth_header[7:])
            auth = "bearer" if bearer_sid else "bad"
        else:
            auth = "none"
        with self._lock:
            status, payload, sid = self._route(request.method, path, body, auth, bearer_sid, request)
            clean = {k: v for k, v in body.items() if "token" not in k and "key" not in k}
            self.calls.append(Call(request.method, path, clean, auth, status, sid))
        return JSONResponse(payload, status_code=status)

    def _route(self, method: str, path: str, body: dict[str, Any], auth: str, bearer_sid: str | None,
               request: Request) -> tuple[int, dict[str, Any], str | None]:
        failures = self._failures.get(path)
        if failures:
            return failures.pop(0), {"code": 5000, "message": "Service temporarily unavailable"}, None
        if auth in ("none", "bad"):
            return 401, {"code": 4010, "message": "Invalid API key"}, None
        ok = lambda data, status=200: (status, {"code": 1000, "data": data, "message": "success"})  # noqa: E731
        if method == "POST" and path == "/v1/sessions/token":
            if auth != "api_key":
                return 401, {"code": 4010, "message": "API key required"}, None
            mode = body.get("mode")
            if mode not in ("FULL", "LITE", "CUSTOM") or not UUID_RE.match(str(body.get("avatar_id", ""))):
                return 422, {"detail": [{"loc": ["body", "avatar_id"], "msg": "invalid", "type": "value_error"}]}, None
            s = self._new(body, time.time())
            return (*ok({"session_id": s.session_id, "session_token": s.token}), s.session_id)
        if method == "POST" and path == "/v1/sessions/start":
            s = self.sessions.get(bearer_sid or "")
            if s is None:
                return 401, {"code": 4010, "message": "session token required"}, None
            if s.status != "created":
                return 400, {"code": 4000, "message": "session already started"}, s.session_id
            s.status = "started"
            lite = s.request.get("mode") in ("LITE", "CUSTOM")
            ws_url = f"ws://127.0.0.1:{self.port}/v1/ws/{s.session_id}?token={s.ws_token}" if lite else None
            data = {"session_id": s.session_id, "livekit_url": self.livekit_url,
                    "livekit_client_token": "lk-client-" + s.session_id, "livekit_agent_token": "lk-agent-x",
                    "max_session_duration": s.request.get("max_session_duration"), "ws_url": ws_url}
            host, room = self.room_avatars, s.session_id
            if host is not None:  # a real room: the avatar joins it, the page gets a viewer token
                data["livekit_url"] = host.url
                data["livekit_client_token"] = host.viewer_token(room, f"client-{room[:8]}")
                data["livekit_agent_token"] = host.token(f"agent-{room[:8]}", room)
                host.join(room, topic="agent-response")
            return (*ok(data, 201), s.session_id)
        if (path in ("/v1/sessions/keep-alive", "/v1/sessions/stop") and method == "POST") or (
                method == "DELETE" and path == "/v1/sessions"):
            sid = body.get("session_id") or bearer_sid
            s = self.sessions.get(str(sid))
            if s is None:
                return 404, {"code": 4004, "message": "session not found"}, None
            if path.endswith("keep-alive"):
                if s.status != "started":
                    return 400, {"code": 4000, "message": "session closed"}, s.session_id
                return (*ok(None), s.session_id)
            if s.status != "closed":
                s.status = "closed"
                s.stop_reason = body.get("reason", "UNKNOWN")
                if self.room_avatars is not None:
                    self.room_avatars.leave(s.session_id)
                if s.ws is not None and s.ws_loop is not None:
                    asyncio.run_coroutine_threadsafe(_close(s.ws, 1000), s.ws_loop)
            return (*ok(None), s.session_id)
        if method == "GET" and path == "/v1/sessions":
            kind = request.query_params.get("type", "active")
            items = [{"session_id": s.session_id, "status": s.status, "created_at": s.created_at}
                     for s in self.sessions.values() if (s.status == "started") == (kind == "active")]
            return (*ok({"count": len(items), "results": items}), None)
        return 404, {"code": 4040, "message": "not found"}, None

    # ---- WebSocket

    async def _ws(self, websocket: WebSocket, session_id: str) -> None:
        s = self.sessions.get(session_id)
        await websocket.accept()
        if s is None or websocket.query_params.get("token") != s.ws_token or s.status != "started" or s.refuse_sockets:
            await websocket.close(4001)
            return
        if s.ws is not None:  # a new owner: the old socket is replaced
            await _close(s.ws, 1000)
        s.ws, s.ws_loop = websocket, asyncio.get_running_loop()
        s.sockets += 1
        state = {"connected": False}
        ends: dict[str, asyncio.Task[None]] = {}
        started: set[str] = set()

        async def send(payload: dict[str, Any]) -> None:
            try:
                await websocket.send_text(json.dumps(payload))
            except Exception:
                pass

        async def connect() -> None:
            await send({"type": "session.state_updated", "state": "connecting"})
            await asyncio.sleep(self.connect_delay_s)
            state["connected"] = True
            await send({"type": "session.state_updated", "state": "connected"})

        async def end_later(event_id: str, seconds: float) -> None:
            await asyncio.sleep(seconds * self.speech_speed)
            s.audio.pop(event_id + ":buffer", None)
            await send({"type": "agent.speak_ended", "event_id": event_id, "task": {"id": event_id}})

        connecting = asyncio.create_task(connect())
        try:
            while True:
                msg = json.loads(await websocket.receive_text())
                if not state["connected"]:
                    s.dropped += 1
                    continue
                kind, event_id = msg.get("type", ""), msg.get("event_id")
                audio = base64.b64decode(msg["audio"]) if kind == "agent.speak" else b""
                s.received.append(Received(kind, event_id, len(audio), time.monotonic()))
                avatar = self.room_avatars.avatars.get(session_id) if self.room_avatars is not None else None
                if avatar is not None and kind == "agent.speak" and event_id:
                    avatar.say(audio, event_id)
                elif avatar is not None and kind == "agent.speak_end" and event_id:
                    avatar.end(event_id)
                elif avatar is not None and kind == "agent.interrupt":
                    avatar.interrupt()
                if kind == "agent.speak" and event_id:
                    s.audio.setdefault(event_id, bytearray()).extend(audio)
                    s.audio.setdefault(event_id + ":buffer", bytearray()).extend(audio)
                    if event_id not in started:
                        started.add(event_id)
                        await send({"type": "agent.speak_started", "event_id": event_id, "task": {"id": event_id}})
                elif kind == "agent.speak_end" and event_id:
                    buffered = len(s.audio.get(event_id + ":buffer", b""))
                    ends[event_id] = asyncio.create_task(end_later(event_id, buffered / 48_000))
                elif kind == "agent.interrupt":
                    for task in ends.values():
                        task.cancel()
                    for k in [k for k in s.audio if k.endswith(":buffer")]:
                        del s.audio[k]
        except (WebSocketDisconnect, RuntimeError):
            pass
        finally:
            connecting.cancel()
            for task in ends.values():
                task.cancel()
            if s.ws is websocket:
                s.ws = None


async def _close(ws: WebSocket, code: int) -> None:
    try:
        await ws.close(code)
    except Exception:
        pass

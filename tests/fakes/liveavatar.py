"""A fake of HeyGen LiveAvatar (REST + the LITE-mode WebSocket), on loopback, for tests.

Written from LiveAvatar's published contract (its OpenAPI, the LITE events page, the web SDK),
not from our client:

- `POST /v1/sessions/token` needs `X-API-KEY`; `mode` ∈ FULL/LITE (legacy CUSTOM = LITE), `avatar_id`
  a uuid (422 otherwise); answers `{code: 1000, data: {session_id, session_token}}`. Sessions our
  client makes are `source: API`.
- `POST /v1/sessions/start` needs `Bearer <session_token>`, once per token; 201 with the LiveKit url
  and tokens, `max_session_duration` (the request's, else the plan's `plan_limit_s`, else the
  sandbox's `sandbox_limit_s`; null when there is none) and `ws_url` (LITE only, null in FULL).
- **Duration limits really end sessions**: at the limit the socket gets `session.state_updated`
  `closing` then `closed` and is closed with 1000; the session is `closed` with reason
  `MAX_DURATION_REACHED`. Keep-alive and stop on a closed session answer "session closed".
- `GET /v1/sessions?type=active|historic&page&page_size` is **account-wide and paged**: every
  session of the key, whoever started it (`source` API/DEMO/APP/EMBED, `mode`, `is_sandbox`),
  20 a page by default (≤ 100), `{count, next, previous, results}` with `next`/`previous` as URLs.
- `POST /v1/sessions/keep-alive`, `POST /v1/sessions/stop` (`reason`), `DELETE /v1/sessions`
  (Bearer). Stop is idempotent.
- WS: `session.state_updated connecting`, then `connected` after `connect_delay_s`; commands
  received before that are dropped and counted (`dropped`). The avatar's state/buffer stream, as
  real sessions send it: `agent.speak` → `agent.audio_buffer_appended` (ack, `source_event_id`),
  the first one also `agent.state_updated` idle→talking; `agent.speak_end` →
  `agent.audio_buffer_committed`, then after the buffered audio's duration (bytes / 48 000 s,
  times `speech_speed`) `agent.state_updated` talking→idle; `agent.interrupt` →
  `agent.audio_buffer_cleared` (`source_event_id` = the interrupt's `event_id`) and talking→idle;
  `agent.start_listening` / `stop_listening` → state listening / idle. The documented
  `agent.speak_started` / `agent.speak_ended` are sent only with `speak_events=True` (real sessions
  may not send them: livekit/agents#7232); `state_events=False` leaves only those.

FULL mode (with `livekit=` a real LiveKit server, `tests/livekit_util.py`): `POST /v1/contexts`
makes a Context (`{name, prompt, opening_text}` → `id`); the token's `avatar_persona.context_id` must
be known. At start the fake's avatar joins the session's room as `heygen`; the LiveKit tokens it
hands out are for that room (viewer: subscribe only; agent: may publish data). On `agent-control`
it answers `avatar.speak_response` from the Context (`avatar.speak_started`, `avatar.transcription`,
then `avatar.speak_ended` after the answer's speaking time) on `agent-response`; `avatar.interrupt`
cuts it short; the session's end is `session.stopped` (`end_reason`) there.

Every session starts in `_begin` and ends in `_end` (one place each, for hooks such as publishing
into a real LiveKit room). Records: `calls` (no secrets), and per session `received` (every
command after `connected`, the audio as its decoded length), `audio` (event_id → decoded PCM),
`sent` (events sent on the socket), `stop_reason`, `status`.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import re
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from fastapi import FastAPI, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import JSONResponse

from tests.fakes.room_avatar import RoomAvatarHost
from tests.fakes.server import ThreadedFake

UUID_RE = re.compile(r"^[0-9a-fA-F-]{36}$")
SANDBOX_AVATAR = "dd73ea75-1218-4ef3-92ce-606d5f7fbc0a"
SOURCES = ("API", "DEMO", "APP", "EMBED")


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
    source: str = "API"
    status: str = "created"  # created | started | closed
    stop_reason: str | None = None
    limit_s: float | None = None
    sockets: int = 0
    dropped: int = 0
    refuse_sockets: bool = False
    received: list[Received] = field(default_factory=list)
    sent: list[dict[str, Any]] = field(default_factory=list)
    audio: dict[str, bytearray] = field(default_factory=dict)
    ws: WebSocket | None = None
    ws_loop: asyncio.AbstractEventLoop | None = None
    timer: asyncio.TimerHandle | None = None
    room: Any = None  # FULL: the fake avatar's LiveKit room
    control: list[dict[str, Any]] = field(default_factory=list)  # FULL: what arrived on agent-control
    responses: list[dict[str, Any]] = field(default_factory=list)  # FULL: what the avatar sent back

    @property
    def utterances(self) -> dict[str, bytes]:
        """event_id → all PCM received under it."""
        return {k: bytes(v) for k, v in self.audio.items() if ":" not in k}

    def of_type(self, kind: str) -> list[Received]:
        return [r for r in self.received if r.type == kind]

    def events(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.sent if e.get("type") == kind]

    @property
    def mode(self) -> str:
        mode = str(self.request.get("mode", "LITE"))
        return "LITE" if mode == "CUSTOM" else mode


class FakeLiveAvatar(ThreadedFake):
    label = "fake LiveAvatar"
    ws_impl = "websockets"

    def __init__(self, api_key: str, *, connect_delay_s: float = 0.05, speech_speed: float = 1.0,
                 speak_events: bool = True, state_events: bool = True, plan_limit_s: float | None = None,
                 sandbox_limit_s: float = 60.0, livekit: Any = None,
                 room_avatars: RoomAvatarHost | None = None) -> None:
        """`livekit`: a real LiveKit server for FULL mode (the avatar agent joins the room itself).
        `room_avatars`: a started LITE session gets a real avatar participant in its room on that
        test LiveKit server, publishing video and the audio it is sent (`tests/fakes/room_avatar.py`)."""
        self.room_avatars = room_avatars
        self.api_key = api_key
        self.connect_delay_s = connect_delay_s
        self.speech_speed = speech_speed
        self.speak_events = speak_events
        self.state_events = state_events
        self.plan_limit_s = plan_limit_s
        self.sandbox_limit_s = sandbox_limit_s
        self.livekit = livekit  # tests.livekit_util.LiveKitServer, for FULL mode
        self.contexts: dict[str, dict[str, Any]] = {}
        self.answer_ms_per_char = 10.0
        self.livekit_url = "ws://127.0.0.1:7880"
        self.calls: list[Call] = []
        self.sessions: dict[str, FakeSession] = {}
        self._by_token: dict[str, str] = {}
        self._failures: dict[str, list[int]] = {}
        self._lock = threading.RLock()
        self._loop: asyncio.AbstractEventLoop | None = None
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

    def expire(self, session_id: str, reason: str = "MAX_DURATION_REACHED") -> None:
        """The vendor ends the session now (its duration limit, credits, …), as it does at the limit.
        Does not wait: the closing handshake needs the client, which may run on the caller's loop."""
        assert self._loop is not None
        asyncio.run_coroutine_threadsafe(self._end(self.sessions[session_id], reason), self._loop)

    def add_session(self, age_s: float = 0.0, *, source: str = "API", mode: str = "LITE",
                    sandbox: bool = False) -> str:
        """A started session on the account that no stack started here: another app's (DEMO, APP,
        EMBED) or another deployment's (API), or a leak of ours once its id is in our ledger."""
        with self._lock:
            s = self._new({"mode": mode, "avatar_id": SANDBOX_AVATAR, "is_sandbox": sandbox}, time.time() - age_s,
                          source)
            s.status = "started"
            return s.session_id

    def stop(self) -> None:
        """Every avatar leaves its LiveKit room before the server thread ends (no dangling rooms)."""
        loop = self._loop
        if loop is not None and loop.is_running():
            for s in [s for s in self.sessions.values() if s.room is not None]:
                with contextlib.suppress(Exception):
                    asyncio.run_coroutine_threadsafe(self._avatar_leaves(s, "UNKNOWN"), loop).result(5)
        super().stop()

    def active(self) -> list[FakeSession]:
        return [s for s in self.sessions.values() if s.status == "started"]

    # ---- the one place a session starts and the one place it ends

    def _begin(self, s: FakeSession) -> None:
        s.status = "started"
        limit = s.request.get("max_session_duration") or self.plan_limit_s or (
            self.sandbox_limit_s if s.request.get("is_sandbox") else None)
        s.limit_s = float(limit) if limit else None
        loop = asyncio.get_running_loop()
        if s.limit_s:
            s.timer = loop.call_later(s.limit_s, lambda: loop.create_task(self._end(s, "MAX_DURATION_REACHED")))
        if s.mode == "FULL" and self.livekit is not None:
            s.room = loop.create_task(self._avatar_joins(s))

    async def _end(self, s: FakeSession, reason: str) -> None:
        if s.status == "closed":
            return
        s.status = "closed"
        s.stop_reason = reason
        if s.timer is not None:
            s.timer.cancel()
        if self.room_avatars is not None:
            self.room_avatars.leave(s.session_id)
        if s.room is not None:
            await self._avatar_leaves(s, reason)
        if s.ws is not None and s.ws_loop is not None:
            ws = s.ws
            for state in ("closing", "closed"):
                await _send_on(s, {"type": "session.state_updated", "state": state}, ws)
            await _close(ws, 1000)

    # ---- FULL mode: the avatar in the session's LiveKit room

    async def _avatar_joins(self, s: FakeSession) -> Any:
        from livekit import rtc

        room = rtc.Room()
        answering: dict[str, asyncio.Task[None]] = {}

        async def respond(event_type: str, **payload: Any) -> None:
            message = {"event_type": event_type, "event_id": uuid.uuid4().hex, "session_id": s.session_id, **payload}
            s.responses.append(message)
            await room.local_participant.publish_data(json.dumps(message), reliable=True, topic="agent-response")

        async def answer(source: str, question: str) -> None:
            persona = s.request.get("avatar_persona") or {}
            context = self.contexts.get(persona.get("context_id", ""), {})
            knowledge = str(context.get("prompt", "")).strip().splitlines()[:1] or ["I have no context."]
            text = f"About {question.strip()[:60]}: {knowledge[0][:120]}"
            await respond("avatar.speak_started", source_event_id=source)
            await respond("avatar.transcription", text=text, source_event_id=source)
            try:
                await asyncio.sleep(len(text) * self.answer_ms_per_char / 1000 * self.speech_speed)
            finally:
                await respond("avatar.speak_ended", source_event_id=source)

        @room.on("data_received")
        def _on_data(packet: Any) -> None:
            if packet.topic != "agent-control":
                return
            try:
                event = json.loads(packet.data)
            except ValueError:
                return
            s.control.append({**event, "_from": packet.participant.identity if packet.participant else None})
            kind = event.get("event_type")
            if kind == "avatar.speak_response":
                task = asyncio.get_running_loop().create_task(answer(event.get("event_id", ""), str(event.get("text"))))
                answering[event.get("event_id", "")] = task
            elif kind == "avatar.interrupt":
                for task in answering.values():
                    task.cancel()

        await room.connect(self.livekit.url, self.livekit.token("heygen", s.session_id))
        return room, respond

    async def _avatar_leaves(self, s: FakeSession, reason: str) -> None:
        task, s.room = s.room, None
        with contextlib.suppress(Exception):
            room, respond = await task
            await respond("session.stopped", end_reason=reason)
            await asyncio.sleep(0.2)  # let the message reach the room before the avatar leaves
            await room.disconnect()

    # ---- REST

    def _new(self, body: dict[str, Any], created_at: float, source: str = "API") -> FakeSession:
        s = FakeSession(str(uuid.uuid4()), "st-" + uuid.uuid4().hex, "ws-" + uuid.uuid4().hex, body, created_at,
                        source)
        self.sessions[s.session_id] = s
        self._by_token[s.token] = s.session_id
        return s

    async def _handle(self, path: str, request: Request) -> JSONResponse:
        self._loop = asyncio.get_running_loop()
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
            status, payload, sid, ending = self._route(request.method, path, body, auth, bearer_sid, request)
            clean = {k: v for k, v in body.items() if "token" not in k and "key" not in k}
            self.calls.append(Call(request.method, path, clean, auth, status, sid))
        if ending is not None:
            await self._end(*ending)
        return JSONResponse(payload, status_code=status)

    def _route(self, method: str, path: str, body: dict[str, Any], auth: str, bearer_sid: str | None,
               request: Request) -> tuple[int, dict[str, Any], str | None, tuple[FakeSession, str] | None]:
        failures = self._failures.get(path)
        if failures:
            return failures.pop(0), {"code": 5000, "message": "Service temporarily unavailable"}, None, None
        if auth in ("none", "bad"):
            return 401, {"code": 4010, "message": "Invalid API key"}, None, None

        def ok(data: Any, status: int = 200, sid: str | None = None, ending: Any = None) -> Any:
            return status, {"code": 1000, "data": data, "message": "success"}, sid, ending

        if method == "POST" and path == "/v1/sessions/token":
            if auth != "api_key":
                return 401, {"code": 4010, "message": "API key required"}, None, None
            mode = body.get("mode")
            if mode not in ("FULL", "LITE", "CUSTOM") or not UUID_RE.match(str(body.get("avatar_id", ""))):
                detail = [{"loc": ["body", "avatar_id"], "msg": "invalid", "type": "value_error"}]
                return 422, {"detail": detail}, None, None
            persona = body.get("avatar_persona") if isinstance(body.get("avatar_persona"), dict) else {}
            if mode == "FULL" and persona.get("context_id") and persona["context_id"] not in self.contexts:
                return 400, {"code": 4000, "message": "context not found"}, None, None
            s = self._new(body, time.time())
            return ok({"session_id": s.session_id, "session_token": s.token}, sid=s.session_id)
        if method == "POST" and path == "/v1/contexts":
            if auth != "api_key" or not str(body.get("name", "")).strip() or not str(body.get("prompt", "")).strip():
                return 422, {"detail": [{"loc": ["body", "prompt"], "msg": "required", "type": "missing"}]}, None, None
            context_id = str(uuid.uuid4())
            self.contexts[context_id] = {"name": body["name"], "prompt": body["prompt"],
                                         "opening_text": body.get("opening_text", "")}
            return ok({"id": context_id, "name": body["name"]})
        if method == "POST" and path == "/v1/sessions/start":
            s = self.sessions.get(bearer_sid or "")
            if s is None:
                return 401, {"code": 4010, "message": "session token required"}, None, None
            if s.status != "created":
                return 400, {"code": 4000, "message": "session already started"}, s.session_id, None
            self._begin(s)
            ws_url = f"ws://127.0.0.1:{self.port}/v1/ws/{s.session_id}?token={s.ws_token}" if s.mode == "LITE" else None
            url, client, agent = self.livekit_url, "lk-client-" + s.session_id, "lk-agent-x"
            if self.livekit is not None:
                url = self.livekit.url
                client = self.livekit.token(f"viewer-{s.session_id[:8]}", s.session_id, publish=False)
                agent = self.livekit.token(f"agent-{s.session_id[:8]}", s.session_id)
            host, room = self.room_avatars, s.session_id
            if host is not None:  # a real room: the avatar joins it, the page gets a viewer token
                url = host.url
                client = host.viewer_token(room, f"client-{room[:8]}")
                agent = host.token(f"agent-{room[:8]}", room)
                host.join(room, topic="agent-response")
            data = {"session_id": s.session_id, "livekit_url": url,
                    "livekit_client_token": client, "livekit_agent_token": agent,
                    "max_session_duration": int(s.limit_s) if s.limit_s else None, "ws_url": ws_url}
            return ok(data, 201, s.session_id)
        if (path in ("/v1/sessions/keep-alive", "/v1/sessions/stop") and method == "POST") or (
                method == "DELETE" and path == "/v1/sessions"):
            sid = body.get("session_id") or bearer_sid
            s = self.sessions.get(str(sid))
            if s is None:
                return 404, {"code": 4004, "message": "session not found"}, None, None
            if path.endswith("keep-alive"):
                if s.status != "started":
                    return 400, {"code": 4000, "message": "session closed"}, s.session_id, None
                return ok(None, sid=s.session_id)
            return ok(None, sid=s.session_id, ending=(s, str(body.get("reason", "UNKNOWN"))))
        if method == "GET" and path == "/v1/sessions":
            return ok(self._page(request), sid=None)
        return 404, {"code": 4040, "message": "not found"}, None, None

    def _page(self, request: Request) -> dict[str, Any]:
        q = request.query_params
        kind = q.get("type", "active")
        page, size = max(1, int(q.get("page", 1))), min(100, max(1, int(q.get("page_size", 20))))
        items = sorted((s for s in self.sessions.values() if (s.status == "started") == (kind == "active")
                        and s.status != "created"), key=lambda s: s.created_at)
        chunk = items[(page - 1) * size: page * size]

        def link(n: int) -> str:
            return f"{self.base_url}/v1/sessions?type={kind}&page={n}&page_size={size}"

        return {
            "count": len(items),
            "next": link(page + 1) if page * size < len(items) else None,
            "previous": link(page - 1) if page > 1 else None,
            "results": [{
                "id": s.session_id, "created_at": datetime.fromtimestamp(s.created_at, UTC).isoformat(),
                "updated_at": datetime.fromtimestamp(s.created_at, UTC).isoformat(),
                "duration": int(time.time() - s.created_at), "source": s.source, "mode": s.mode,
                "is_sandbox": bool(s.request.get("is_sandbox")), "credits_consumed": 0,
            } for s in chunk],
        }

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
        state = {"connected": False, "avatar": "idle"}
        ends: dict[str, asyncio.Task[None]] = {}
        started: set[str] = set()

        async def send(payload: dict[str, Any]) -> None:
            await _send_on(s, payload, websocket)

        async def to_state(new: str) -> None:
            if state["avatar"] != new:
                old, state["avatar"] = state["avatar"], new
                if self.state_events:
                    await send({"type": "agent.state_updated", "event_id": uuid.uuid4().hex,
                                "previous_state": old, "new_state": new})

        async def connect() -> None:
            await send({"type": "session.state_updated", "state": "connecting"})
            await asyncio.sleep(self.connect_delay_s)
            state["connected"] = True
            await send({"type": "session.state_updated", "state": "connected"})

        async def end_later(event_id: str, seconds: float) -> None:
            await asyncio.sleep(seconds * self.speech_speed)
            s.audio.pop(event_id + ":buffer", None)
            if self.speak_events:
                await send({"type": "agent.speak_ended", "event_id": event_id, "task": {"id": event_id}})
            await to_state("idle")

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
                    await send({"type": "agent.audio_buffer_appended", "event_id": uuid.uuid4().hex,
                                "source_event_id": event_id})
                    if event_id not in started:
                        started.add(event_id)
                        await to_state("talking")
                        if self.speak_events:
                            await send({"type": "agent.speak_started", "event_id": event_id, "task": {"id": event_id}})
                elif kind == "agent.speak_end" and event_id:
                    await send({"type": "agent.audio_buffer_committed", "event_id": uuid.uuid4().hex,
                                "source_event_id": event_id})
                    buffered = len(s.audio.get(event_id + ":buffer", b""))
                    ends[event_id] = asyncio.create_task(end_later(event_id, buffered / 48_000))
                elif kind == "agent.interrupt":
                    for task in ends.values():
                        task.cancel()
                    for k in [k for k in s.audio if k.endswith(":buffer")]:
                        del s.audio[k]
                    await send({"type": "agent.audio_buffer_cleared", "event_id": uuid.uuid4().hex,
                                "source_event_id": event_id})
                    await to_state("idle")
                elif kind == "agent.start_listening":
                    await to_state("listening")
                elif kind == "agent.stop_listening":
                    await to_state("idle")
        except (WebSocketDisconnect, RuntimeError):
            pass
        finally:
            connecting.cancel()
            for task in ends.values():
                task.cancel()
            if s.ws is websocket:
                s.ws = None


async def _send_on(s: FakeSession, payload: dict[str, Any], ws: WebSocket) -> None:
    try:
        await ws.send_text(json.dumps(payload))
        s.sent.append(payload)
    except Exception:
        pass


async def _close(ws: WebSocket, code: int) -> None:
    try:
        await ws.close(code)
    except Exception:
        pass

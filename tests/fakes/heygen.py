"""A protocol-faithful fake of HeyGen's Interactive Avatar streaming API, on loopback, for tests.

Wire protocol as in `../shared/reference/vendor-protocols.md` §2 (the production client runs
unchanged against it through `HEYGEN_SERVER_URL`):

- Auth: `X-Api-Key: <api_key>` everywhere, or `Authorization: Bearer <token>` with a token from
  `streaming.create_token` (which itself needs the API key). A token creates one session only and,
  once bound, is good for that session only. Anything else: HTTP 401, code 40009.
- Envelopes: `{"code": 100, "message": "success", "data": …}`; `create_token` answers
  `{"error": null, "data": {"token": …}}` and `stop` the documented `{"status": "success"}`.
  Errors: non-2xx with `{"code", "message"}`.
- State rules: `new` → `start` → `task`/`interrupt`; a call on a session in the wrong state
  (task before start, anything after stop or after the idle timeout) → 400 / 400006; an unknown
  session id → 400 / 10005. `new` requires `version: "v2"` and a known knowledge base id when one
  is given (`knowledge_base_id` or pipecat's `knowledge_id`); `avatar_name` is accepted for
  `avatar_id`. Tasks over `task_max_chars` are refused.
- Concurrency cap: at most `max_concurrent` sessions not closed; the next `new` fails with the
  configurable `capacity_status` / `capacity_code` / `capacity_message` (the real body is
  unconfirmed, see §2.3).
- Idle timeout: a session with no activity (start, task, keep-alive, interrupt, its own speech)
  for its `activity_idle_timeout` (or `idle_timeout_s` when set) is closed.
- Duration limit: `streaming.new` reports `session_duration_limit` (`duration_limit_s`, 600 by
  default) and a session that has run that long since `streaming.start` is closed
  (`closed_reason` "duration_limit"), keep-alives and all: the limit really ends it.
- `video_encoding` must be VP8 or H264 when given.

The avatar's speech is a timeline, not timers: each task is queued after the previous one and
lasts `len(text) * speech_ms_per_char` ms (`talk` tasks answer with a canned sentence), while the
task response reports `duration_ms` from `reported_ms_per_char` (so a test can make the vendor's
estimate wrong). `channel(session_id)` returns the LiveKit data-channel events that are due now
(`avatar_start_talking` / `avatar_stop_talking` with `task_id`), in order, for a test "page" to
relay; `interrupt` and `stop` cut the current task short and drop queued ones.

Records for assertions: `calls` (method, path, body, auth style, status and error code of every
request; no secrets: request bodies hold none, and tokens are never recorded) and `sessions`.
`fail_next(path, …)` scripts transient failures. The server runs in its own thread, so one fake
serves both in-process tests and the stack's worker processes.

    with FakeHeyGen(api_key="k") as fake:
        ...  # point HEYGEN_SERVER_URL at fake.url
        assert fake.paths(session_id) == ["/v1/streaming.start", "/v1/streaming.task", ...]
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from tests.fakes.room_avatar import RoomAvatarHost
from tests.fakes.server import ThreadedFake

LIVEKIT_API_KEY = "devkey"  # `livekit-server --dev` credentials (reference §4.3)
LIVEKIT_API_SECRET = "secret"
CODE_OK = 100
CODE_BAD_REQUEST = 400
CODE_INVALID_CREDENTIALS = 40009
CODE_WRONG_STATE = 400006
CODE_NOT_FOUND = 10005
CODE_AVATAR_NOT_FOUND = 10013
SECRET_FIELD_WORDS = ("token", "api_key", "secret")  # never recorded, whatever a client sends
SESSION_PATHS = {
    "/v1/streaming.start", "/v1/streaming.task", "/v1/streaming.interrupt", "/v1/streaming.keep_alive",
    "/v1/streaming.stop", "/v1/streaming.start_listening", "/v1/streaming.stop_listening",
}


@dataclass(frozen=True)
class Call:
    method: str
    path: str
    body: dict[str, Any]
    auth: str  # "api_key" | "bearer" | "none" | "bad"
    status: int
    code: int | None
    session_id: str | None


@dataclass
class FakeTask:
    task_id: str
    text: str
    task_type: str
    start: float  # monotonic
    end: float
    interrupted: bool = False


@dataclass
class FakeSession:
    session_id: str
    token: str | None
    request: dict[str, Any]
    created_at: float  # unix seconds, as `streaming.list` reports it
    idle_timeout_s: float
    last_activity: float  # monotonic
    access_token: str
    status: str = "new"  # new | connected | closed
    closed_reason: str | None = None
    started_at: float | None = None  # monotonic, at streaming.start
    tasks: list[FakeTask] = field(default_factory=list)


class FakeError(Exception):
    def __init__(self, status: int, code: int, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


class FakeHeyGen(ThreadedFake):
    """The fake server; configuration attributes may be changed while it runs."""

    label = "fake HeyGen"

    def __init__(
        self,
        api_key: str = "test-key",
        *,
        max_concurrent: int = 100,
        capacity_status: int = 400,
        capacity_code: int = 10007,
        capacity_message: str = "Concurrent limit reached",
        speech_ms_per_char: float = 10.0,
        reported_ms_per_char: float | None = None,
        idle_timeout_s: float | None = None,
        duration_limit_s: float = 600.0,
        task_max_chars: int = 1000,
        avatars: set[str] | None = None,
        livekit_url: str = "ws://127.0.0.1:7880",
        room_avatars: RoomAvatarHost | None = None,
    ) -> None:
        """`room_avatars`: a started session gets a real avatar participant (video, a voice while
        it talks, the data-channel events) in its room on that test LiveKit server."""
        self.api_key = api_key
        self.room_avatars = room_avatars
        if room_avatars is not None:
            livekit_url = room_avatars.url
        self.max_concurrent = max_concurrent
        self.capacity_status = capacity_status
        self.capacity_code = capacity_code
        self.capacity_message = capacity_message
        self.speech_ms_per_char = speech_ms_per_char
        self.reported_ms_per_char = reported_ms_per_char
        self.idle_timeout_s = idle_timeout_s
        self.duration_limit_s = duration_limit_s
        self.task_max_chars = task_max_chars
        self.avatars = avatars
        self.livekit_url = livekit_url
        self.calls: list[Call] = []
        self.sessions: dict[str, FakeSession] = {}
        self.knowledge_bases: dict[str, dict[str, str]] = {}
        self.issued_tokens: dict[str, str | None] = {}  # token -> the session it created
        self._failures: dict[str, list[tuple[int, dict[str, Any]]]] = {}
        self._lock = threading.RLock()
        self.port = 0
        self.app = FastAPI()
        self.app.add_api_route("/{path:path}", self._handle, methods=["GET", "POST"])

    # ---- test helpers (lifecycle: see ThreadedFake)

    def stack_env(self, **extra: str) -> dict[str, str]:
        """The settings that point a stack's avatar worker at this fake, plus `extra`."""
        return {
            "AVATAR_PROVIDER": "heygen", "HEYGEN_API_KEY": self.api_key, "HEYGEN_SERVER_URL": self.url,
            "HEYGEN_AVATAR_ID": "Anna_public", **extra,
        }

    def fail_next(self, path: str, status: int = 503, body: dict[str, Any] | None = None, times: int = 1) -> None:
        """The next `times` requests to `path` fail with `status` (a transient outage, by default)."""
        with self._lock:
            failure = (status, body or {"code": 50000, "message": "Service temporarily unavailable"})
            self._failures.setdefault(path, []).extend([failure] * times)

    def add_session(self, *, age_s: float = 0.0, status: str = "connected") -> str:
        """A vendor session nobody in the stack created (a leak from a crashed deployment)."""
        with self._lock:
            s = self._new_session(None, {"version": "v2"}, time.time() - age_s)
            s.status = status
            return s.session_id

    def close(self, session_id: str, reason: str = "vendor") -> None:
        """End a session on the vendor side (its own idle timeout, duration limit, an outage)."""
        with self._lock:
            self._close(self.sessions[session_id], reason)

    def session(self, session_id: str) -> FakeSession:
        with self._lock:
            s = self.sessions[session_id]
            self._expire_idle(s)
            return s

    def open_sessions(self) -> list[str]:
        """Ids of sessions not closed (what counts against the concurrency cap)."""
        with self._lock:
            for s in self.sessions.values():
                self._expire_idle(s)
            return [s.session_id for s in self.sessions.values() if s.status != "closed"]

    def by_access_token(self, access_token: str) -> str | None:
        """The session whose LiveKit room a browser with this token joins (what a page does)."""
        with self._lock:
            return next((s.session_id for s in self.sessions.values() if s.access_token == access_token), None)

    def calls_to(self, path: str, session_id: str | None = None) -> list[Call]:
        with self._lock:
            return [c for c in self.calls if c.path == path and (session_id is None or c.session_id == session_id)]

    def paths(self, session_id: str | None = None) -> list[str]:
        with self._lock:
            return [c.path for c in self.calls if session_id is None or c.session_id == session_id]

    def channel(self, session_id: str) -> list[dict[str, Any]]:
        """Data-channel events of the session that are due now, oldest first (a stable prefix)."""
        now = time.monotonic()
        with self._lock:
            timeline: list[tuple[float, int, dict[str, Any]]] = []
            for t in self.sessions[session_id].tasks:
                if t.start <= now:
                    timeline.append((t.start, 0, {"type": "avatar_start_talking", "task_id": t.task_id}))
                if t.end <= now:
                    duration_ms = (t.end - t.start) * 1000
                    stop = {"type": "avatar_stop_talking", "task_id": t.task_id, "duration_ms": duration_ms}
                    timeline.append((t.end, 1, stop))
        return [event for _, _, event in sorted(timeline, key=lambda x: (x[0], x[1]))]

    # ---- HTTP

    async def _handle(self, request: Request, path: str) -> JSONResponse:
        full = "/" + path
        body: dict[str, Any] = {}
        raw = await request.body()
        if raw:
            try:
                parsed = json.loads(raw)
                body = parsed if isinstance(parsed, dict) else {"_": parsed}
            except ValueError:
                error = {"code": CODE_BAD_REQUEST, "message": "bad json"}
                return self._record(request.method, full, {}, "none", 400, error)
        with self._lock:
            auth, token = self._auth(request)
            try:
                failure = self._failures.get(full)
                if failure:
                    status, payload = failure.pop(0)
                    return self._record(request.method, full, body, auth, status, payload)
                if auth == "bad" or auth == "none":
                    raise FakeError(401, CODE_INVALID_CREDENTIALS, "Unauthorized: invalid API key or token")
                payload = self._dispatch(request.method, full, body, auth, token)
                status = 200
            except FakeError as exc:
                status, payload = exc.status, {"code": exc.code, "message": exc.message}
            return self._record(request.method, full, body, auth, status, payload)

    def _record(
        self, method: str, path: str, body: dict[str, Any], auth: str, status: int, payload: dict[str, Any]
    ) -> JSONResponse:
        sid = body.get("session_id") if isinstance(body.get("session_id"), str) else None
        if sid is None and path == "/v1/streaming.new" and status == 200:
            sid = payload["data"]["session_id"]
        clean = {k: v for k, v in body.items() if not any(word in k.lower() for word in SECRET_FIELD_WORDS)}
        code = payload.get("code") if status >= 400 else None
        with self._lock:
            self.calls.append(Call(method, path, clean, auth, status, code, sid))
        return JSONResponse(payload, status_code=status)

    def _auth(self, request: Request) -> tuple[str, str | None]:
        key = request.headers.get("x-api-key")
        if key is not None:
            return ("api_key" if hmac.compare_digest(key, self.api_key) else "bad"), None
        authorization = request.headers.get("authorization", "")
        if authorization.lower().startswith("bearer "):
            token = authorization[7:].strip()
            return ("bearer" if token in self.issued_tokens else "bad"), token
        return "none", None

    def _dispatch(self, method: str, path: str, body: dict[str, Any], auth: str, token: str | None) -> dict[str, Any]:
        if method == "POST" and path == "/v1/streaming.create_token":
            if auth != "api_key":
                raise FakeError(401, CODE_INVALID_CREDENTIALS, "create_token needs the API key")
            new_token = base64.urlsafe_b64encode(uuid.uuid4().bytes * 2).decode().rstrip("=")
            self.issued_tokens[new_token] = None
            return {"error": None, "data": {"token": new_token}}
        if method == "POST" and path == "/v1/streaming.new":
            return ok(self._create(body, token))
        if method == "GET" and path == "/v1/streaming.list":
            sessions = []
            for s in self.sessions.values():
                self._expire_idle(s)
                if s.status != "closed":
                    sessions.append({"session_id": s.session_id, "status": s.status, "created_at": int(s.created_at)})
            return ok({"sessions": sessions})
        if method == "GET" and path == "/v1/streaming/knowledge_base/list":
            return ok({"list": [{"id": k, **v} for k, v in self.knowledge_bases.items()]})
        if method == "POST" and path == "/v1/streaming/knowledge_base/create":
            if not str(body.get("name", "")).strip() or not str(body.get("prompt", "")).strip():
                raise FakeError(400, CODE_BAD_REQUEST, "name and prompt are required")
            kb_id = uuid.uuid4().hex
            self.knowledge_bases[kb_id] = {
                "name": body["name"], "opening": body.get("opening", ""), "prompt": body["prompt"],
            }
            return ok({"id": kb_id})
        if method == "POST" and path in SESSION_PATHS:
            return self._session_call(path, body, auth, token)
        raise FakeError(404, 404, f"no such endpoint: {method} {path}")

    def _create(self, body: dict[str, Any], token: str | None) -> dict[str, Any]:
        if token is not None and self.issued_tokens.get(token) is not None:
            raise FakeError(400, CODE_BAD_REQUEST, "this session token has already been used")
        if body.get("version") != "v2":
            raise FakeError(400, CODE_BAD_REQUEST, 'only version "v2" (LiveKit) is supported')
        avatar = body.get("avatar_id") or body.get("avatar_name")
        if self.avatars is not None and avatar not in self.avatars:
            raise FakeError(400, CODE_AVATAR_NOT_FOUND, "avatar not found")
        kb = body.get("knowledge_base_id") or body.get("knowledge_id")
        if kb and kb not in self.knowledge_bases:
            raise FakeError(400, CODE_BAD_REQUEST, "knowledge base not found")
        if body.get("quality", "medium") not in ("low", "medium", "high"):
            raise FakeError(400, CODE_BAD_REQUEST, "invalid quality")
        if body.get("video_encoding", "VP8") not in ("VP8", "H264"):
            raise FakeError(400, CODE_BAD_REQUEST, "invalid video_encoding")
        if len(self.open_sessions()) >= self.max_concurrent:
            raise FakeError(self.capacity_status, self.capacity_code, self.capacity_message)
        s = self._new_session(token, body, time.time())
        if token is not None:
            self.issued_tokens[token] = s.session_id
        return {
            "session_id": s.session_id,
            "url": self.livekit_url,
            "access_token": s.access_token,
            "livekit_agent_token": livekit_token(f"agent-{s.session_id[:8]}", s.session_id),
            "realtime_endpoint": f"ws://127.0.0.1:{self.port}/v2-alpha/interactive-avatar/session/{s.session_id}",
            "session_duration_limit": int(self.duration_limit_s),
            "is_paid": False,
            "sdp": None,
            "ice_servers": None,
            "ice_servers2": None,
        }

    def _new_session(self, token: str | None, body: dict[str, Any], created_at: float) -> FakeSession:
        sid = str(uuid.uuid1())
        requested = body.get("activity_idle_timeout", 120)
        s = FakeSession(
            session_id=sid, token=token, request=dict(body), created_at=created_at,
            idle_timeout_s=float(requested) if isinstance(requested, int | float) else 120.0,
            last_activity=time.monotonic(), access_token=livekit_token(f"user-{sid[:8]}", sid),
        )
        self.sessions[sid] = s
        return s

    def _session_call(self, path: str, body: dict[str, Any], auth: str, token: str | None) -> dict[str, Any]:
        sid = body.get("session_id")
        if not isinstance(sid, str) or not sid:
            raise FakeError(400, CODE_BAD_REQUEST, "session_id is required")
        s = self.sessions.get(sid)
        if s is None:
            raise FakeError(400, CODE_NOT_FOUND, "Session not found")
        if auth == "bearer" and self.issued_tokens.get(token or "") != sid:
            raise FakeError(401, CODE_INVALID_CREDENTIALS, "token is not valid for this session")
        self._expire_idle(s)
        now = time.monotonic()
        if path == "/v1/streaming.stop":
            if s.status == "closed":
                raise FakeError(400, CODE_WRONG_STATE, "Session is not in correct state")
            self._close(s, "stopped")
            return {"status": "success"}
        if path == "/v1/streaming.keep_alive":
            if s.status == "closed":
                raise FakeError(400, CODE_WRONG_STATE, "Session is not in correct state")
            s.last_activity = max(s.last_activity, now)
            return ok(None)
        if path == "/v1/streaming.start":
            if s.status != "new":
                raise FakeError(400, CODE_WRONG_STATE, "Session is not in correct state")
            s.status = "connected"
            s.started_at = now
            s.last_activity = max(s.last_activity, now)
            if self.room_avatars is not None:
                self.room_avatars.join(sid, events=lambda: self.channel(sid))
            return ok(None)
        if s.status != "connected":
            raise FakeError(400, CODE_WRONG_STATE, "Session is not in correct state")
        s.last_activity = max(s.last_activity, now)
        if path == "/v1/streaming.task":
            return ok(self._task(s, body, now))
        if path == "/v1/streaming.interrupt":
            self._cut(s, now)
        return ok(None)

    def _task(self, s: FakeSession, body: dict[str, Any], now: float) -> dict[str, Any]:
        text = body.get("text")
        task_type = body.get("task_type", "repeat")
        if not isinstance(text, str) or not text.strip():
            raise FakeError(400, CODE_BAD_REQUEST, "text is required")
        if len(text) > self.task_max_chars:
            raise FakeError(400, CODE_BAD_REQUEST, f"text is longer than {self.task_max_chars} characters")
        if task_type not in ("repeat", "talk", "chat"):
            raise FakeError(400, CODE_BAD_REQUEST, "invalid task_type")
        if body.get("task_mode", "sync") not in ("sync", "async"):
            raise FakeError(400, CODE_BAD_REQUEST, "invalid task_mode")
        said = text if task_type == "repeat" else f"Thanks for asking about {text[:60]}. Here is what I know."
        start = max([now, *(t.end for t in s.tasks)])
        end = start + len(said) * self.speech_ms_per_char / 1000
        task = FakeTask(uuid.uuid4().hex, said, task_type, start, end)
        s.tasks.append(task)
        s.last_activity = max(s.last_activity, end)
        reported = self.speech_ms_per_char if self.reported_ms_per_char is None else self.reported_ms_per_char
        return {"task_id": task.task_id, "duration_ms": len(said) * reported}

    def _cut(self, s: FakeSession, now: float) -> None:
        """Stop the current speech now and drop what was queued behind it."""
        kept = []
        for t in s.tasks:
            if t.start > now:
                continue
            if t.end > now:
                t.end, t.interrupted = now, True
            kept.append(t)
        s.tasks = kept

    def _close(self, s: FakeSession, reason: str) -> None:
        if s.status != "closed":
            self._cut(s, time.monotonic())
            s.status, s.closed_reason = "closed", reason
            if self.room_avatars is not None:
                self.room_avatars.leave(s.session_id)

    def _expire_idle(self, s: FakeSession) -> None:
        """Close a session past its idle timeout or its duration limit (evaluated when looked at)."""
        limit = self.idle_timeout_s if self.idle_timeout_s is not None else s.idle_timeout_s
        now = time.monotonic()
        if s.status != "closed" and s.started_at is not None and now - s.started_at >= self.duration_limit_s:
            self._close(s, "duration_limit")
        elif s.status != "closed" and now - s.last_activity > limit:
            self._close(s, "idle_timeout")


def ok(data: Any) -> dict[str, Any]:
    return {"code": CODE_OK, "message": "success", "data": data}


def livekit_token(identity: str, room: str, ttl_s: int = 6 * 3600) -> str:
    """An HS256 LiveKit access token for the dev server (reference §4.2), minted with the stdlib."""

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).decode().rstrip("=")

    now = int(time.time())
    claims = {
        "iss": LIVEKIT_API_KEY, "sub": identity, "nbf": now, "exp": now + ttl_s,
        "video": {"roomJoin": True, "room": room, "canPublish": True, "canSubscribe": True, "canPublishData": True},
    }
    head = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    payload = b64(json.dumps(claims, separators=(",", ":")).encode())
    sig = hmac.new(LIVEKIT_API_SECRET.encode(), f"{head}.{payload}".encode(), hashlib.sha256).digest()
    return f"{head}.{payload}.{b64(sig)}"

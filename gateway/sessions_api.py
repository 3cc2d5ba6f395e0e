"""REST API for sessions: create, inspect, list, end."""

from __future__ import annotations

import hmac
import time

from fastapi import APIRouter, Body, Header, HTTPException, Request, status
from prometheus_client import Counter

from common import keys
from common.jobs import JobStream
from common.models import SessionConfig, SessionCreated, SessionInfo
from gateway.admission import all_pools

router = APIRouter(prefix="/v1/sessions", tags=["sessions"])

SESSIONS_CREATED = Counter("gateway_sessions_created_total", "Sessions created")
SESSIONS_REFUSED = Counter("gateway_sessions_refused_total", "Sessions refused for lack of capacity", ["pool"])


def _bearer(authorization: str | None, x_api_key: str | None) -> str:
    if x_api_key:
        return x_api_key
    if authorization and authorization.lower().startswith("bearer "):
        return authorization[7:].strip()
    return ""


def _is_admin(request: Request, credential: str) -> bool:
    key = request.app.state.settings.gateway_api_key
    return bool(key) and bool(credential) and hmac.compare_digest(credential, key.get_secret_value())


def _require_api_key(request: Request, credential: str) -> None:
    """When GATEWAY_API_KEY is set, only holders of it may create or list sessions."""
    if request.app.state.settings.gateway_api_key and not _is_admin(request, credential):
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "a valid API key is required")


async def _require_session_access(request: Request, sid: str, credential: str) -> None:
    if _is_admin(request, credential):
        if await request.app.state.store.get(sid) is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, "unknown session")
        return
    ok = await request.app.state.store.check_token(sid, credential)
    if ok is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "unknown session")
    if not ok:
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "invalid session token")


def _ws_url(request: Request, sid: str) -> str:
    public = request.app.state.settings.gateway_public_url.rstrip("/")
    base = public or str(request.base_url).rstrip("/")
    base = base.replace("https://", "wss://", 1).replace("http://", "ws://", 1)
    return f"{base}/v1/sessions/{sid}/ws"


@router.post("", status_code=status.HTTP_201_CREATED, response_model=SessionCreated)
async def create_session(
    request: Request,
    config: SessionConfig | None = Body(default=None),
    authorization: str | None = Header(default=None),
    x_api_key: str | None = Header(default=None),
) -> SessionCreated:
    _require_api_key(request, _bearer(authorization, x_api_key))
    settings = request.app.state.settings
    if settings.admission_control:
        for pool in await all_pools(request.app.state.redis, settings.worker_stale_s):
            if pool.room <= 0:
                SESSIONS_REFUSED.labels(pool.kind).inc()
                what = "no worker is running" if pool.workers == 0 else "every worker is at capacity"
                raise HTTPException(
                    status.HTTP_503_SERVICE_UNAVAILABLE,
                    f"all {pool.kind} workers are busy ({what}); try again shortly",
                    headers={"Retry-After": "5"},
                )
    store = request.app.state.store
    sid, token = await store.create(config or SessionConfig())
    r = request.app.state.redis
    await JobStream.submit(r, keys.JOBS_STT, sid)
    await JobStream.submit(r, keys.JOBS_AVATAR, sid)
    SESSIONS_CREATED.inc()
    return SessionCreated(session_id=sid, token=token, ws_url=_ws_url(request, sid))


@router.get("", response_model=list[SessionInfo])
async def list_sessions(
    request: Request,
    authorization: str | None = Header(default=None),
    x_api_key: str | None = Header(default=None),
) -> list[SessionInfo]:
    _require_api_key(request, _bearer(authorization, x_api_key))
    store = request.app.state.store
    infos = []
    for sid in await store.live_ids():
        record = await store.get(sid)
        if record:
            infos.append(_info(sid, record))
    return infos


@router.get("/{sid}", response_model=SessionInfo)
async def get_session(
    request: Request,
    sid: str,
    authorization: str | None = Header(default=None),
    x_api_key: str | None = Header(default=None),
) -> SessionInfo:
    await _require_session_access(request, sid, _bearer(authorization, x_api_key))
    record = await request.app.state.store.get(sid)
    if record is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "unknown session")
    return _info(sid, record)


@router.delete("/{sid}", status_code=status.HTTP_204_NO_CONTENT)
async def end_session(
    request: Request,
    sid: str,
    authorization: str | None = Header(default=None),
    x_api_key: str | None = Header(default=None),
) -> None:
    await _require_session_access(request, sid, _bearer(authorization, x_api_key))
    await request.app.state.store.end(sid, "deleted")


def _info(sid: str, record: dict[str, str]) -> SessionInfo:
    return SessionInfo(
        session_id=sid,
        state=record.get(keys.F_STATE, "unknown"),
        created_at=float(record.get(keys.F_CREATED, time.time())),
        connected=int(record.get(keys.F_CONNECTED, "0") or 0) > 0,
        stt_owner=record.get(keys.F_STT_OWNER),
        avatar_owner=record.get(keys.F_AVATAR_OWNER),
        ended_reason=record.get(keys.F_ENDED_REASON),
    )

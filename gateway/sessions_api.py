"""REST API for sessions: create, inspect, list, end."""

from __future__ import annotations

import hmac
import math
import time
from typing import Any

from fastapi import APIRouter, Body, Header, HTTPException, Request, status
from prometheus_client import Counter
from pydantic import BaseModel

from common import keys
from common.jobs import JobStream
from common.models import SessionConfig, SessionCreated, SessionInfo
from gateway.admission import all_pools
from gateway.ratelimit import SharedTokenBuckets

router = APIRouter(prefix="/v1/sessions", tags=["sessions"])

SESSIONS_CREATED = Counter("gateway_sessions_created_total", "Sessions created")
SESSIONS_REFUSED = Counter("gateway_sessions_refused_total", "Sessions refused for lack of capacity", ["pool"])
SESSIONS_RATE_LIMITED = Counter("gateway_sessions_rate_limited_total", "Session creations refused: too many per client")


class ApiError(BaseModel):
    """The body of every refusal (FastAPI's HTTPException shape)."""

    detail: str


_RETRY_AFTER = {"Retry-After": {"description": "seconds to wait before trying again", "schema": {"type": "integer"}}}
_REFUSALS: dict[int, dict[str, Any]] = {
    400: {"model": ApiError, "description": "a body that cannot be read as JSON (e.g. not UTF-8)"},
    401: {"model": ApiError, "description": "missing or wrong API key or session token"},
    403: {"model": ApiError, "description": "sent by a page of an origin not in ALLOWED_ORIGINS"},
    404: {"model": ApiError, "description": "unknown session"},
    429: {"model": ApiError, "description": "too many sessions created from this address", "headers": _RETRY_AFTER},
    503: {"model": ApiError, "description": "a worker pool is full", "headers": _RETRY_AFTER},
}


def _refusals(*codes: int) -> dict[int | str, dict[str, Any]]:
    """Every status a route can answer is in the OpenAPI schema, so clients can rely on it (and the
    fuzz tests in tests/test_fuzz.py hold the gateway to it)."""
    return {code: _REFUSALS[code] for code in codes}


def _bearer(authorization: str | None, x_api_key: str | None) -> str:
    if x_api_key:
        return x_api_key
    if authorization and authorization.lower().startswith("bearer "):
        return authorization[7:].strip()
    return ""


def _is_admin(request: Request, credential: str) -> bool:
    key = request.app.state.settings.gateway_api_key
    if not key or not credential:
        return False
    # As bytes: compare_digest refuses str with non-ASCII characters (a header may carry any latin-1).
    return hmac.compare_digest(credential.encode(), key.get_secret_value().encode())


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


async def _limit_creation_rate(request: Request) -> None:
    """A token bucket per client address (after uvicorn's proxy headers), shared by every gateway
    through Redis (SESSION_CREATE_RATE_SCOPE=redis) or this process's own."""
    client = request.client.host if request.client else "unknown"
    buckets = request.app.state.session_buckets
    wait = await buckets.take(client) if isinstance(buckets, SharedTokenBuckets) else buckets.take(client)
    if wait > 0:
        SESSIONS_RATE_LIMITED.inc()
        retry = max(1, math.ceil(wait))
        raise HTTPException(
            status.HTTP_429_TOO_MANY_REQUESTS,
            f"too many sessions created from this address; try again in {retry} s",
            headers={"Retry-After": str(retry)},
        )


def _ws_url(request: Request, sid: str) -> str:
    public = request.app.state.settings.gateway_public_url.rstrip("/")
    base = public or str(request.base_url).rstrip("/")
    base = base.replace("https://", "wss://", 1).replace("http://", "ws://", 1)
    return f"{base}/v1/sessions/{sid}/ws"


@router.post(
    "", status_code=status.HTTP_201_CREATED, response_model=SessionCreated, responses=_refusals(400, 401, 403, 429, 503)
)
async def create_session(
    request: Request,
    config: SessionConfig | None = Body(default=None),
    authorization: str | None = Header(default=None),
    x_api_key: str | None = Header(default=None),
) -> SessionCreated:
    credential = _bearer(authorization, x_api_key)
    if not _is_admin(request, credential):
        # Holders of GATEWAY_API_KEY are a trusted backend creating sessions for many users from one
        # address; everyone else is limited, which also slows guessing the key.
        await _limit_creation_rate(request)
    _require_api_key(request, credential)
    return await _create(request, config)


async def _create(request: Request, config: SessionConfig | None) -> SessionCreated:
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


# Demo mode (GATEWAY_DEMO_SESSIONS=true): the gateway acts as the "customer backend" of its own
# bundled page, so the page works while GATEWAY_API_KEY guards /v1/sessions. Anyone who can reach
# the gateway can then create sessions (rate-limited per address, origin-checked like every POST):
# a demo, never production. Mounted only when the setting is on.
demo_router = APIRouter(prefix="/demo", tags=["demo"])


@demo_router.post(
    "/sessions",
    status_code=status.HTTP_201_CREATED,
    response_model=SessionCreated,
    responses=_refusals(400, 403, 429, 503),
)
async def create_demo_session(request: Request, config: SessionConfig | None = Body(default=None)) -> SessionCreated:
    """A session for the bundled page, without the API key: what a customer's backend does."""
    await _limit_creation_rate(request)
    return await _create(request, config)


@router.get("", response_model=list[SessionInfo], responses=_refusals(401))
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
            infos.append(_info(sid, record, await store.disconnected_since(sid) is None))
    return infos


@router.get("/{sid}", response_model=SessionInfo, responses=_refusals(401, 404))
async def get_session(
    request: Request,
    sid: str,
    authorization: str | None = Header(default=None),
    x_api_key: str | None = Header(default=None),
) -> SessionInfo:
    await _require_session_access(request, sid, _bearer(authorization, x_api_key))
    store = request.app.state.store
    record = await store.get(sid)
    if record is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "unknown session")
    return _info(sid, record, await store.disconnected_since(sid) is None)


@router.delete("/{sid}", status_code=status.HTTP_204_NO_CONTENT, responses=_refusals(401, 403, 404))
async def end_session(
    request: Request,
    sid: str,
    authorization: str | None = Header(default=None),
    x_api_key: str | None = Header(default=None),
) -> None:
    await _require_session_access(request, sid, _bearer(authorization, x_api_key))
    await request.app.state.store.end(sid, "deleted")


def _info(sid: str, record: dict[str, str], connected: bool) -> SessionInfo:
    return SessionInfo(
        session_id=sid,
        state=record.get(keys.F_STATE, "unknown"),
        created_at=float(record.get(keys.F_CREATED, time.time())),
        connected=connected,
        stt_owner=record.get(keys.F_STT_OWNER),
        avatar_owner=record.get(keys.F_AVATAR_OWNER),
        ended_reason=record.get(keys.F_ENDED_REASON),
    )

"""The gateway's FastAPI app: session REST API, the browser WebSocket, health, metrics, the page."""

from __future__ import annotations

from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.middleware.trustedhost import TrustedHostMiddleware

from common.build_info import package_version, set_build_info
from common.bus import REDIS_ERRORS, Bus, connect
from common.exposition import EXPOSED
from common.metrics import serve_metrics
from common.service import freeze_startup_objects
from common.sessions import SessionStore
from common.settings import Settings, get_settings
from gateway import browser_ws, sessions_api
from gateway.admission import all_pools
from gateway.origins import OriginGuard, OriginPolicy, trusted_hosts
from gateway.ratelimit import SharedTokenBuckets, TokenBuckets

FRONTEND_DIR = Path(__file__).resolve().parent.parent / "frontend"


class PageFiles(StaticFiles):
    """The page's files and the browser build of livekit-client, minus what only setup needs."""

    HIDDEN = ("node_modules", "package.json", "package-lock.json", "setup.sh", "README.md")
    SHOWN = ("node_modules", "livekit-client", "dist")  # the one npm folder the page loads

    def lookup_path(self, path: str):
        parts = Path(path).parts
        if parts[:3] != self.SHOWN and any(p in self.HIDDEN or p.startswith(".") for p in parts):
            return "", None
        return super().lookup_path(path)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        r = connect(settings)
        bus = Bus(r, settings)
        app.state.settings = settings
        app.state.redis = r
        app.state.bus = bus
        app.state.store = SessionStore(r, bus)
        if settings.session_create_rate_scope == "redis":  # one bucket per client for all gateways
            app.state.session_buckets = SharedTokenBuckets(
                r, settings.session_create_rate_per_min, settings.session_create_burst,
                fallback=app.state.session_buckets,
            )
        if settings.gateway_metrics_port:  # /metrics on a port of its own, off the public one
            app.state.metrics_port = serve_metrics(settings.metrics_host, settings.gateway_metrics_port)
        try:
            freeze_startup_objects()
            yield
        finally:
            await r.aclose()

    app = FastAPI(title="avatar-stack gateway", version=package_version(), lifespan=lifespan)
    set_build_info("gateway")
    origins = OriginPolicy.from_settings(settings)
    app.state.origins = origins  # also checked by the browser WebSocket
    app.state.session_buckets = TokenBuckets(settings.session_create_rate_per_min, settings.session_create_burst)
    app.add_middleware(OriginGuard, policy=origins)
    app.add_middleware(  # answers preflights; other origins get no CORS headers
        CORSMiddleware,
        allow_origins=origins.cors_origins(),
        allow_methods=["GET", "POST", "DELETE"],
        allow_headers=["Authorization", "Content-Type", "X-API-Key"],
        max_age=600,
    )
    # Outermost: a request for a host name we do not serve gets 400 before anything else runs.
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=trusted_hosts(settings), www_redirect=False)
    app.include_router(sessions_api.router)
    app.include_router(browser_ws.router)
    if settings.gateway_demo_sessions:
        app.include_router(sessions_api.demo_router)

    @app.get("/healthz", tags=["ops"])
    async def healthz() -> JSONResponse:
        try:
            await app.state.redis.ping()
        except REDIS_ERRORS:
            return JSONResponse({"status": "degraded", "redis": False}, status_code=503)
        return JSONResponse({"status": "ok", "redis": True})

    @app.get("/readyz", tags=["ops"])
    async def readyz() -> JSONResponse:
        """Ready = this gateway can serve: Redis answers. Worker pools being full is not a reason to
        leave the load balancer (every gateway sees the same pools): `POST /v1/sessions` answers
        that per request, 503 + Retry-After. The pools are reported here for people and dashboards."""
        try:
            await app.state.redis.ping()
        except REDIS_ERRORS:
            return JSONResponse({"ready": False, "redis": False}, status_code=503)
        body: dict = {"ready": True, "redis": True}
        try:
            pools = await all_pools(app.state.redis, settings.worker_stale_s)
            body["pools"] = {p.kind: p.as_dict() for p in pools}
        except REDIS_ERRORS:
            pass
        return JSONResponse(body)

    @app.get("/metrics", tags=["ops"], include_in_schema=False)
    async def metrics() -> Response:
        if settings.gateway_metrics_port:
            return Response(status_code=404)  # served on GATEWAY_METRICS_PORT, not to the public
        return Response(generate_latest(EXPOSED), media_type=CONTENT_TYPE_LATEST)

    frontend = Path(settings.frontend_dir) if settings.frontend_dir else FRONTEND_DIR
    if frontend.is_dir():
        app.mount("/", PageFiles(directory=frontend, html=True), name="frontend")
    return app

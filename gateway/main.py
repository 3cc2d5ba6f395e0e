"""Entry point of the gateway service: `avatar-stack gateway`."""

from __future__ import annotations

import uvicorn

from common.logs import setup_logging
from common.settings import Settings, get_settings
from gateway.app import create_app


def run(settings: Settings | None = None) -> None:
    settings = settings or get_settings()
    setup_logging("gateway", settings.log_level)
    uvicorn.run(
        create_app(settings),
        host=settings.gateway_host,
        port=settings.gateway_port,
        loop="uvloop",
        access_log=False,  # request lines carry the socket token in the query string
        log_config=None,
        ws_max_size=256 * 1024,  # bigger than any valid frame, so oversize gets our 1009 + reason
        ws_ping_interval=20,
        ws_ping_timeout=20,
        timeout_graceful_shutdown=5,
    )

"""Entry point of the gateway service: `avatar-stack gateway`."""

from __future__ import annotations

import uvicorn

from common.logs import setup_logging
from common.settings import Settings, get_settings
from common.tracing import setup_tracing
from gateway.app import create_app


def run(settings: Settings | None = None) -> None:
    settings = settings or get_settings()
    setup_logging("gateway", settings.log_level)
    setup_tracing("gateway", settings)
    uvicorn.run(
        create_app(settings),
        host=settings.gateway_host,
        port=settings.gateway_port,
        loop="uvloop",
        access_log=False,  # request lines carry the socket token in the query string
        log_config=None,
        # The sans-I/O implementation honours the socket's flow control: a send to a page that does
        # not read waits (bounded write buffer) instead of queueing, and reading pauses after each
        # message until the app takes it. `ws_max_queue` only applies to the legacy "websockets" one.
        ws="websockets-sansio",
        ws_max_size=256 * 1024,  # bigger than any valid frame, so oversize gets our 1009 + reason
        ws_per_message_deflate=False,  # PCM does not deflate: compressing it only burned CPU (profiled)
        ws_ping_interval=20,
        ws_ping_timeout=20,
        timeout_graceful_shutdown=5,
        # Only these peers may set the client address (rate limit) and scheme (origin) by header.
        forwarded_allow_ips=settings.forwarded_allow_ips,
    )

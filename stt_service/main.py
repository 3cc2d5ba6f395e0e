"""Entry point of the STT worker: `avatar-stack stt-worker`."""

from __future__ import annotations

import asyncio

import redis.asyncio as aioredis

from common.metrics import serve_metrics
from common.service import run_service
from common.settings import Settings, get_settings
from stt_service.providers import make_engine
from stt_service.worker import SttWorker


def run(settings: Settings | None = None) -> None:
    settings = settings or get_settings()

    async def runner(r: aioredis.Redis, stop: asyncio.Event) -> None:
        worker = SttWorker(r, settings, make_engine(settings))
        worker.claims.metrics_port = serve_metrics(
            settings.metrics_host, settings.stt_metrics_port, worker.claims.health
        )
        await worker.run(stop)

    run_service("stt", settings, runner)

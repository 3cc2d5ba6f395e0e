"""Entry point of the avatar worker: `avatar-stack avatar-worker`."""

from __future__ import annotations

import asyncio
from pathlib import Path

import redis.asyncio as aioredis

from avatar_service.brain import make_brain
from avatar_service.providers import make_driver
from avatar_service.reaper import run_reaper
from avatar_service.responder import LocalResponder
from avatar_service.worker import AvatarWorker
from common.bus import Bus
from common.metrics import serve_metrics
from common.service import run_service
from common.settings import Settings, get_settings

DEFAULT_KNOWLEDGE = Path(__file__).resolve().parent / "knowledge.md"


def run(settings: Settings | None = None) -> None:
    settings = settings or get_settings()

    async def runner(r: aioredis.Redis, stop: asyncio.Event) -> None:
        driver = await asyncio.to_thread(make_driver, settings, Bus(r, settings))
        responder = LocalResponder(Path(settings.knowledge_file or DEFAULT_KNOWLEDGE))
        # Vendor sessions that no live session owns (a crash between create and record, a lost
        # Redis) cost money: the reaper stops them.
        reaper = asyncio.create_task(run_reaper(r, settings, stop)) if driver.name != "local" else None
        try:
            worker = AvatarWorker(r, settings, driver, make_brain(r, settings, responder))
            worker.claims.metrics_port = serve_metrics(
                settings.metrics_host, settings.avatar_metrics_port, worker.claims.health
            )
            await worker.run(stop)
        finally:
            if reaper is not None:
                reaper.cancel()
                await asyncio.gather(reaper, return_exceptions=True)

    run_service("avatar", settings, runner)

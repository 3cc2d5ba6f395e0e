"""Running a worker process: logging, Redis, and a clean stop on SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
from collections.abc import Awaitable, Callable

import redis.asyncio as aioredis
import uvloop

from common.build_info import set_build_info
from common.bus import connect, wait_for_redis
from common.logs import setup_logging
from common.settings import Settings
from common.tracing import setup_tracing

log = logging.getLogger(__name__)

Runner = Callable[[aioredis.Redis, asyncio.Event], Awaitable[None]]


def run_service(name: str, settings: Settings, runner: Runner) -> None:
    setup_logging(name, settings.log_level)
    set_build_info(name)
    setup_tracing(name, settings)
    uvloop.run(_main(name, settings, runner))


async def _main(name: str, settings: Settings, runner: Runner) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    r = connect(settings)
    try:
        await wait_for_redis(r, timeout_s=60)
        await runner(r, stop)
    finally:
        await r.aclose()
        log.info("%s stopped", name)


def freeze_startup_objects() -> None:
    """Modules, models and app objects live as long as the process: move them out of the garbage
    collector's full passes (`gc.freeze`), whose pauses otherwise grow with them and land on
    whatever frame or event is in flight."""
    gc.collect()
    gc.freeze()

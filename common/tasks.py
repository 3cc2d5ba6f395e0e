"""Cancelling tasks so that they really stop.

On Python 3.11 `asyncio.wait_for` drops a cancel that arrives while the awaited call completes
(fixed in 3.12). redis-py wraps every command's send in `wait_for` when a socket timeout is set,
which we do (a read hung on a dead socket must end), so a task cancelled mid-command can go on
running: a browser socket's reader kept its session "connected" after the page left. Cancelling
again until the task ends closes that gap.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

CANCEL_AGAIN_S = 0.5


async def cancel_and_wait(tasks: Iterable[asyncio.Task], *, timeout_s: float | None = None) -> set[asyncio.Task]:
    """Cancel `tasks` (again every CANCEL_AGAIN_S while one runs on); returns those still running
    after `timeout_s` (None: wait for all). Only for tasks whose own cleanup does not await: a
    repeated cancel would cut that cleanup short."""
    loop = asyncio.get_running_loop()
    deadline = None if timeout_s is None else loop.time() + timeout_s
    pending = {task for task in tasks if not task.done()}
    while pending:
        for task in pending:
            task.cancel()
        wait_s = CANCEL_AGAIN_S if deadline is None else min(CANCEL_AGAIN_S, deadline - loop.time())
        if wait_s <= 0:
            break
        _, pending = await asyncio.wait(pending, timeout=wait_s)
    for task in tasks:  # retrieve results so no "exception was never retrieved" noise
        if task.done() and not task.cancelled():
            task.exception()
    return pending

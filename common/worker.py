"""The claim loop both workers run: take sessions while there is room, serve each in a task.

Compact on purpose (in the spirit of arq's worker): one loop that claims, one heartbeat that
keeps the leases and notices lost ones, and a per-session task running the service's `serve`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable

import orjson
import redis.asyncio as aioredis

from common import keys
from common.bus import REDIS_ERRORS, is_redis_failure
from common.jobs import Job, JobStream
from common.metrics import (
    SESSIONS_ACTIVE,
    SESSIONS_CLAIMED,
    SESSIONS_FAILED,
    SESSIONS_HANDED_BACK,
    SESSIONS_LOST,
    Health,
)
from common.models import ErrorEvent
from common.service import freeze_startup_objects
from common.sessions import SessionStore

log = logging.getLogger(__name__)

Serve = Callable[[Job], Awaitable[None]]
SHUTDOWN_TIMEOUT_S = 10.0
CANCEL_AGAIN_S = 0.5  # see ClaimLoop._cancel_sessions


def consumer_name(kind: str) -> str:
    return f"{kind}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class ClaimLoop:
    def __init__(
        self,
        r: aioredis.Redis,
        store: SessionStore,
        *,
        stream: str,
        group: str,
        kind: str,
        owner_field: str,
        capacity: int,
        lease_ms: int,
        heartbeat_ms: int,
        serve: Serve,
    ) -> None:
        self.store = store
        self.kind = kind
        self.owner_field = owner_field
        self.capacity = capacity
        self.heartbeat_s = heartbeat_ms / 1000
        self.consumer = consumer_name(kind)
        self.jobs = JobStream(r, stream, group, self.consumer, lease_ms)
        self.serve = serve
        self.active: dict[str, tuple[Job, asyncio.Task[None]]] = {}
        self._lost: set[str] = set()
        self._handing_back = False
        self._slot_freed = asyncio.Event()
        self.metrics_port = 0  # advertised, so ops and tests find this worker's /metrics
        # The probes on the metrics port: live while the heartbeat loop runs, ready while it reaches Redis
        self.health = Health(live_s=max(30.0, 10 * self.heartbeat_s), ready_s=max(5.0, 5 * self.heartbeat_s))

    @property
    def load(self) -> int:
        return len(self.active)

    async def run(self, stop: asyncio.Event) -> None:
        await self.jobs.ensure_group()
        freeze_startup_objects()  # models are loaded by now
        heartbeat = asyncio.create_task(self._heartbeat_loop(stop))
        log.info("%s worker %s ready, capacity %d", self.kind, self.consumer, self.capacity)
        try:
            while not stop.is_set():
                room = self.capacity - len(self.active)
                if room <= 0:
                    self._slot_freed.clear()
                    await _wait_any(self._slot_freed, stop, wait_s=1.0)
                    continue
                try:
                    jobs = await self.jobs.claim(room, block_ms=1000)
                except Exception as exc:
                    if not is_redis_failure(exc):
                        raise
                    log.warning("claiming failed (%r); retrying", exc)
                    await asyncio.sleep(1.0)
                    continue
                for job in jobs:
                    await self._start(job)
        finally:
            heartbeat.cancel()
            await self._shutdown()

    async def _start(self, job: Job) -> None:
        if job.entry_id in self.active:
            # Ours already: Redis was away longer than the lease (a restart, a cluster failover)
            # and XAUTOCLAIM gave us back our own entry. Serving it twice would answer twice.
            return
        if await self.store.is_ended(job.session_id):
            await self.jobs.done(job)
            return
        await self.store.set_fields(job.session_id, **{self.owner_field: self.consumer})
        log.info(
            "%s session %s %s", "took over" if job.taken_over else "claimed", job.session_id, self.kind
        )
        task = asyncio.create_task(self._run_session(job), name=f"{self.kind}:{job.session_id}")
        self.active[job.entry_id] = (job, task)
        SESSIONS_CLAIMED.labels(self.kind, "takeover" if job.taken_over else "new").inc()
        SESSIONS_ACTIVE.labels(self.kind).set(len(self.active))

    async def _run_session(self, job: Job) -> None:
        hand_back = False
        try:
            await self.serve(job)
        except asyncio.CancelledError:
            pass
        except Exception as exc:
            if is_redis_failure(exc):
                # Redis went away under the session: it is not over. Give it back, so it resumes
                # from its cursors (here or on another worker) once Redis answers again.
                log.warning("%s session %s lost Redis (%r); handing it back", self.kind, job.session_id, exc)
                hand_back = True
            else:
                hand_back = await self._fail(job)
        finally:
            self.active.pop(job.entry_id, None)
            SESSIONS_ACTIVE.labels(self.kind).set(len(self.active))
            self._slot_freed.set()
            if job.entry_id in self._lost:
                self._lost.discard(job.entry_id)
            elif self._handing_back or hand_back:
                SESSIONS_HANDED_BACK.labels(self.kind).inc()
                await _quietly(self.jobs.hand_back(job))
            else:
                await _quietly(self.jobs.done(job))

    async def _fail(self, job: Job) -> bool:
        """A bug served this session: end it with a clear error. True if even that needs Redis
        back (the session is handed back instead)."""
        log.exception("%s session %s failed", self.kind, job.session_id)
        SESSIONS_FAILED.labels(self.kind).inc()
        try:
            await self.store.bus.publish_event(
                job.session_id,
                ErrorEvent(code="internal_error", message=f"the {self.kind} service failed", fatal=True),
            )
            await self.store.end(job.session_id, f"{self.kind}_failed")
        except REDIS_ERRORS:
            log.exception("could not end failed session %s", job.session_id)
            return True
        return False

    async def advertise(self) -> None:
        """Tell the world (gateway admission, ops, tests) this worker's capacity and load."""
        entry = orjson.dumps(
            {"capacity": self.capacity, "load": self.load, "ts": time.time(), "metrics_port": self.metrics_port}
        )
        await self.jobs.r.hset(keys.workers(self.kind), self.consumer, entry)

    async def _heartbeat_loop(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            jobs = [job for job, _ in self.active.values()]
            try:
                await self.advertise()
                lost = await self.jobs.heartbeat(jobs)
                self.health.beat(ok=True)
            except Exception as exc:  # a heartbeat loop that died would lose every lease
                if is_redis_failure(exc):
                    log.warning("heartbeat failed: %r", exc)
                else:
                    log.exception("heartbeat failed")
                lost = set()
                self.health.beat(ok=False)
            for entry_id in lost & self.active.keys():
                job, task = self.active[entry_id]
                log.warning("lost session %s to another worker; stopping here", job.session_id)
                SESSIONS_LOST.labels(self.kind).inc()
                self._lost.add(entry_id)
                task.cancel()
            await asyncio.sleep(self.heartbeat_s)

    async def _shutdown(self) -> None:
        """Hand every live session back so another worker resumes it without waiting a lease."""
        self._handing_back = True
        self.health.stopping = True
        with contextlib.suppress(*REDIS_ERRORS):
            await self.jobs.r.hdel(keys.workers(self.kind), self.consumer)
        tasks = [task for _, task in self.active.values()]
        if tasks:
            await self._cancel_sessions(tasks)
            log.info("handed back %d session(s)", len(tasks))

    async def _cancel_sessions(self, tasks: list[asyncio.Task[None]]) -> None:
        """Cancel the session tasks and wait for them. One cancel is not enough: on Python 3.11
        `asyncio.wait_for`, which redis-py wraps every send in (we set `socket_timeout`), drops a
        cancel that lands while the send completes, and the session would go on serving next to
        the worker that took it over. So a task still serving (in `active`, i.e. not yet handing
        back) is cancelled again every CANCEL_AGAIN_S until it stops."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + SHUTDOWN_TIMEOUT_S
        pending, first = set(tasks), True
        while pending and (left := deadline - loop.time()) > 0:
            serving = pending & {task for _, task in self.active.values()}
            if serving and not first:
                log.warning("%d session(s) still serving after a cancel; cancelling again", len(serving))
            for task in serving:
                task.cancel()
            first = False
            _, pending = await asyncio.wait(pending, timeout=min(CANCEL_AGAIN_S, left))


async def _wait_any(a: asyncio.Event, b: asyncio.Event, wait_s: float) -> None:
    waiters = [asyncio.create_task(a.wait()), asyncio.create_task(b.wait())]
    try:
        await asyncio.wait(waiters, timeout=wait_s, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waiters:
            w.cancel()


async def _quietly(coro: Awaitable[object]) -> None:
    try:
        await coro
    except REDIS_ERRORS as exc:
        log.warning("job bookkeeping failed: %s", exc)

"""Redis Streams helpers: connect, publish events/turns/audio with bounded streams, read them.

Every XADD here carries a MAXLEN so no stream grows without bound.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable
from typing import TypeVar

import orjson
import redis
import redis.asyncio as aioredis
from pydantic import BaseModel
from redis.asyncio.cluster import ClusterNode, ClusterPipeline, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import ClusterDownError, RedisClusterException, RedisError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from common import keys, tracing
from common.models import Turn, turn_adapter
from common.pipelining import PipelinedXadd
from common.settings import Settings

log = logging.getLogger(__name__)
T = TypeVar("T")


# What "Redis failed" means to the services: a cluster client also raises RedisClusterException
# (not a RedisError) while it cannot map a slot to a node, e.g. during a failover.
REDIS_ERRORS: tuple[type[BaseException], ...] = (RedisError, OSError, RedisClusterException)
# The cluster client and the connections it drives: their state is what a failover half updates.
_CLUSTER_CLIENT_FILES = frozenset(
    os.path.join(os.path.dirname(redis.__file__), *path)
    for path in (("cluster.py",), ("asyncio", "cluster.py"), ("connection.py",), ("asyncio", "connection.py"))
)


# The event loop's own frames: asyncio's modules, and uvloop's (Cython names them "uvloop/...").
_LOOP_FILES = (os.path.dirname(asyncio.__file__) + os.sep, "uvloop/")


def is_redis_failure(exc: BaseException) -> bool:
    """A Redis error, or a plain exception raised inside redis-py's cluster client or its
    connections: an outage to wait out, not a bug of the session. In a failover the client closes
    every connection (its own reaction to CLUSTERDOWN) while other tasks are sending on them, and
    raises AttributeError and the like while its view is half updated (redis/redis-py#3815, #3835,
    #3997; measured here: `'NoneType' object has no attribute 'writelines'` for commands to the
    healthy masters). Only those files: our bad arguments fail in redis-py's encoder and stay bugs
    (handed back, they would fail again on every claim)."""
    if isinstance(exc, REDIS_ERRORS):
        return True
    return _raised_inside_the_client(exc)


def _raised_inside_the_client(exc: BaseException) -> bool:
    """The innermost frame that is not the event loop's own is the client's. A write on a connection the
    cluster client closed under it fails in the event loop's transport (uvloop: `RuntimeError:
    unable to perform operation on <TCPTransport closed=True>`), called from redis-py's
    `connection.py` through asyncio's streams."""
    if not isinstance(exc, Exception):
        return False
    tb, last = exc.__traceback__, None
    while tb is not None:
        if not tb.tb_frame.f_code.co_filename.startswith(_LOOP_FILES):
            last = tb
        tb = tb.tb_next
    return last is not None and last.tb_frame.f_code.co_filename in _CLUSTER_CLIENT_FILES

CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}


def cluster_url(redis_url: str, redis_cluster_url: str = "") -> str | None:
    """The plain `redis://` URL of a cluster node to start from, or None for a single Redis:
    REDIS_CLUSTER_URL when set (either scheme), else REDIS_URL when its scheme is `redis+cluster://`
    or `rediss+cluster://`."""
    if redis_cluster_url:
        return _plain(redis_cluster_url)
    return _plain(redis_url) if redis_url.partition("://")[0] in CLUSTER_SCHEMES else None


def _split_nodes(url: str) -> tuple[str, list[tuple[str, int]]]:
    """`redis://u:p@h1:1,h2:2/0` -> (`redis://u:p@h1:1/0`, [(h2, 2)])."""
    scheme, sep, rest = url.partition("://")
    auth, at, hosts = rest.rpartition("@")
    hosts, slash, path = hosts.partition("/")
    first, *others = hosts.split(",")
    nodes = []
    for other in others:
        host, _, port = other.strip().rpartition(":")
        nodes.append((host or other.strip(), int(port) if host else 6379))
    return f"{scheme}{sep}{auth}{at}{first}{slash}{path}", nodes


def _plain(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    return f"{CLUSTER_SCHEMES.get(scheme, scheme)}{sep}{rest}"


FAILOVER_S = 15.0  # how long a command waits for a cluster to heal (a replica promoted) before it fails


class _RedisCluster(RedisCluster):
    """redis-py's cluster client, patient across a failover.

    On a connection error it re-reads the slot map and retries at once, a few times: over in
    milliseconds, while a replica takes `cluster-node-timeout` (and an election) to replace a dead
    master. And on CLUSTERDOWN it closes every connection of the client, to every node, which
    breaks commands in flight to healthy nodes too (they then fail with ConnectionError, or with
    AttributeError from a connection closed under them). So here a command or pipeline that failed
    that way is sent again with backoff for up to FAILOVER_S: commands of sessions on the healthy
    masters go on, and those of the dead master's sessions wait for its replica instead of failing."""

    RETRYABLE = (RedisConnectionError, RedisTimeoutError, ClusterDownError, RedisClusterException)

    @classmethod
    def retryable(cls, exc: BaseException) -> bool:
        """Worth sending again once the cluster heals: a connection or cluster error, or the client's
        own state tripping over itself mid-failover (never a Redis error reply such as WRONGTYPE)."""
        return isinstance(exc, cls.RETRYABLE) or (not isinstance(exc, RedisError) and _raised_inside_the_client(exc))

    async def _determine_slot(self, command: str, *args):
        # XREAD / XREADGROUP have "movable keys": redis-py would ask the server (COMMAND GETKEYS, a
        # round trip per read) where they are. They follow STREAMS: read them here.
        if command.upper() in ("XREAD", "XREADGROUP"):
            words = [a.upper() if isinstance(a, str) else a for a in args]
            for marker in ("STREAMS", b"STREAMS"):
                if marker in words:
                    at = words.index(marker) + 1
                    streams = args[at : at + (len(args) - at) // 2]
                    slots = {self.keyslot(k) for k in streams}
                    if len(slots) == 1:
                        return slots.pop()
                    break
        return await super()._determine_slot(command, *args)

    async def execute_command(self, *args, **kwargs):
        return await patiently(lambda: super(_RedisCluster, self).execute_command(*args, **kwargs))

    def pipeline(self, transaction: bool | None = None, shard_hint: None = None) -> _PatientPipeline:
        if shard_hint:
            raise RedisClusterException("shard_hint is deprecated in cluster mode")
        return _PatientPipeline(self, transaction)


async def patiently(send: Callable[[], Awaitable[T]]) -> T:
    """`send()`, and again with backoff while it fails as a failing-over cluster makes it fail,
    for up to FAILOVER_S."""
    loop = asyncio.get_running_loop()
    deadline, delay = loop.time() + FAILOVER_S, 0.05
    while True:
        try:
            return await send()
        except Exception as exc:
            if not _RedisCluster.retryable(exc) or loop.time() + delay > deadline:
                raise
            await asyncio.sleep(delay)
            delay = min(1.0, delay * 2)


class _PatientPipeline(ClusterPipeline):
    """redis-py's cluster pipeline, sent again like a single command (see `_RedisCluster`): its own
    retry closes every connection and tries three times in 0.75 s, less than a replica takes."""

    def __init__(self, client: RedisCluster, transaction: bool | None = None) -> None:
        super().__init__(client, transaction)
        self._queued: list[tuple[tuple, dict]] = []  # what to queue again for another attempt

    async def initialize(self) -> ClusterPipeline:  # `async with` reads the slot map first
        return await patiently(super().initialize)

    def execute_command(self, *args, **kwargs) -> ClusterPipeline:
        self._queued.append((args, dict(kwargs)))
        return super().execute_command(*args, **kwargs)

    async def execute(self, raise_on_error: bool = True, allow_redirections: bool = True) -> list:
        queued, self._queued, attempts = self._queued, [], 0

        async def send() -> list:
            nonlocal attempts
            attempts += 1
            if attempts > 1:  # the failed attempt reset the pipeline
                for args, kwargs in queued:
                    super(_PatientPipeline, self).execute_command(*args, **dict(kwargs))
            return await super(_PatientPipeline, self).execute(raise_on_error, allow_redirections)

        return await patiently(send)


def connect_url(
    redis_url: str, redis_cluster_url: str = "", *, max_connections: int = 2000
) -> aioredis.Redis:
    """A client that retries with backoff, so a Redis restart or a cluster failover is survived,
    not fatal: a `redis.asyncio.Redis` for one node, redis-py's `RedisCluster` for a cluster. Both
    speak the same commands; every command the services send names keys of one slot."""
    options = dict(
        decode_responses=False,
        max_connections=max_connections,  # per node on a cluster
        health_check_interval=15,
        # Longer than any BLOCK we use (≤ 5 s), so only a read that hangs on a dead socket times out
        # (and is retried) instead of waiting forever.
        socket_timeout=15,
        socket_keepalive=True,
        retry=Retry(ExponentialWithJitterBackoff(base=0.05, cap=2.0), retries=8),
        retry_on_error=[RedisConnectionError, RedisTimeoutError],
    )
    node = cluster_url(redis_url, redis_cluster_url)
    if node is not None:
        # Several nodes may be named, `redis://h1:6379,h2:6379`: a process that starts while one is
        # down asks the next for the slot map. The rest of the URL (user, password) is the first's.
        first, others = _split_nodes(node)
        if others:
            options["startup_nodes"] = [ClusterNode(host, port) for host, port in others]
        return _RedisCluster.from_url(first, **options)  # type: ignore[return-value]
    return aioredis.Redis.from_url(redis_url, **options)


def connect(settings: Settings, *, max_connections: int = 2000) -> aioredis.Redis:
    return connect_url(settings.redis_url, settings.redis_cluster_url, max_connections=max_connections)


def is_cluster(r: object) -> bool:
    return isinstance(r, RedisCluster)


async def wait_for_redis(r: aioredis.Redis, timeout_s: float = 30.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        try:
            await r.ping()
            return
        except (RedisConnectionError, RedisTimeoutError, ClusterDownError, RedisClusterException, OSError):
            if asyncio.get_running_loop().time() > deadline:
                raise
            await asyncio.sleep(0.2)


def dump(model: BaseModel) -> bytes:
    return orjson.dumps(model.model_dump(mode="json", exclude_none=True))


class Bus:
    """Publishing and reading of one deployment's streams, with its bounds from settings."""

    def __init__(self, r: aioredis.Redis, settings: Settings) -> None:
        self.r = r
        self.settings = settings
        # many sessions' frames, one round trip
        self.audio_writer = PipelinedXadd(r, linger_s=settings.audio_batch_ms / 1000)

    # ---- events:{sid} (to the browser)

    def _event_fields(self, sid: str, event: BaseModel, pcm: bytes | None = None) -> dict[str, bytes]:
        fields: dict[str, bytes] = {"e": dump(event)}
        if pcm is not None:
            fields["pcm"] = pcm
        tp = tracing.event_published(sid, event)  # the trace context of a turn's reply, if traced
        if tp:
            fields["tp"] = tp
        return fields

    async def publish_event(self, sid: str, event: BaseModel, pcm: bytes | None = None) -> bytes:
        return await self.r.xadd(
            keys.events(sid), self._event_fields(sid, event, pcm), maxlen=self.settings.events_stream_maxlen,
            approximate=True,
        )

    # ---- turns:{sid} (to the avatar worker)

    def _turn_fields(self, sid: str, turn: BaseModel) -> dict[str, bytes]:
        fields = {"t": dump(turn)}
        tp = tracing.turn_published(sid, turn)  # a user turn starts its trace here
        if tp:
            fields["tp"] = tp
        return fields

    async def publish_turn(self, sid: str, turn: BaseModel) -> bytes:
        return await self.r.xadd(
            keys.turns(sid), self._turn_fields(sid, turn), maxlen=self.settings.turns_stream_maxlen, approximate=True
        )

    async def publish_event_and_turn(self, sid: str, event: BaseModel, turn: BaseModel) -> None:
        """Both in one round trip (one slot: both keys carry `{sid}`): an interim transcript goes to
        the page and, as speech heard, to the avatar worker several times a second per speaker."""
        async with self.r.pipeline(transaction=False) as pipe:
            pipe.xadd(keys.events(sid), self._event_fields(sid, event), maxlen=self.settings.events_stream_maxlen,
                      approximate=True)
            pipe.xadd(keys.turns(sid), self._turn_fields(sid, turn), maxlen=self.settings.turns_stream_maxlen,
                      approximate=True)
            await pipe.execute()

    async def read_turns(
        self, sid: str, after: bytes | str, block_ms: int, count: int = 32
    ) -> list[tuple[bytes, Turn]]:
        reply = await self.r.xread({keys.turns(sid): after}, count=count, block=block_ms)
        out: list[tuple[bytes, Turn]] = []
        for _stream, entries in reply or []:
            for entry_id, fields in entries:
                try:
                    turn = turn_adapter.validate_json(fields[b"t"])
                except Exception:  # a malformed entry must not stop the session
                    log.warning("skipping malformed turn %r in session %s", entry_id, sid)
                    continue
                out.append((entry_id, turn))
                if b"tp" in fields and turn.type == "user.turn":
                    tracing.turn_read(sid, turn.turn_id, fields[b"tp"])
        return out

    # ---- audio:{sid} (to the STT worker)

    async def publish_audio(self, sid: str, pcm: bytes, seq: bytes | None = None) -> bytes:
        """`seq`: `<socket id>:<n>`, n counting this socket's frames from 1, so the STT worker can
        count frames that MAXLEN trimmed before it read them (it fell that far behind)."""
        fields = {"pcm": pcm} if seq is None else {"pcm": pcm, "seq": seq}
        return await self.audio_writer.xadd(keys.audio(sid), fields, self.settings.audio_stream_maxlen)

    async def publish_audio_end(self, sid: str, reason: str) -> bytes:
        return await self.r.xadd(
            keys.audio(sid), {"end": reason.encode()}, maxlen=self.settings.audio_stream_maxlen, approximate=True
        )

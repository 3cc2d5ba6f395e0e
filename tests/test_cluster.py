"""The same tests on a real Redis Cluster: 3 masters + 3 replicas on loopback (`redis_cluster`).

The pipeline, takeover, hand-back and reaper tests below are the single-node tests themselves,
imported: in this module `redis_url` is the cluster's `redis+cluster://` URL, so the stack, the
job streams and the stores all run on redis-py's cluster client. Then what only a cluster has:
the audio feed reading per node. Admission, SIGTERM hand-back and a master killed with `kill -9`
are in `test_cluster_faults.py` (stacks of their own, not this module's shared one).
"""

from __future__ import annotations

import asyncio

import pytest

from common import keys
from common.bus import Bus, _RedisCluster, _split_nodes, cluster_url, connect_url, is_cluster, is_redis_failure
from common.models import SessionConfig
from common.sessions import SessionStore
from common.settings import Settings
from stt_service.audio_feed import AudioFeed
from tests.cluster_util import LocalCluster
from tests.test_cloud_lifecycle import (  # noqa: F401  (the reaper test and its fixtures)
    fake,
    rig,
    test_reaper_reads_every_page_and_stops_only_our_orphans,
)
from tests.test_jobs import (  # noqa: F401  (each runs here on the cluster)
    r,
    test_a_late_hand_back_does_not_take_the_session_from_its_new_owner,
    test_a_session_that_loses_redis_is_handed_back_not_dropped,
    test_claim_loops_never_exceed_capacity,
    test_dead_consumer_is_taken_over_after_the_lease,
    test_end_is_idempotent_and_wakes_the_workers,
    test_hand_back_is_claimable_at_once_and_done_removes,
    test_heartbeat_keeps_the_lease,
)
from tests.test_pipeline import (  # noqa: F401
    test_killed_stt_worker_is_replaced_mid_session,
    test_spoken_question_gets_transcript_and_spoken_reply,
    test_two_sessions_never_see_each_others_events,
    test_typed_message_gets_a_reply,
)


@pytest.fixture(scope="session")
def redis_url(redis_cluster: LocalCluster) -> str:
    """Every test of this module, the imported ones included, runs on the cluster."""
    return redis_cluster.url


def test_cluster_is_chosen_by_its_url_or_scheme() -> None:
    assert cluster_url("redis://10.0.0.1:6379/0") is None
    assert cluster_url("redis+cluster://10.0.0.1:7000") == "redis://10.0.0.1:7000"
    assert cluster_url("rediss+cluster://u:p@h:7000") == "rediss://u:p@h:7000"
    assert cluster_url("redis://ignored:6379/0", "redis://node:7000") == "redis://node:7000"
    assert cluster_url("redis://ignored:6379/0", "redis+cluster://node:7000") == "redis://node:7000"
    assert Settings(_env_file=None, redis_cluster_url="redis://n:7000").redis_cluster_url == "redis://n:7000"
    assert _split_nodes("redis://u:p@h1:7000,h2:7001,h3/0") == ("redis://u:p@h1:7000/0", [("h2", 7001), ("h3", 6379)])
    assert _split_nodes("redis://h1:7000") == ("redis://h1:7000", [])


async def test_an_error_from_inside_the_cluster_client_is_a_redis_failure_not_a_bug() -> None:
    """redis-py's cluster client has raised plain AttributeError/KeyError mid-failover; a session
    that meets one is handed back (to resume), not ended as a bug. Our own errors stay bugs."""
    from redis.asyncio.cluster import ClusterNode, NodesManager
    from redis.exceptions import MovedError

    nodes = NodesManager([ClusterNode("127.0.0.1", 1)], require_full_coverage=True, connection_kwargs={})
    with pytest.raises(KeyError) as inside:  # a MOVED while the slots cache is being rebuilt
        await nodes.move_slot(MovedError("1234 127.0.0.1:2"))
    assert is_redis_failure(inside.value)
    with pytest.raises(KeyError) as ours:
        {}["sid"]
    assert not is_redis_failure(ours.value) and is_redis_failure(ConnectionResetError())


def test_a_write_on_a_connection_closed_under_it_is_a_redis_failure(redis_cluster: LocalCluster) -> None:
    """Mid-failover the cluster client closes connections other tasks are sending on; under uvloop
    (what the services run) the write fails in the transport with a RuntimeError raised through
    asyncio's streams. That is the outage, not a bug: the gateway closed healthy pages' sockets
    as "server error" for it."""
    import uvloop
    from redis.asyncio.connection import Connection

    async def write_on_a_closed_transport() -> BaseException:
        conn = Connection(host="127.0.0.1", port=redis_cluster.ports[0])
        await conn.connect()
        conn._writer.transport.close()
        await asyncio.sleep(0.05)  # the loop finishes closing the handle
        try:
            await conn._send_packed_command([b"PING\r\n"])
        except Exception as exc:
            return exc
        finally:
            await conn.disconnect()
        raise AssertionError("the write did not fail")

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        exc = runner.run(write_on_a_closed_transport())
    assert isinstance(exc, RuntimeError) and "closed" in str(exc)
    assert is_redis_failure(exc) and _RedisCluster.retryable(exc)


async def test_a_process_starting_while_its_first_node_is_down_asks_the_next(
    private_redis_cluster: LocalCluster,
) -> None:
    cluster = private_redis_cluster
    dead, alive = cluster.ports[0], cluster.ports[1]
    await asyncio.to_thread(cluster.kill9, dead)
    client = connect_url(f"redis+cluster://127.0.0.1:{dead},127.0.0.1:{alive}")
    try:
        await asyncio.to_thread(cluster.wait_promoted, dead)
        async with asyncio.timeout(20):
            await client.set("k:{x}", "1")
            assert await client.get("k:{x}") == b"1"
    finally:
        await client.aclose()


async def test_sessions_spread_over_every_master_and_the_feed_reads_per_node(redis_cluster: LocalCluster) -> None:
    client = connect_url(redis_cluster.url)
    try:
        assert is_cluster(client)
        async with asyncio.timeout(10):
            await client.flushall()
        store = SessionStore(client, Bus(client, Settings(_env_file=None, redis_url=redis_cluster.url)))
        async with asyncio.timeout(10):
            sids = [(await store.create(SessionConfig()))[0] for _ in range(24)]
        masters = {redis_cluster.master_of(keys.session(sid)) for sid in sids}
        assert len(masters) == 3, "24 random session ids land on all three masters"
        feed = AudioFeed(client)
        queues = {sid: feed.subscribe(sid, "0") for sid in sids}
        async with asyncio.timeout(10):
            for n in range(3):  # every page's next frame at about the same time
                await asyncio.gather(*(
                    store.bus.publish_audio(sid, bytes(640), f"c:{n + 1}".encode()) for sid in sids
                ))
        for queue in queues.values():
            got = 0
            while got < 3:
                batch = await asyncio.wait_for(queue.get(), 5)
                assert not isinstance(batch, BaseException), batch
                got += len(batch)
        assert len(feed.nodes) == 3
        # 24 sessions x 3 frames, read in a handful of round trips per node, not one per frame
        assert feed.reads < 24 * 3
        async with asyncio.timeout(10):
            await feed.aclose()
    finally:
        await client.aclose()


async def test_sessions_that_leave_while_the_feed_waits_to_read_do_not_fail_the_others(
    redis_cluster: LocalCluster,
) -> None:
    """The feed waits `min_interval_s` between reads; sessions handed back during that wait were
    once still named in the next read, and the KeyError ended every other session of the node."""
    client = connect_url(redis_cluster.url)
    try:
        store = SessionStore(client, Bus(client, Settings(_env_file=None, redis_url=redis_cluster.url)))
        async with asyncio.timeout(10):
            sids = [(await store.create(SessionConfig()))[0] for _ in range(12)]
        feed = AudioFeed(client, min_interval_s=0.3)
        queues = {sid: feed.subscribe(sid, "0") for sid in sids}

        async def frame(n: int, to: list[str]) -> None:
            async with asyncio.timeout(10):
                await asyncio.gather(*(store.bus.publish_audio(sid, bytes(640), f"c:{n}".encode()) for sid in to))

        await frame(1, sids)
        for sid in sids:
            while True:  # (idle ticks are empty batches: skip them)
                batch = await asyncio.wait_for(queues[sid].get(), 5)
                assert not isinstance(batch, BaseException), batch
                if batch:
                    break
        leaving, staying = sids[::2], sids[1::2]
        for sid in leaving:  # the readers are in their wait now
            feed.unsubscribe(sid)
        await frame(2, staying)
        for sid in staying:
            while True:
                batch = await asyncio.wait_for(queues[sid].get(), 5)
                assert not isinstance(batch, BaseException), f"a session that stayed failed: {batch!r}"
                if batch:
                    break
        async with asyncio.timeout(10):
            await feed.aclose()
    finally:
        await client.aclose()

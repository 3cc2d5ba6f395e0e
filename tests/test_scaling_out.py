"""What running many gateways and workers needs: readiness that means "this process can serve",
a session-creation rate limit shared through Redis, and probes and metrics off the public port."""

from __future__ import annotations

import time

import httpx
import pytest

from avatar_stack.up import free_port
from common.metrics import Health, serve_metrics
from tests.test_gateway import start_gateway


def test_n_gateways_share_one_session_creation_limit_per_client(clean_redis: str) -> None:
    limits = {"SESSION_CREATE_BURST": "4", "SESSION_CREATE_RATE_PER_MIN": "1"}
    one, two = start_gateway(clean_redis, **limits), start_gateway(clean_redis, **limits)
    try:
        who = {"X-Forwarded-For": "203.0.113.9"}
        codes = []
        for i in range(8):  # alternately through either gateway, as a load balancer would
            url = (one if i % 2 == 0 else two).base_url
            codes.append(httpx.post(f"{url}/v1/sessions", json={}, headers=who).status_code)
        assert codes == [201] * 4 + [429] * 4  # the burst once, not once per gateway
        refused = httpx.post(f"{two.base_url}/v1/sessions", json={}, headers=who)
        assert int(refused.headers["Retry-After"]) >= 1
        other = {"X-Forwarded-For": "198.51.100.3"}
        assert httpx.post(f"{one.base_url}/v1/sessions", json={}, headers=other).status_code == 201
    finally:
        one.stop_all()
        two.stop_all()


def test_per_process_buckets_remain_available(clean_redis: str) -> None:
    limits = {"SESSION_CREATE_BURST": "2", "SESSION_CREATE_RATE_PER_MIN": "1", "SESSION_CREATE_RATE_SCOPE": "process"}
    one, two = start_gateway(clean_redis, **limits), start_gateway(clean_redis, **limits)
    try:
        who = {"X-Forwarded-For": "203.0.113.10"}
        codes = [httpx.post(f"{g.base_url}/v1/sessions", json={}, headers=who).status_code
                 for g in (one, one, one, two, two, two)]
        assert codes == [201, 201, 429, 201, 201, 429]  # each gateway its own bucket (N x)
    finally:
        one.stop_all()
        two.stop_all()


def test_ready_while_redis_answers_full_pools_are_a_503_per_request(clean_redis: str) -> None:
    metrics_port = free_port()
    gw = start_gateway(clean_redis, ADMISSION_CONTROL="true", GATEWAY_METRICS_PORT=str(metrics_port))
    try:
        ready = httpx.get(f"{gw.base_url}/readyz")
        assert ready.status_code == 200 and ready.json()["ready"] is True
        assert ready.json()["pools"]["stt"]["workers"] == 0  # no worker runs: reported, not "unready"
        refused = httpx.post(f"{gw.base_url}/v1/sessions", json={})
        assert refused.status_code == 503 and refused.headers["Retry-After"] == "5"
        assert "no worker is running" in refused.json()["detail"]
        # /metrics only on its own port, never on the public one
        assert httpx.get(f"{gw.base_url}/metrics").status_code == 404
        text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics").text
        assert "gateway_sessions_refused_total" in text
    finally:
        gw.stop_all()


def test_worker_probes_follow_the_heartbeat() -> None:
    health = Health(live_s=0.3, ready_s=0.3)
    port = serve_metrics("127.0.0.1", free_port(), health)
    base = f"http://127.0.0.1:{port}"

    def status(path: str) -> int:
        return httpx.get(base + path).status_code

    assert (status("/healthz"), status("/readyz")) == (200, 503)  # started; not yet claiming
    health.beat(ok=True)
    assert (status("/healthz"), status("/readyz")) == (200, 200)
    health.beat(ok=False)  # Redis does not answer: alive, but not ready
    time.sleep(0.35)
    assert status("/readyz") == 503
    health.beat(ok=True)
    health.stopping = True  # SIGTERM: handing sessions back
    assert status("/readyz") == 503
    time.sleep(0.35)  # the heartbeat loop stopped running: not alive
    assert status("/healthz") == 503
    assert "worker_sessions_active" in httpx.get(base + "/metrics").text or status("/metrics") == 200


@pytest.mark.parametrize("path", ["/metrics", "/anything"])
def test_the_worker_metrics_server_still_serves_metrics_on_any_path(path: str) -> None:
    port = serve_metrics("127.0.0.1", free_port(), Health())
    assert httpx.get(f"http://127.0.0.1:{port}{path}").status_code == 200

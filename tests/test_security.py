"""Origin allowlist (REST + WebSocket), CORS, and the session-creation rate limit, on a real gateway.

The gateway trusts proxy headers from 127.0.0.1 (uvicorn's default, `FORWARDED_ALLOW_IPS`), so
`X-Forwarded-For` stands for different clients here, as a reverse proxy would set it.
"""

from __future__ import annotations

import asyncio
import socket
import time

import httpx
import pytest
import websockets
from websockets.exceptions import InvalidStatus

from common import keys
from common.settings import Settings
from gateway.origins import OriginPolicy, normalize, trusted_hosts
from gateway.ratelimit import TokenBuckets
from tests.browser_util import launch, silence_wav, static_server
from tests.client import Browser, Session, create_session
from tests.conftest import Stack, start_stack
from tests.fakes.heygen import FakeHeyGen
from tests.test_gateway import start_gateway

GUARD_S = 60.0  # hang guard, never a latency requirement
EVIL = "https://evil.example"
APP = "https://app.example.com"


@pytest.fixture(scope="module")
def gateway(redis_url: str):
    """Default origin policy: same origin only."""
    stack = start_gateway(redis_url)
    yield stack
    stack.stop_all()


async def wait_connected(stack: Stack, sid: str, timeout_s: float = 5.0) -> None:
    r = stack.redis()
    deadline = time.monotonic() + timeout_s
    while not r.zcount(keys.conns(sid), time.time(), "+inf"):
        assert time.monotonic() < deadline, "the socket never counted as connected"
        await asyncio.sleep(0.02)


def preflight(origin: str, method: str = "POST") -> dict[str, str]:
    return {
        "Origin": origin,
        "Access-Control-Request-Method": method,
        "Access-Control-Request-Headers": "authorization, content-type, x-api-key",
    }


# ------------------------------------------------------------------ the policy itself


def test_origins_are_compared_as_browsers_serialize_them():
    assert normalize("HTTPS://App.Example.com:443/") == APP
    assert normalize("http://127.0.0.1:8000") == "http://127.0.0.1:8000"
    assert normalize("http://[::1]:80") == "http://[::1]"
    for bad in ("null", "app.example.com", "ftp://x", "https://a.example/path", "https://u:p@a.example", ""):
        assert normalize(bad) is None, bad
    with pytest.raises(ValueError, match="not an origin"):
        OriginPolicy.build(["app.example.com"])

    policy = OriginPolicy.build([APP], public_url="https://avatars.example.com/base")
    assert policy.allows(None, "http", "127.0.0.1:8000")  # no Origin: not a browser page
    assert policy.allows(APP, "https", "gw.internal")
    assert policy.allows("https://avatars.example.com", "http", "gw.internal:8000")  # GATEWAY_PUBLIC_URL
    assert policy.allows("http://127.0.0.1:8000", "ws", "127.0.0.1:8000")  # our own origin
    assert not policy.allows("https://127.0.0.1:8000", "ws", "127.0.0.1:8000")  # other scheme, other origin
    assert not policy.allows(EVIL, "http", "127.0.0.1:8000")
    assert not policy.allows("null", "http", "127.0.0.1:8000")
    assert policy.cors_origins() == [APP]
    # `*` only when set explicitly; the default is no other origin at all.
    assert OriginPolicy.build(["*"]).allows(EVIL, "http", "x")
    assert OriginPolicy.from_settings(Settings(_env_file=None, allowed_origins="")).cors_origins() == []


def test_a_loopback_gateway_answers_only_loopback_host_names():
    def hosts(**kw: str) -> list[str]:
        return trusted_hosts(Settings(_env_file=None, **kw))

    assert hosts() == sorted({"localhost", "*.localhost", "127.0.0.1", "[::1]"})  # the default bind
    assert "gw.example.com" in hosts(gateway_public_url="https://gw.example.com/app")
    assert hosts(gateway_host="0.0.0.0") == ["*"]  # compose, behind a proxy: any name ...
    assert hosts(gateway_host="0.0.0.0", allowed_hosts="Avatars.Example.com, *.example.org") == [
        "*.example.org", "avatars.example.com",  # ... unless narrowed
    ]


def test_token_buckets_refill_and_stay_bounded():
    now = [0.0]
    buckets = TokenBuckets(rate_per_min=60, burst=2, max_clients=100, clock=lambda: now[0])
    assert [buckets.take("a") for _ in range(2)] == [0.0, 0.0]
    assert buckets.take("a") == pytest.approx(1.0)
    assert buckets.take("b") == 0.0  # another client has its own bucket
    now[0] += 1.0
    assert buckets.take("a") == 0.0
    for i in range(10_000):  # a flood of addresses
        buckets.take(f"10.0.{i // 256}.{i % 256}")
    assert len(buckets) == 100
    assert TokenBuckets(rate_per_min=0, burst=10).take("a") == 0.0  # 0 = no limit


# ------------------------------------------------------------------ the browser socket


async def test_socket_from_another_origin_gets_4403_and_the_session_is_untouched(gateway: Stack):
    session = await create_session(gateway.base_url)
    r = gateway.redis()
    before = r.hgetall(keys.session(session.session_id))

    intruder = Browser(session)
    await intruder.connect(origin=EVIL)
    assert await intruder.wait_closed() == 4403
    assert r.hgetall(keys.session(session.session_id)) == before  # not even a connection counted
    # Refused before the session is looked at: an unknown session gets 4403 too, not 4404.
    ghost = Browser(Session("0" * 32, session.token, session.ws_url.replace(session.session_id, "0" * 32)))
    await ghost.connect(origin=EVIL)
    assert await ghost.wait_closed() == 4403

    # The page of the gateway itself, and a client that sends no Origin, still get in.
    page = Browser(session)
    await page.connect(origin=gateway.base_url)
    await wait_connected(gateway, session.session_id)
    await page.send_json({"type": "ping"})
    await page.close(end=False)
    sdk = Browser(session)
    await sdk.connect()
    await wait_connected(gateway, session.session_id)
    assert sdk.close_code is None and page.close_code != 4403
    await sdk.close()

    [name] = [n for n in gateway.procs if n.startswith("gateway")]
    log = gateway.logs[name].read_text()
    assert "not allowed" in log and EVIL in log
    assert session.token not in log


async def test_dns_rebinding_a_page_to_a_local_gateway_gets_400(gateway: Stack):
    """evil.example re-pointed at 127.0.0.1: its page's Origin matches its Host, so only the Host
    check can tell; the loopback gateway answers loopback names only."""
    port = int(gateway.base_url.rsplit(":", 1)[1])
    rebound = f"http://evil.example:{port}"
    r = gateway.redis()
    live_before = r.zcard(keys.SESSIONS_INDEX)
    async with httpx.AsyncClient(base_url=gateway.base_url) as http:
        refused = await http.post("/v1/sessions", json={}, headers={"Host": f"evil.example:{port}", "Origin": rebound})
        assert refused.status_code == 400 and "host" in refused.text.lower()
        assert r.zcard(keys.SESSIONS_INDEX) == live_before  # nothing created
        for name in (f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}"):
            assert (await http.get("/healthz", headers={"Host": name})).status_code == 200, name

    session = await create_session(gateway.base_url)
    path = session.ws_url.split(f":{port}", 1)[1]
    with socket.create_connection(("127.0.0.1", port)) as sock:
        with pytest.raises(InvalidStatus) as refused_ws:
            await websockets.connect(
                f"ws://evil.example:{port}{path}?token={session.token}", sock=sock, origin=rebound
            )
    assert refused_ws.value.response.status_code == 400
    assert not r.zcard(keys.conns(session.session_id))  # never reached the session


@pytest.mark.browser
def test_a_page_of_another_origin_shows_a_clear_banner(gateway: Stack, tmp_path):
    """The page served from elsewhere (another port is another origin) gets 4403 and says why."""
    created = httpx.post(f"{gateway.base_url}/v1/sessions", json={}, timeout=10)
    assert created.status_code == 201
    with static_server() as base, launch(silence_wav(tmp_path / "silence.wav")) as page:
        page.route(
            "**/v1/sessions",
            lambda route: route.fulfill(status=201, content_type="application/json", body=created.text),
        )
        page.goto(base + "/")
        page.click("#start-btn")
        banner = page.locator('#banners [data-code="origin_not_allowed"]')
        banner.wait_for(state="visible", timeout=10_000)
        assert "not allowed" in banner.inner_text()
        page.wait_for_function("document.body.dataset.state === 'error'", timeout=10_000)


# ------------------------------------------------------------------ REST: CORS and cross-site writes


async def test_cross_site_writes_are_refused_and_same_origin_works(gateway: Stack):
    r = gateway.redis()
    async with httpx.AsyncClient(base_url=gateway.base_url) as http:
        jobs = r.xlen(keys.JOBS_STT)
        for origin in (EVIL, "null", gateway.base_url.replace("http://", "https://")):
            refused = await http.post("/v1/sessions", json={}, headers={"Origin": origin})
            assert refused.status_code == 403, origin
            assert "origin not allowed" in refused.json()["detail"]
            assert "access-control-allow-origin" not in refused.headers
        assert r.xlen(keys.JOBS_STT) == jobs  # nothing was created

        own = await http.post("/v1/sessions", json={}, headers={"Origin": gateway.base_url})
        assert own.status_code == 201
        assert (await http.post("/v1/sessions", json={})).status_code == 201  # no Origin: curl, SDKs
        sid, token = own.json()["session_id"], own.json()["token"]
        auth = {"Authorization": f"Bearer {token}"}

        # A cross-site DELETE is refused as well; reads are left to CORS (no headers, no read).
        assert (await http.delete(f"/v1/sessions/{sid}", headers={**auth, "Origin": EVIL})).status_code == 403
        read = await http.get(f"/v1/sessions/{sid}", headers={**auth, "Origin": EVIL})
        assert read.json()["state"] == "created" and "access-control-allow-origin" not in read.headers
        assert (await http.delete(f"/v1/sessions/{sid}", headers=auth)).status_code == 204

        # No other origin is allowed by default: its preflight is refused.
        pre = await http.options("/v1/sessions", headers=preflight(EVIL))
        assert pre.status_code == 400 and "access-control-allow-origin" not in pre.headers


async def test_listed_origins_get_cors_and_the_socket(redis_url: str):
    stack = start_gateway(redis_url, ALLOWED_ORIGINS=f" {APP}/ , http://localhost:5173")
    try:
        async with httpx.AsyncClient(base_url=stack.base_url) as http:
            pre = await http.options("/v1/sessions", headers=preflight(APP))
            assert pre.status_code == 200
            assert pre.headers["access-control-allow-origin"] == APP
            allowed = pre.headers["access-control-allow-headers"].lower()
            assert all(h in allowed for h in ("authorization", "content-type", "x-api-key"))
            assert "POST" in pre.headers["access-control-allow-methods"]
            pre = await http.options("/v1/sessions", headers=preflight(EVIL))
            assert pre.status_code == 400 and "access-control-allow-origin" not in pre.headers

            created = await http.post("/v1/sessions", json={}, headers={"Origin": APP})
            assert created.status_code == 201 and created.headers["access-control-allow-origin"] == APP
            assert (await http.post("/v1/sessions", json={}, headers={"Origin": EVIL})).status_code == 403
            data = created.json()

        session = Session(data["session_id"], data["token"], data["ws_url"])
        listed = Browser(session)
        await listed.connect(origin=APP)
        await wait_connected(stack, session.session_id)
        other = Browser(session)
        await other.connect(origin=EVIL)
        assert await other.wait_closed() == 4403
        assert listed.close_code is None
        await listed.close()
    finally:
        stack.stop_all()


async def test_star_allows_any_origin_only_when_configured(redis_url: str):
    stack = start_gateway(redis_url, ALLOWED_ORIGINS="*")
    try:
        async with httpx.AsyncClient(base_url=stack.base_url) as http:
            pre = await http.options("/v1/sessions", headers=preflight(EVIL))
            assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == "*"
            assert (await http.post("/v1/sessions", json={}, headers={"Origin": EVIL})).status_code == 201
        browser = Browser(await create_session(stack.base_url))
        await browser.connect(origin=EVIL)
        await wait_connected(stack, browser.session.session_id)
        await browser.close()
    finally:
        stack.stop_all()


# ------------------------------------------------------------------ session creation rate limit


def client(ip: str) -> dict[str, str]:
    """What a trusted reverse proxy in front of the gateway says about the client."""
    return {"X-Forwarded-For": ip}


async def test_session_creation_is_rate_limited_per_client(redis_url: str):
    defaults = Settings.model_fields
    assert defaults["session_create_burst"].default == 10
    assert defaults["session_create_rate_per_min"].default == 30
    stack = start_gateway(redis_url, SESSION_CREATE_BURST="10", SESSION_CREATE_RATE_PER_MIN="30")  # the defaults
    try:
        async with httpx.AsyncClient(base_url=stack.base_url) as http:
            flooder, bystander = client("203.0.113.7"), client("198.51.100.20")
            codes = [(await http.post("/v1/sessions", json={}, headers=flooder)).status_code for _ in range(10)]
            assert codes == [201] * 10  # the burst
            limited = await http.post("/v1/sessions", json={}, headers=flooder)
            assert limited.status_code == 429
            assert 1 <= int(limited.headers["Retry-After"]) <= 2  # one session every 2 s at 30/min
            assert "too many sessions" in limited.json()["detail"]
            # Another client is not affected.
            assert (await http.post("/v1/sessions", json={}, headers=bystander)).status_code == 201

            # The bucket refills: the flooder may create a session again a little later.
            deadline = time.monotonic() + 15
            while (await http.post("/v1/sessions", json={}, headers=flooder)).status_code == 429:
                assert time.monotonic() < deadline, "the limit never let the client in again"
                await asyncio.sleep(0.25)
            metrics = (await http.get("/metrics")).text.splitlines()
            [refused] = [m for m in metrics if m.startswith("avatar_stack_gateway_sessions_rate_limited_total ")]
            assert float(refused.split()[1]) >= 1
    finally:
        stack.stop_all()


async def test_api_key_holders_are_not_limited_but_guessers_are(redis_url: str):
    stack = start_gateway(
        redis_url, GATEWAY_API_KEY="s3cret-key", SESSION_CREATE_BURST="3", SESSION_CREATE_RATE_PER_MIN="1"
    )
    try:
        async with httpx.AsyncClient(base_url=stack.base_url) as http:
            backend = {"Authorization": "Bearer s3cret-key", **client("192.0.2.1")}
            codes = [(await http.post("/v1/sessions", json={}, headers=backend)).status_code for _ in range(6)]
            assert codes == [201] * 6
            guesser = {"Authorization": "Bearer guess", **client("192.0.2.1")}
            codes = [(await http.post("/v1/sessions", json={}, headers=guesser)).status_code for _ in range(4)]
            assert codes == [401, 401, 401, 429]
    finally:
        stack.stop_all()


# ------------------------------------------------------------------ idle sessions


async def test_a_forgotten_session_ends_after_the_idle_timeout_and_stops_its_paid_avatar(redis_url: str):
    """A tab left open with nobody talking must not hold a paid vendor session forever; a user who
    keeps talking is not cut off."""
    key = "hg-idle-key"
    with FakeHeyGen(api_key=key, speech_ms_per_char=1.0) as fake:
        stack = await asyncio.to_thread(
            start_stack, redis_url,
            **fake.stack_env(HEYGEN_TASK_TYPE="repeat", HEYGEN_KEEPALIVE_S="0.5", SESSION_IDLE_TIMEOUT_S="4"),
        )
        try:
            forgotten = Browser(await create_session(stack.base_url))
            talker = Browser(await create_session(stack.base_url))
            for browser in (forgotten, talker):
                await browser.connect()
                await browser.wait_type("session.ready", GUARD_S)
            assert len(fake.open_sessions()) == 2

            async def keep_talking() -> None:
                while True:
                    await talker.send_json({"type": "text", "text": "Are you still there?"})
                    await asyncio.sleep(1.0)

            chatting = asyncio.create_task(keep_talking())
            try:
                ended = await forgotten.wait_type("session.ended", GUARD_S)
                assert ended["reason"] == "idle_timeout"
                deadline = time.monotonic() + GUARD_S
                while len(fake.open_sessions()) > 1:  # the forgotten one's vendor session is stopped
                    assert time.monotonic() < deadline, "the idle session's HeyGen session was never stopped"
                    await asyncio.sleep(0.05)
                await asyncio.sleep(2.0)
                assert not talker.of_type("session.ended")  # the one who talks goes on
                assert len(fake.open_sessions()) == 1
            finally:
                chatting.cancel()
            await forgotten.close()
            await talker.close()
        finally:
            await asyncio.to_thread(stack.stop_all)

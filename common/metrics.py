"""Prometheus metrics of the worker processes, and the small HTTP server that exposes them.

The gateway serves `/metrics` on its own port; a worker has no HTTP server, so it starts
prometheus-client's on `STT_METRICS_PORT` / `AVATAR_METRICS_PORT`. When that port is taken (two
workers on one host, as in tests) it takes a free one instead and says which in its advert in
`workers:{kind}`, so nothing has to guess.

Hop latencies here use Redis stream ids, which are the Redis server's clock in milliseconds at
XADD: "entry added → handled here" needs no clock of the producer, only this host's agreement with
the Redis host (NTP), and is good to about a millisecond.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import Counter, Gauge, Histogram, make_wsgi_app

from common.exposition import EXPOSED

log = logging.getLogger(__name__)

# Buckets for the pipeline's own hops: most are a few ms, the budget is 50 ms.
HOP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
VENDOR_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

SESSIONS_ACTIVE = Gauge("worker_sessions_active", "Sessions this worker serves now", ["kind"])
SESSIONS_CLAIMED = Counter("worker_sessions_claimed_total", "Sessions claimed", ["kind", "how"])  # new | takeover
SESSIONS_HANDED_BACK = Counter("worker_sessions_handed_back_total", "Live sessions given back", ["kind"])
SESSIONS_LOST = Counter("worker_sessions_lost_total", "Sessions another worker took over from us", ["kind"])
SESSIONS_FAILED = Counter("worker_sessions_failed_total", "Sessions ended by an unexpected error", ["kind"])

VENDOR_CALL_SECONDS = Histogram(
    "vendor_call_seconds", "Vendor REST call latency", ["vendor", "call"], buckets=VENDOR_BUCKETS
)
VENDOR_CALL_ERRORS = Counter("vendor_call_errors_total", "Vendor calls that failed", ["vendor", "call", "kind"])
VENDOR_RECONNECTS = Counter("vendor_reconnects_total", "Vendor sockets reopened mid-session", ["vendor"])


def entry_age_s(entry_id: bytes | str, now: float | None = None) -> float:
    """Seconds since Redis added the stream entry `entry_id` (its id is the ms time of XADD)."""
    raw = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    return max(0.0, (now if now is not None else time.time()) - int(raw.split("-", 1)[0]) / 1000)


@dataclass
class Health:
    """What a worker's probes answer (Kubernetes liveness / readiness), fed by its heartbeat loop.

    Live: the heartbeat loop ran within `live_s` (the event loop is not stuck). Ready: the last
    heartbeat reached Redis within `ready_s` and the worker is not shutting down (it claims)."""

    live_s: float = 30.0
    ready_s: float = 5.0
    beat_at: float = 0.0  # last heartbeat attempt (monotonic)
    ok_at: float = 0.0  # last heartbeat that reached Redis
    stopping: bool = False

    def __post_init__(self) -> None:
        self.beat_at = time.monotonic()  # starting counts as alive

    def beat(self, ok: bool) -> None:
        self.beat_at = time.monotonic()
        if ok:
            self.ok_at = self.beat_at

    def live(self) -> bool:
        return time.monotonic() - self.beat_at <= self.live_s

    def ready(self) -> bool:
        return not self.stopping and self.ok_at > 0 and time.monotonic() - self.ok_at <= self.ready_s


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        return None


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


def _app(health: Health | None):
    metrics = make_wsgi_app(EXPOSED)  # names: avatar_stack_*

    def app(environ, start_response):
        path = environ.get("PATH_INFO", "/")
        if path in ("/healthz", "/readyz") and health is not None:
            ok = health.live() if path == "/healthz" else health.ready()
            start_response("200 OK" if ok else "503 Service Unavailable", [("Content-Type", "text/plain")])
            return [b"ok\n" if ok else b"not ready\n"]
        return metrics(environ, start_response)

    return app


def serve_metrics(host: str, port: int, health: Health | None = None) -> int:
    """Expose this process's metrics over HTTP (`/metrics`, and with `health` the probes `/healthz`
    and `/readyz`); returns the port it listens on (0: not served)."""
    for candidate in (port, 0) if port else ():
        try:
            server = make_server(host, candidate, _app(health), _Server, handler_class=_Quiet)
        except OSError as exc:
            log.warning("metrics port %d unavailable (%s); using a free one", candidate, exc)
            continue
        threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
        return int(server.server_port)
    return 0

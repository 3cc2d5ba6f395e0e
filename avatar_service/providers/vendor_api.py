"""What the cloud-avatar REST clients (HeyGen, LiveAvatar) share: one pooled HTTP client, the
vendors' `{code, message, data}` envelope, and retries of idempotent calls on transient failures.

Retrying is opt-in per call: a repeated "new session" could open a second paid session, a
repeated "speak" would say the text twice.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, ClassVar

import httpx

from common.metrics import VENDOR_CALL_ERRORS, VENDOR_CALL_SECONDS
from common.retry import Backoff, parse_retry_after, retry

log = logging.getLogger(__name__)

SUCCESS_CODES = {100, 1000}  # HeyGen answers 100, LiveAvatar 1000
CALL_BACKOFF = Backoff(base_s=0.25, max_s=2.0)


class VendorApiError(Exception):
    """A failed call: HTTP `status` (0 = no answer), the vendor's `code` and `message`."""

    def __init__(self, path: str, status: int, code: int | None, message: str, *,
                 retry_after_s: float | None = None) -> None:
        super().__init__(f"{path}: HTTP {status}, code {code}: {message}")
        self.path = path
        self.status = status
        self.code = code
        self.message = message
        self.retry_after_s = retry_after_s

    @property
    def transient(self) -> bool:
        return self.status == 0 or self.status == 429 or self.status >= 500


@dataclass(frozen=True)
class VendorSession:
    """A vendor session as its list endpoint reports it (for the orphan reaper)."""

    session_id: str
    status: str
    created_at: float | None  # unix seconds
    source: str = ""  # LiveAvatar: API | DEMO | APP | EMBED (who started it on the account)
    mode: str = ""  # LiveAvatar: FULL | LITE


class VendorApi:
    """Base of a vendor REST client; subclasses name their error type and API-key header."""

    vendor: ClassVar[str] = "vendor"
    error: ClassVar[type[VendorApiError]] = VendorApiError
    key_header: ClassVar[str] = "X-Api-Key"

    def __init__(self, base_url: str, api_key: str, *, timeout_s: float = 10.0,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        self._api_key = api_key
        self._http = httpx.AsyncClient(
            base_url=base_url.rstrip("/"),
            timeout=httpx.Timeout(timeout_s, connect=min(5.0, timeout_s)),
            limits=httpx.Limits(max_connections=50, max_keepalive_connections=10),
            headers={"Accept": "application/json"},
            transport=transport,
        )

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _request(self, method: str, path: str, body: dict[str, Any] | None, bearer: str | None,
                       retries: int, timeout_s: float | None = None) -> dict[str, Any]:
        """The whole response envelope; retried `retries` times on transient failures only."""
        headers = {"Authorization": f"Bearer {bearer}"} if bearer else {self.key_header: self._api_key}
        timeout = httpx.Timeout(timeout_s) if timeout_s else httpx.USE_CLIENT_DEFAULT
        return await retry(
            lambda: self._once(method, path, body, headers, timeout), retries=retries,
            retryable=lambda exc: isinstance(exc, VendorApiError) and exc.transient,
            retry_after=lambda exc: getattr(exc, "retry_after_s", None), backoff=CALL_BACKOFF,
            on_retry=lambda exc, wait: log.info("%s %s failed (%s); retrying in %.2f s", self.vendor, path, exc, wait),
        )

    async def _once(self, method: str, path: str, body: dict[str, Any] | None, headers: dict[str, str],
                    limits: Any) -> dict[str, Any]:
        call = path.rsplit("/", 1)[-1]
        started = time.perf_counter()
        try:
            resp = await self._http.request(method, path, json=body, headers=headers, timeout=limits)
        except httpx.HTTPError as exc:  # no answer; the message never includes headers
            VENDOR_CALL_ERRORS.labels(self.vendor.lower(), call, "no_answer").inc()
            raise self.error(path, 0, None, type(exc).__name__) from None
        finally:
            VENDOR_CALL_SECONDS.labels(self.vendor.lower(), call).observe(time.perf_counter() - started)
        try:
            payload = resp.json()
        except ValueError:
            payload = {}
        if not isinstance(payload, dict):
            payload = {"data": payload}
        code = payload.get("code")
        if resp.is_success and (code is None or code in SUCCESS_CODES) and not payload.get("error"):
            return payload
        VENDOR_CALL_ERRORS.labels(self.vendor.lower(), call, str(resp.status_code)).inc()
        message = payload.get("message") or payload.get("error") or payload.get("detail") or resp.reason_phrase
        raise self.error(path, resp.status_code, code if isinstance(code, int) else None, str(message or "error")[:200],
                         retry_after_s=parse_retry_after(resp.headers.get("retry-after")))

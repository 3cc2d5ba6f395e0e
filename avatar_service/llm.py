"""A minimal OpenAI-compatible chat-completions client with streaming (SSE).

Works with any server that speaks `POST {base_url}/chat/completions` with `"stream": true`:
OpenAI, llama.cpp's `llama-server`, Ollama's `/v1`, vLLM, LM Studio, OpenRouter, ...
The API key is sent as `Authorization: Bearer …` and never appears in an error or a log line.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson

log = logging.getLogger(__name__)


class LlmError(Exception):
    """A failed completion: HTTP `status` (0 = no answer) and a short, secret-free reason."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"LLM: HTTP {status}: {message}")
        self.status = status
        self.message = message


class ChatClient:
    def __init__(self, base_url: str, api_key: str = "", model: str = "", *, timeout_s: float = 30.0,
                 max_tokens: int = 0, temperature: float | None = None,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        headers = {"Accept": "text/event-stream"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        self.model = model
        self.max_tokens = max_tokens
        self.temperature = temperature
        self._http = httpx.AsyncClient(
            base_url=base_url.rstrip("/"),
            headers=headers,
            timeout=httpx.Timeout(timeout_s, connect=min(5.0, timeout_s)),
            limits=httpx.Limits(max_connections=100, max_keepalive_connections=20),
            transport=transport,
        )

    async def aclose(self) -> None:
        await self._http.aclose()

    async def stream(self, messages: list[dict[str, str]]) -> AsyncIterator[str]:
        """Yield the reply's text deltas as they arrive; raises `LlmError`."""
        body: dict[str, Any] = {"model": self.model, "messages": messages, "stream": True}
        if self.max_tokens > 0:
            body["max_tokens"] = self.max_tokens
        if self.temperature is not None:
            body["temperature"] = self.temperature
        try:
            async with self._http.stream("POST", "/chat/completions", json=body) as resp:
                if not resp.is_success:
                    raw = await resp.aread()
                    raise LlmError(resp.status_code, _error_text(raw) or resp.reason_phrase)
                async for line in resp.aiter_lines():
                    line = line.strip()
                    if not line.startswith("data:"):
                        continue  # comments (": keep-alive"), `event:` lines, blank separators
                    data = line[5:].strip()
                    if data == "[DONE]":
                        return
                    try:
                        chunk = orjson.loads(data)
                    except orjson.JSONDecodeError:
                        continue
                    if isinstance(chunk, dict) and chunk.get("error"):
                        raise LlmError(200, _error_text(data.encode()) or "error in stream")
                    delta = _delta(chunk)
                    if delta:
                        yield delta
        except httpx.HTTPError as exc:  # no answer / cut off; the message never includes headers
            raise LlmError(0, type(exc).__name__) from None


def _delta(chunk: Any) -> str:
    try:
        choice = chunk["choices"][0]
    except (KeyError, IndexError, TypeError):
        return ""
    delta = choice.get("delta") or choice.get("message") or {}
    content = delta.get("content") if isinstance(delta, dict) else None
    return content if isinstance(content, str) else ""


def _error_text(raw: bytes) -> str:
    try:
        payload = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return raw[:200].decode(errors="replace")
    error = payload.get("error") if isinstance(payload, dict) else None
    if isinstance(error, dict):
        return str(error.get("message") or error.get("type") or "error")[:200]
    if isinstance(error, str):
        return error[:200]
    return str(payload)[:200]

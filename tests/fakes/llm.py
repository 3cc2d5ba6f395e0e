"""A fake OpenAI-compatible chat-completions server (streaming SSE), on loopback, for tests.

`POST /v1/chat/completions` with `"stream": true` answers `text/event-stream`: one
`data: {"choices":[{"delta":{"content": …}}]}` event per token (a word and the space after it),
`token_delay_s` apart (the first after `first_token_s`), then `data: [DONE]`. Without `stream` it
answers one JSON completion.
Replies are scripted (`script([...])`, used in order, then `default_reply`); a reply that is a
callable gets the request's messages. `fail_next(status)` fails the next request; `cut_after`
drops the connection after that many tokens. `requests` records every request body (messages,
model, stream) and whether the bearer key was right — never the key itself.

    with FakeLlm(api_key="k") as llm:
        ...  # LLM_BASE_URL=llm.url (it ends in /v1)
"""

from __future__ import annotations

import asyncio
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from tests.fakes.server import ThreadedFake

Script = str | Callable[[list[dict[str, str]]], str]


@dataclass
class LlmRequest:
    body: dict[str, Any]
    auth_ok: bool
    at: float  # monotonic

    @property
    def messages(self) -> list[dict[str, str]]:
        return self.body.get("messages", [])


@dataclass
class FakeLlm(ThreadedFake):
    label = "fake LLM"

    api_key: str = ""
    default_reply: str = "This is a reply from the fake model. It has two sentences."
    token_delay_s: float = 0.01
    first_token_s: float = 0.0  # before the first token: a real model's time to first token
    requests: list[LlmRequest] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._script: list[Script] = []
        self._failures: list[int] = []
        self.cut_after: int | None = None
        self._lock = threading.Lock()
        self.port = 0
        self.app = FastAPI()
        self.app.add_api_route("/v1/chat/completions", self._completions, methods=["POST"])

    @property
    def url(self) -> str:
        return f"{self.base_url}/v1"

    def script(self, replies: list[Script]) -> None:
        with self._lock:
            self._script.extend(replies)

    def fail_next(self, status: int = 503, times: int = 1) -> None:
        with self._lock:
            self._failures.extend([status] * times)

    async def _completions(self, request: Request) -> Any:
        body = orjson.loads(await request.body() or b"{}")
        auth = request.headers.get("authorization", "")
        auth_ok = not self.api_key or auth == f"Bearer {self.api_key}"
        with self._lock:
            self.requests.append(LlmRequest(body, auth_ok, time.monotonic()))
            failure = self._failures.pop(0) if self._failures else None
            scripted = self._script.pop(0) if self._script else self.default_reply
        if not auth_ok:
            return JSONResponse({"error": {"message": "Incorrect API key provided", "type": "invalid_request_error"}},
                                status_code=401)
        if failure is not None:
            return JSONResponse({"error": {"message": "overloaded", "type": "server_error"}}, status_code=failure)
        text = scripted(body.get("messages", [])) if callable(scripted) else scripted
        model = body.get("model", "fake")
        if not body.get("stream"):
            return JSONResponse({"id": "cmpl-1", "object": "chat.completion", "model": model, "choices": [
                {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}]})
        tokens = re.findall(r"\S+\s*", text)
        cut_after = self.cut_after

        async def events() -> Any:
            first = {"id": "c1", "object": "chat.completion.chunk", "model": model,
                     "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}
            await asyncio.sleep(self.first_token_s)  # (the role chunk comes with the first token)
            yield b"data: " + orjson.dumps(first) + b"\n\n"
            for i, token in enumerate(tokens):
                if cut_after is not None and i >= cut_after:
                    raise RuntimeError("connection cut (scripted)")
                await asyncio.sleep(self.token_delay_s)
                chunk = {"id": "c1", "object": "chat.completion.chunk", "model": model,
                         "choices": [{"index": 0, "delta": {"content": token}, "finish_reason": None}]}
                yield b"data: " + orjson.dumps(chunk) + b"\n\n"
            last = {"id": "c1", "object": "chat.completion.chunk", "model": model,
                    "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
            yield b"data: " + orjson.dumps(last) + b"\n\n"
            yield b"data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

"""Structured JSON logs on stderr, one object per line, with the service name.

A session id passed as `extra={"sid": …}` lands in its own field so logs of one session can be
followed across services.
"""

from __future__ import annotations

import logging
import re
import sys

import orjson

# Query-string tokens (the browser socket URL carries `?token=`) and bearer values are masked in
# every line, whoever logs them (uvicorn logs WebSocket paths with their query string).
_SECRET_PATTERNS = [
    (re.compile(r"(token=)[^&\s\"']+", re.I), r"\1***"),
    (re.compile(r"(Bearer |Token )[A-Za-z0-9._~+/=-]+"), r"\1***"),
    # Any JWT (LiveKit access tokens, wherever an SDK or an error message puts one).
    (re.compile(r"eyJ[A-Za-z0-9_-]{6,}\.[A-Za-z0-9_-]{6,}\.[A-Za-z0-9_-]+"), "***jwt***"),
]


def redact(text: str) -> str:
    for pattern, replacement in _SECRET_PATTERNS:
        text = pattern.sub(replacement, text)
    return text


class JsonFormatter(logging.Formatter):
    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "service": self.service,
            "logger": record.name,
            "msg": redact(record.getMessage()),
        }
        sid = getattr(record, "sid", None)
        if sid:
            entry["sid"] = sid
        if record.exc_info:
            entry["exc"] = redact(self.formatException(record.exc_info))
        return orjson.dumps(entry).decode()


def setup_logging(service: str, level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(service))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Access logs would print every request line (and query strings); keep them quiet.
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)
    logging.getLogger("httpx").setLevel(logging.WARNING)

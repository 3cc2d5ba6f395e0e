"""OpenTelemetry spans per user turn, across the three services, carried in the bus entries.

One trace per turn:

    stt.end_of_speech_to_final   STT worker   where the VAD ended the speech → final published (root)
    gateway.text_turn            gateway      a typed turn (root instead of the above)
    avatar.turn                  avatar       turn read → the avatar speaking (parent of the next three)
      avatar.brain_first_text    avatar       turn read → the brain's first text (first avatar.reply)
      avatar.first_audio         avatar       first text → first audio (first avatar.audio)
      avatar.speaking            avatar       first audio → avatar.started_talking
    gateway.deliver              gateway      each of those events: in Redis → sent to the page

The trace context travels as a W3C `traceparent` in a `tp` field of the Redis entries (turns:{sid}
and the events above), never in the JSON the page gets. Everything happens in common/bus.py:
publishing a turn starts the trace, reading it on the avatar worker picks the context up, and the
avatar worker's events for reply `r-<turn id>` mark its moments, so the services' code only says
where speech ended (`end_of_speech`).

Off unless `OTEL_EXPORTER_OTLP_ENDPOINT` (OTLP over HTTP, e.g. http://collector:4318) or
`TRACES_FILE` (one JSON object per span and line, for tests and debugging) is set: then the API's
no-op tracer costs nothing.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections import OrderedDict
from typing import Any

from opentelemetry import propagate, trace
from opentelemetry.context import Context

from common.settings import Settings

TRACEPARENT = "traceparent"
_tracer = trace.get_tracer("avatar-stack")
_enabled = False
_lock = threading.Lock()
_MAX = 256  # pending turns/replies remembered per process (bounded: nothing here may grow)


class _Lru(OrderedDict):
    def put(self, key: Any, value: Any) -> None:
        self[key] = value
        self.move_to_end(key)
        while len(self) > _MAX:
            self.popitem(last=False)


_speech_ends: _Lru = _Lru()  # (sid, turn id) -> unix ns where speech ended (STT worker)
_turns: _Lru = _Lru()  # (sid, turn id) -> (parent context, read at ns) (avatar worker)
_replies: _Lru = _Lru()  # (sid, reply id) -> _ReplyTrace (avatar worker)


def setup_tracing(service: str, settings: Settings) -> bool:
    """Install the SDK's tracer provider when an exporter is configured; True if tracing is on."""
    global _enabled, _tracer
    endpoint = settings.otel_exporter_otlp_endpoint.strip()
    path = settings.traces_file.strip()
    if not endpoint and not path:
        return False
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

    provider = TracerProvider(
        resource=Resource.create({"service.name": f"avatar-stack-{service}", "service.namespace": "avatar-stack"})
    )
    if endpoint:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=f"{endpoint.rstrip('/')}/v1/traces")))
    if path:
        provider.add_span_processor(SimpleSpanProcessor(JsonLinesExporter(path)))
    trace.set_tracer_provider(provider)
    _tracer = trace.get_tracer("avatar-stack")
    _enabled = True
    return True


def enabled() -> bool:
    return _enabled


class JsonLinesExporter:
    """Spans as JSON lines appended to a file (each line one write on an O_APPEND descriptor, so
    several processes can share the file)."""

    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def export(self, spans) -> Any:
        from opentelemetry.sdk.trace.export import SpanExportResult

        for span in spans:
            ctx = span.get_span_context()
            parent = span.parent
            line = {
                "name": span.name,
                "service": span.resource.attributes.get("service.name"),
                "trace_id": f"{ctx.trace_id:032x}",
                "span_id": f"{ctx.span_id:016x}",
                "parent_id": f"{parent.span_id:016x}" if parent else None,
                "start_ns": span.start_time,
                "end_ns": span.end_time,
                "attributes": dict(span.attributes or {}),
            }
            os.write(self.fd, (json.dumps(line) + "\n").encode())
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        os.close(self.fd)

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


def _now_ns() -> int:
    return time.time_ns()


def _carrier(ctx: Context) -> bytes:
    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=ctx)
    return carrier.get(TRACEPARENT, "").encode()


def _context_of(tp: bytes | str) -> Context:
    value = tp.decode() if isinstance(tp, bytes) else tp
    return propagate.extract({TRACEPARENT: value})


# ---------------------------------------------------------------- STT worker / gateway: turns


def end_of_speech(sid: str, turn_id: str, at_ms: int) -> None:
    """The STT worker's VAD ended the turn's speech at unix ms `at_ms` (its final follows)."""
    if _enabled and at_ms > 0:
        with _lock:
            _speech_ends.put((sid, turn_id), at_ms * 1_000_000)


def turn_published(sid: str, turn: Any) -> bytes | None:
    """A user turn goes onto turns:{sid}: its trace starts here; returns the `tp` for the entry."""
    if not _enabled or getattr(turn, "type", "") != "user.turn":
        return None
    now = _now_ns()
    attributes = {"session.id": sid, "turn.id": turn.turn_id, "turn.source": turn.source}
    # A new trace per turn, not a child of whatever runs now (the gateway's WebSocket request has a
    # span of its own for as long as the page stays): linked to it instead.
    current = trace.get_current_span().get_span_context()
    root = {"context": Context(), "attributes": attributes, "links": [trace.Link(current)] if current.is_valid else []}
    if turn.source == "voice":
        with _lock:
            start = _speech_ends.pop((sid, turn.turn_id), None)
        span = _tracer.start_span("stt.end_of_speech_to_final", start_time=min(start or now, now), **root)
    else:
        span = _tracer.start_span("gateway.text_turn", start_time=now, **root)
    span.end(end_time=now)
    return _carrier(trace.set_span_in_context(span))


# ---------------------------------------------------------------- avatar worker: replies


class _ReplyTrace:
    def __init__(self, sid: str, reply_id: str, parent: Context, read_ns: int) -> None:
        self.attributes = {"session.id": sid, "reply.id": reply_id}
        self.turn = _tracer.start_span("avatar.turn", context=parent, start_time=read_ns, attributes=self.attributes)
        self.ctx = trace.set_span_in_context(self.turn)
        self.last_ns = read_ns
        self.marks: set[str] = set()
        self.talking_ns = 0  # when avatar.started_talking was published

    def mark(self, name: str, at: int) -> None:
        """A span from the previous moment to this one (moments never go back in time)."""
        if name in self.marks:
            return
        self.marks.add(name)
        at = max(at, self.last_ns)
        span = _tracer.start_span(name, context=self.ctx, start_time=self.last_ns, attributes=self.attributes)
        span.end(end_time=at)
        self.last_ns = at

    def end(self, now: int) -> None:
        self.turn.end(end_time=max(now, self.last_ns))

def turn_read(sid: str, turn_id: str, tp: bytes | None) -> None:
    """The avatar worker read a traced user turn (the trace's context came in the entry)."""
    if _enabled and tp:
        with _lock:
            _turns.put((sid, turn_id), (_context_of(tp), _now_ns()))


TIMED = ("avatar.reply", "avatar.audio", "avatar.started_talking")  # their first one is timed


def event_published(sid: str, event: Any) -> bytes | None:
    """An event of a traced reply goes onto events:{sid}: mark its moment; returns the `tp` for the
    entry of the events the gateway should time (first text, first audio, speaking)."""
    if not _enabled:
        return None
    reply_id = getattr(event, "reply_id", None)
    kind = getattr(event, "type", "")
    if not reply_id or not reply_id.startswith("r-"):
        return None
    key = (sid, reply_id)
    now = _now_ns()
    with _lock:
        reply = _replies.get(key)
        if reply is None:
            turn = _turns.pop((sid, reply_id[2:]), None)
            if turn is None:
                return None
            reply = _ReplyTrace(sid, reply_id, turn[0], turn[1])
            _replies.put(key, reply)
        first = kind in TIMED and kind not in reply.marks
        if first:
            reply.marks.add(kind)
        if kind == "avatar.reply":
            reply.mark("avatar.brain_first_text", now)
        elif kind == "avatar.audio":
            reply.mark("avatar.first_audio", now)
        elif kind == "avatar.started_talking" and not reply.talking_ns:
            reply.talking_ns = now
        # Speaking = it says it talks and its first audio is out (the local avatar announces itself
        # before its first chunk); a cloud avatar's audio comes over LiveKit: its start of talking.
        if reply.talking_ns and "avatar.first_audio" in reply.marks:
            reply.mark("avatar.speaking", max(now if kind == "avatar.audio" else reply.talking_ns, reply.last_ns))
        if kind == "avatar.stopped_talking":
            if reply.talking_ns and "avatar.speaking" not in reply.marks:
                reply.mark("avatar.speaking", reply.talking_ns)
            reply.end(now)
            _replies.pop(key, None)
        elif "avatar.speaking" in reply.marks:
            reply.end(now)
            _replies.pop(key, None)
        return _carrier(reply.ctx) if first else None


# ---------------------------------------------------------------- gateway: delivery


def delivered(tp: bytes, kind: str, in_redis_ms: int) -> None:
    """The gateway sent a traced event to the page: its span runs from XADD to the send."""
    if not _enabled:
        return
    now = _now_ns()
    span = _tracer.start_span(
        "gateway.deliver",
        context=_context_of(tp),
        start_time=min(in_redis_ms * 1_000_000, now),
        attributes={"event.type": kind},
    )
    span.end(end_time=now)

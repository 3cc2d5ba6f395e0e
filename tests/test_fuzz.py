"""Fuzzing: the REST API against its own OpenAPI schema, the browser message parser, the browser socket.

Deterministic in CI (derandomized Hypothesis, bounded example counts); `FUZZ_EXAMPLES=500` goes deeper.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import httpx
import orjson
import pytest
import redis
import requests
import schemathesis
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from common import keys
from common.bus import dump
from common.models import (
    AvatarEventIn,
    AvatarReply,
    BrowserMessage,
    EndIn,
    InterruptIn,
    PingIn,
    TextIn,
    UserTurn,
    browser_message_adapter,
    turn_adapter,
)
from tests.conftest import Stack
from tests.test_gateway import start_gateway

DEPTH = int(os.environ.get("FUZZ_EXAMPLES", "0"))
API_KEY = "fuzz-admin-key"


def examples(ci_default: int) -> int:
    """CI runs `ci_default` examples; FUZZ_EXAMPLES raises every count for a deeper local run."""
    return max(ci_default, DEPTH)


def fuzz_settings(ci_default: int) -> settings:
    """Same inputs on every run (derandomize, no example database), no timing assumptions."""
    return settings(
        max_examples=examples(ci_default),
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large],
    )


# ---------------------------------------------------------------- REST: schemathesis


@dataclass
class Gateway:
    stack: Stack
    keyed: bool  # runs with GATEWAY_API_KEY

    @property
    def url(self) -> str:
        return self.stack.base_url

    def new_session(self) -> tuple[str, str]:
        headers = {"X-API-Key": API_KEY} if self.keyed else {}
        resp = httpx.post(f"{self.url}/v1/sessions", json={}, headers=headers, timeout=10)
        assert resp.status_code == 201, resp.text
        return resp.json()["session_id"], resp.json()["token"]


@pytest.fixture(scope="module", params=["open", "keyed"])
def rest_gateway(request: pytest.FixtureRequest, redis_url: str) -> Iterator[Gateway]:
    """A real gateway without and with GATEWAY_API_KEY: the two ways the API authorises a request."""
    keyed = request.param == "keyed"
    extra = {"SESSION_CREATE_BURST": "100000"}  # FUZZ_EXAMPLES runs create many sessions from one address
    stack = start_gateway(redis_url, **extra, **({"GATEWAY_API_KEY": API_KEY} if keyed else {}))
    yield Gateway(stack, keyed)
    stack.stop_all()


CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    response_headers_conformance,
    negative_data_rejection,
]
# /readyz takes no input (it answers 200 while Redis does, whatever the pools): nothing to fuzz.
NOT_FUZZED = {"GET /readyz"}
# Who asks: drawn ids and headers; a forged credential (any latin-1 header text) for a real session;
# the session's holder with its token; the admin with GATEWAY_API_KEY.
WHO = ("stranger", "forger", "holder", "admin")
FORGED = st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"), min_size=1)


def _expected(label: str, who: str, keyed: bool, headers: dict[str, str]) -> set[int]:
    """What a well-formed request must get, by who asks."""
    ok = {204} if label.startswith("DELETE") else {201} if label.startswith("POST") else {200}
    if label == "GET /healthz" or who == "admin":
        return ok
    if who == "holder":  # X-API-Key wins over Authorization, and a session token is no API key
        return {401} if headers.get("x-api-key") else ok
    if "{sid}" in label:
        return {404} if who == "stranger" else {401}  # a drawn session id never exists
    return {401} if keyed else ok


def _fuzz_operation(gw: Gateway, op: schemathesis.APIOperation, mode: GenerationMode, who: str) -> None:
    """One Hypothesis run over one operation, as `who`; schemathesis draws everything not fixed here."""
    http = requests.Session()
    http.trust_env = False  # never a proxy: the gateway is on loopback
    fixed: dict[str, dict[str, str]] = {}
    if who != "stranger" and "{sid}" in op.path:
        sid, token = gw.new_session()
        fixed["path_parameters"] = {"sid": sid}
        if who == "holder":
            fixed["headers"] = {"authorization": f"Bearer {token}"}
    if who == "admin":
        fixed["headers"] = {"x-api-key": API_KEY}

    @fuzz_settings(40)
    @given(
        case=op.as_strategy(generation_mode=mode, **fixed),
        forged=FORGED.map(str.strip).filter(bool),
        header=st.sampled_from(["x-api-key", "authorization"]),
    )
    def run(case: schemathesis.Case, forged: str, header: str) -> None:
        if who == "forger":
            case.headers = {**(case.headers or {}), header: forged if header == "x-api-key" else f"Bearer {forged}"}
        response = case.call_and_validate(base_url=gw.url, session=http, checks=CHECKS)
        if mode is GenerationMode.POSITIVE:
            headers = {k.lower(): v for k, v in (case.headers or {}).items()}
            expected = _expected(op.label, who, gw.keyed, headers)
            assert response.status_code in expected, f"{op.label} as {who}: {response.status_code}, not {expected}"

    run()


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_rest_api_keeps_its_schema_and_its_word(rest_gateway: Gateway, mode: GenerationMode) -> None:
    """Every operation, by everyone who may ask: no 5xx, only documented statuses, bodies, content
    types and headers, and well-formed requests get what the API promises."""
    schema = schemathesis.openapi.from_url(f"{rest_gateway.url}/openapi.json")
    operations = [r.ok() for r in schema.get_all_operations()]
    labels = {op.label for op in operations}
    assert {"POST /v1/sessions", "GET /v1/sessions/{sid}", "DELETE /v1/sessions/{sid}"} <= labels
    for op in operations:
        if op.label in NOT_FUZZED or (mode is GenerationMode.NEGATIVE and not op.body):
            continue  # headers and path are free-form strings: only a body can be malformed
        for who in WHO:
            if (who == "holder" and "{sid}" not in op.path) or (who == "admin" and not rest_gateway.keyed):
                continue
            _fuzz_operation(rest_gateway, op, mode, who)


# ---------------------------------------------------------------- browser messages: the parser

MESSAGE_TYPES = ("text", "interrupt", "avatar.event", "end", "ping")
BROWSER_MODELS = (TextIn, InterruptIn, AvatarEventIn, EndIn, PingIn)
# docs/bad-input.md: limits the gateway applies to what the parser accepted
MAX_FRAME_BYTES, MAX_TEXT_CHARS, MAX_EVENT_PAYLOAD, MAX_BAD_IN_A_ROW = 32 * 1024, 2000, 4096, 20


def json_values(integers: st.SearchStrategy[int]) -> st.SearchStrategy[Any]:
    leaves = st.none() | st.booleans() | integers | st.floats() | st.text(max_size=20) | st.sampled_from(MESSAGE_TYPES)
    return st.recursive(
        leaves, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    )


JSON_VALUES = json_values(st.integers(-(2**70), 2**70))  # past 64 bits too: not every JSON writer takes them
INT64_JSON_VALUES = json_values(st.integers(-(2**63), 2**63 - 1))
LONG_TEXT = st.integers(MAX_TEXT_CHARS - 2, MAX_TEXT_CHARS + 2).map(lambda n: "y" * n)
BIG_PAYLOAD = st.integers(MAX_EVENT_PAYLOAD - 20, MAX_EVENT_PAYLOAD + 20).map(lambda n: "z" * n)
VALID_MESSAGES = st.one_of(
    st.builds(lambda text: {"type": "text", "text": text}, st.text(min_size=1, max_size=40) | LONG_TEXT),
    st.sampled_from([{"type": "interrupt"}, {"type": "end"}, {"type": "ping"}]),
    st.builds(
        lambda event, extra: {**extra, "type": "avatar.event", "event": event},
        st.text(min_size=1, max_size=64),
        st.dictionaries(st.text(max_size=8), INT64_JSON_VALUES | BIG_PAYLOAD, max_size=3),
    ),
)


@st.composite
def near_valid_messages(draw: st.DrawFn) -> dict[str, Any]:
    """A valid message with one to three fields dropped, re-typed, added or its `type` swapped."""
    message = dict(draw(VALID_MESSAGES))
    for _ in range(draw(st.integers(1, 3))):
        key = draw(st.sampled_from(sorted(message))) if message else "type"
        how = draw(st.sampled_from(["drop", "retype", "add", "swap_type"]))
        if how == "drop":
            message.pop(key, None)
        elif how == "retype":
            message[key] = draw(JSON_VALUES)
        elif how == "add":
            message[draw(st.text(max_size=8))] = draw(JSON_VALUES)
        else:
            message["type"] = draw(st.sampled_from(MESSAGE_TYPES) | st.text(max_size=12))
    return message


def parse(raw: str) -> BrowserMessage | None:
    """The gateway's parser: a model, or None for a ValidationError; anything else it raises escapes."""
    try:
        return browser_message_adapter.validate_json(raw)
    except ValidationError:
        return None


def assert_parsed_sanely(raw: str) -> None:
    """One of the documented models, which the gateway can then forward on the bus as JSON."""
    message = parse(raw)
    if message is None:
        return
    assert isinstance(message, BROWSER_MODELS), type(message)
    assert message.type == json.loads(raw)["type"]
    orjson.dumps(message.model_dump(mode="json"))  # what the gateway publishes: raises if it cannot
    if isinstance(message, AvatarEventIn):
        orjson.dumps(message.model_extra or {})


@fuzz_settings(300)
@given(raw=st.text())
def test_any_text_parses_or_is_refused(raw: str) -> None:
    assert_parsed_sanely(raw)


@fuzz_settings(300)
@given(value=JSON_VALUES | st.dictionaries(st.sampled_from(["type", "text", "event", "x"]), JSON_VALUES))
def test_any_json_value_parses_or_is_refused(value: Any) -> None:
    assert_parsed_sanely(json.dumps(value))


@fuzz_settings(300)
@given(message=near_valid_messages())
def test_near_valid_messages_parse_or_are_refused(message: dict[str, Any]) -> None:
    assert_parsed_sanely(json.dumps(message, ensure_ascii=False))


@fuzz_settings(300)
@given(event=st.text(min_size=1, max_size=64), extra=st.dictionaries(st.text(max_size=8), JSON_VALUES, max_size=4))
def test_any_avatar_event_payload_parses_or_is_refused(event: str, extra: dict[str, Any]) -> None:
    """The one message with free-form fields: whatever it carries is relayed to the avatar worker."""
    assert_parsed_sanely(json.dumps({**extra, "type": "avatar.event", "event": event}))


@fuzz_settings(150)
@given(message=VALID_MESSAGES)
def test_valid_messages_are_accepted(message: dict[str, Any]) -> None:
    """The other half: the parser must not refuse what the protocol allows (limits are the gateway's)."""
    parsed = parse(json.dumps(message))
    assert parsed is not None, message
    assert parsed.type == message["type"]


# ---------------------------------------------------------------- browser socket: frames on a real gateway

TEXT_FRAMES = st.one_of(
    VALID_MESSAGES.map(json.dumps),
    st.text(max_size=200),
    JSON_VALUES.map(json.dumps),
    st.dictionaries(st.text(max_size=10), JSON_VALUES, max_size=5).map(json.dumps),
    near_valid_messages().map(lambda m: json.dumps(m, ensure_ascii=False)),
).filter(lambda raw: not isinstance(parse(raw), EndIn))  # `end` would end the session on purpose
BINARY_FRAMES = st.binary(max_size=64) | st.sampled_from(
    [0, 1, 2, 639, 640, MAX_FRAME_BYTES - 1, MAX_FRAME_BYTES, MAX_FRAME_BYTES + 1, 40_000]
).map(lambda n: b"\x01" * n)
# Once relayed by the gateway as it was: orjson cannot write it, and the socket's uplink died silently.
AVATAR_EVENT_PAST_64_BITS = '{"": -9223372036854775809, "type": "avatar.event", "event": "0"}'
AUDIO_BURST_BYTES = 150_000  # under the 5 s (160 kB) burst a fresh socket allows: no rate limiting


def _audio_bytes(frames: list[str | bytes]) -> int:
    return sum(len(f) for f in frames if isinstance(f, bytes) and len(f) <= MAX_FRAME_BYTES and not len(f) % 2)


FRAME_SEQUENCES = st.builds(
    lambda before, flood, after: [*before, *flood, *after],
    st.lists(TEXT_FRAMES | BINARY_FRAMES, max_size=10),
    st.just([]) | (TEXT_FRAMES | st.binary(max_size=64)).map(lambda f: [f] * (MAX_BAD_IN_A_ROW + 1)),  # flood?
    st.lists(TEXT_FRAMES | BINARY_FRAMES, max_size=3),
).filter(lambda frames: _audio_bytes(frames) <= AUDIO_BURST_BYTES)


def relayed_size(message: AvatarEventIn) -> int | None:
    """Bytes of the payload the gateway relays (None: it cannot be written as JSON)."""
    try:
        return len(orjson.dumps(message.model_extra or {}))
    except orjson.JSONEncodeError:
        return None


def documented_answers(frames: list[str | bytes]) -> tuple[list[str], int | None]:
    """docs/bad-input.md as code: the `error` codes a fresh socket answers to `frames`, in order, and
    the code it closes with (None: it stays open)."""
    errors: list[str] = []
    bad_in_a_row = 0
    for frame in frames:
        if isinstance(frame, bytes) and len(frame) > MAX_FRAME_BYTES:
            return errors, 1009
        message = None if isinstance(frame, bytes) else parse(frame)
        if isinstance(message, AvatarEventIn) and relayed_size(message) is None:
            message = None  # malformed for the bus, so for the page too
        if (not frame or len(frame) % 2) if isinstance(frame, bytes) else message is None:
            bad_in_a_row += 1
            if bad_in_a_row >= MAX_BAD_IN_A_ROW:
                return errors, 1003
            errors.append("bad_audio_frame" if isinstance(frame, bytes) else "bad_message")
            continue
        bad_in_a_row = 0
        if isinstance(message, TextIn) and len(message.text) > MAX_TEXT_CHARS:
            errors.append("text_too_long")
        elif isinstance(message, AvatarEventIn) and (relayed_size(message) or 0) > MAX_EVENT_PAYLOAD:
            errors.append("bad_message")
    return errors, None


@dataclass
class Outcome:
    errors: list[str]  # `code` of each `error` event, in order
    close_code: int | None  # None: still open after the probe came back
    others: list[str]  # types of any other event: there should be none


@dataclass
class LiveSession:
    """A real session and the id of the last event its page saw (passed back as `last_event`)."""

    gw: Stack
    sid: str
    token: str
    ws_url: str
    last_event: str = ""
    probes: int = 0

    @cached_property
    def bus(self) -> redis.Redis:
        return self.gw.redis()

    @classmethod
    def create(cls, gw: Stack) -> LiveSession:
        resp = httpx.post(f"{gw.base_url}/v1/sessions", json={}, timeout=10)
        assert resp.status_code == 201, resp.text
        data = resp.json()
        return cls(gw, data["session_id"], data["token"], data["ws_url"])

    def connect(self) -> ClientConnection:
        url = f"{self.ws_url}?token={self.token}" + (f"&last_event={self.last_event}" if self.last_event else "")
        return connect(url, proxy=None, max_size=2**22, open_timeout=10)

    def exchange(self, ws: ClientConnection, frames: list[str | bytes]) -> Outcome:
        """Send `frames`, a ping and a probe: a typed turn that must reach the bus, answered by an event
        that must reach the page. Events sent before that answer are the answers to `frames`."""
        self.probes += 1
        probe = f"probe-{self.probes}"
        for frame in [*frames, '{"type":"ping"}', orjson.dumps({"type": "text", "text": probe}).decode()]:
            try:
                ws.send(frame)
            except ConnectionClosed:
                break
        outcome = Outcome([], None, [])
        answered = False
        deadline = time.monotonic() + 30  # a liveness bound (a dead uplink never answers), not a timing check
        while True:
            assert time.monotonic() < deadline, f"no answer to {probe}: {outcome}"
            try:
                event = orjson.loads(ws.recv(timeout=0.05))
            except TimeoutError:
                event = None
            except ConnectionClosed as exc:
                outcome.close_code = exc.rcvd.code if exc.rcvd else None
                return outcome
            if event is not None:
                self.last_event = event.get("id", self.last_event)
                if event.get("type") == "error":
                    assert event["fatal"] is False, event
                    outcome.errors.append(event["code"])
                elif event.get("type") == "avatar.reply" and event.get("reply_id") == probe:
                    return outcome
                else:
                    outcome.others.append(event.get("type", "?"))
            if not answered and _last_turn_text(self.bus, self.sid) == probe:  # the uplink got through the frames
                reply = AvatarReply(reply_id=probe, turn_id=probe, text=probe)
                self.bus.xadd(keys.events(self.sid), {"e": dump(reply)})
                answered = True

    def assert_usable(self) -> None:
        """A fresh socket with the same token: the probe goes up and its answer comes down."""
        with self.connect() as ws:
            assert self.exchange(ws, []) == Outcome([], None, [])
        info = httpx.get(
            f"{self.gw.base_url}/v1/sessions/{self.sid}", headers={"Authorization": f"Bearer {self.token}"}, timeout=10
        )
        assert info.status_code == 200 and info.json()["state"] != "ended", info.text


def _last_turn_text(r: redis.Redis, sid: str) -> str | None:
    last = r.xrevrange(keys.turns(sid), count=1)
    if not last:
        return None
    turn = turn_adapter.validate_json(last[0][1][b"t"])
    return turn.text if isinstance(turn, UserTurn) else None


@pytest.fixture(scope="module")
def ws_gateway(redis_url: str) -> Iterator[Stack]:
    stack = start_gateway(redis_url)
    yield stack
    stack.stop_all()


def test_browser_socket_answers_any_frames_as_documented(ws_gateway: Stack) -> None:
    """Random text, JSON, near-valid messages and binary of any size (floods too) on a real socket:
    exactly the documented `error` events and close codes; the session goes on (a reconnect with
    its token works) and another session on the same gateway hears nothing."""
    session, bystander = LiveSession.create(ws_gateway), LiveSession.create(ws_gateway)
    with bystander.connect() as quiet:

        @fuzz_settings(40)
        @given(frames=FRAME_SEQUENCES)
        @example(frames=[AVATAR_EVENT_PAST_64_BITS, b"\x00\x00" * 320])  # found by the parser tests
        def run(frames: list[str | bytes]) -> None:
            errors, close_code = documented_answers(frames)
            with session.connect() as ws:
                outcome = session.exchange(ws, frames)
            assert outcome == Outcome(errors, close_code, []), frames
            session.assert_usable()

        run()
        assert bystander.exchange(quiet, []) == Outcome([], None, [])  # nothing else arrived meanwhile
    bystander.assert_usable()

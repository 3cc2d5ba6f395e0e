"""Every Redis key and stream name, in one place.

Per-session keys put the session id inside `{…}`: that is a Redis Cluster hash tag, so all keys
of one session live in one slot and multi-key commands on them stay legal on a cluster.
"""

from __future__ import annotations

JOBS_STT = "jobs:stt"
JOBS_AVATAR = "jobs:avatar"
GROUP_STT = "stt"
GROUP_AVATAR = "avatar"


def vendor_sessions(vendor: str) -> str:
    """Hash: vendor session id -> JSON {sid, at} of every paid avatar session this deployment started
    and has not yet stopped. The reaper stops only these (never another app's sessions on the account)."""
    return f"vendor_sessions:{vendor}"


def session(sid: str) -> str:
    """Hash: config, state, token hash, cursors, vendor ids."""
    return f"session:{{{sid}}}"


def audio(sid: str) -> str:
    """Stream: browser PCM frames for the owning STT worker."""
    return f"audio:{{{sid}}}"


def turns(sid: str) -> str:
    """Stream: user turns and barge-in signals for the owning avatar worker."""
    return f"turns:{{{sid}}}"


def events(sid: str) -> str:
    """Stream: everything the browser sees."""
    return f"events:{{{sid}}}"


def answered(sid: str) -> str:
    """Set: turn ids the avatar worker has already answered (idempotency across takeover)."""
    return f"answered:{{{sid}}}"


def history(sid: str) -> str:
    """List: the conversation as JSON chat messages (bounded), for the brain."""
    return f"history:{{{sid}}}"


def conns(sid: str) -> str:
    """Sorted set: the session's open browser sockets, socket id → expiry (unix s). Each gateway
    refreshes its own, so a killed gateway's sockets expire instead of counting forever."""
    return f"conns:{{{sid}}}"


def all_session_keys(sid: str) -> list[str]:
    return [session(sid), audio(sid), turns(sid), events(sid), answered(sid), history(sid), conns(sid)]


def workers(kind: str) -> str:
    """Hash: consumer name → JSON {capacity, load, ts}, refreshed by each worker's heartbeat."""
    return f"workers:{kind}"


def rate_limit(what: str, client: str) -> str:
    """Hash {tokens, at}: the token bucket of one client (an address) shared by every gateway; it
    expires once the bucket would be full again."""
    return f"ratelimit:{what}:{{{client}}}"


SESSIONS_INDEX = "sessions:live"
"""Sorted set of live session ids scored by creation time (for listing and reaping)."""


# Fields of the session hash.
F_STATE = "state"  # created | live | ended
F_TOKEN_HASH = "token_sha256"
F_CREATED = "created_at"
F_ENDED_REASON = "ended_reason"
F_LAST_SEEN = "last_seen_at"  # last browser activity (unix s)
F_DISCONNECTED_AT = "disconnected_at"  # when the last socket closed (expiries are in `conns:{sid}`)
F_STT_CURSOR = "stt_cursor"  # last audio entry id fully covered by a final / silence
F_STT_CURSOR_T = "stt_cursor_t"  # session audio time (s) at that cursor
F_AVATAR_CURSOR = "avatar_cursor"  # last turn entry id handled
F_STT_OWNER = "stt_owner"
F_AVATAR_OWNER = "avatar_owner"
F_AVATAR_REPLY = "avatar_reply"  # reply id being spoken: a takeover closes it with stopped_talking
F_CONFIG = "config"  # JSON of SessionConfig

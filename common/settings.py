"""One settings object for every service, read from the environment and `.env`.

Names follow ARCHITECTURE §6 so an existing `.env` keeps working. Secrets are `SecretStr`
so that printing or logging the settings never shows them.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", extra="ignore")

    # Redis
    redis_url: str = "redis://127.0.0.1:6379/0"  # `redis+cluster://host:port` = a Redis Cluster node
    # A node of a Redis Cluster (`redis://host:port`, or several: `redis://h1:p1,h2:p2`); set, it wins
    # over REDIS_URL and the services use redis-py's cluster client (every command is single-slot)
    redis_cluster_url: str = ""

    # Providers
    stt_provider: Literal["auto", "local", "deepgram"] = "auto"
    avatar_provider: str = "auto"  # auto | local | a module of avatar_service/providers (liveavatar, heygen)

    # Deepgram
    deepgram_api_key: SecretStr | None = None
    deepgram_url: str = "wss://api.deepgram.com/v1/listen"
    deepgram_model: str = "nova-3"
    deepgram_endpointing_ms: int = Field(default=300, ge=10)
    # Finalize as soon as the user is quiet after a finished question (not waiting for Deepgram's
    # endpoint); never while the avatar talks, so its echo is cut only where Deepgram cuts it.
    deepgram_early_finalize: bool = True
    deepgram_utterance_end_ms: int = Field(default=1000, ge=1000)
    deepgram_keyterms: str = Field(default="", description="comma-separated key terms (Nova-3)")
    # Audio held per session for a replay after a reconnect, and the most that waits while
    # Deepgram is slow or unreachable before the worker stops reading the session's stream.
    deepgram_replay_max_s: float = Field(default=30.0, ge=1.0, le=300.0)

    # Cloud avatar vendors: each reads its own settings beside its adapter
    # (avatar_service/providers/heygen.py: HEYGEN_*, liveavatar.py: LIVEAVATAR_*).

    # LiveKit for the local avatar's voice (self-hosted or LiveKit Cloud); unset = the WebSocket voice
    livekit_url: str = ""  # what the avatar worker dials, e.g. ws://127.0.0.1:7880 or wss://x.livekit.cloud
    livekit_public_url: str = ""  # what the page dials, when it differs (docker, proxies); empty = LIVEKIT_URL
    livekit_api_key: SecretStr | None = None
    livekit_api_secret: SecretStr | None = None
    livekit_token_ttl_s: int = Field(default=600, ge=30, le=86400)  # the page's join token
    livekit_connect_timeout_s: float = Field(default=5.0, gt=0, le=60)
    livekit_room_prefix: str = "avatar-stack-"

    # Brain: an OpenAI-compatible chat-completions server; empty LLM_BASE_URL = the local Q&A responder
    llm_base_url: str = ""  # e.g. https://api.openai.com/v1, http://127.0.0.1:8080/v1 (llama.cpp)
    llm_api_key: SecretStr | None = None
    llm_model: str = "gpt-4o-mini"
    llm_system_prompt: str = ""  # empty = a short built-in prompt for spoken answers
    llm_knowledge_file: str = ""  # optional text appended to the system prompt
    llm_history_messages: int = Field(default=20, ge=0, le=500)  # per session, kept in Redis
    llm_max_tokens: int = Field(default=300, ge=0)  # 0 = the server's default
    llm_temperature: float | None = None
    llm_timeout_s: float = Field(default=30.0, ge=1)

    # Local engines
    local_stt_model: str = Field(default="", description="CTranslate2 Whisper folder; empty = bundled tiny.en")
    local_stt_threads: int = 2
    # Words the recognizer should expect (Whisper hotwords): names it would otherwise miss.
    local_stt_prompt: str = "Avatar Stack, avatar-stack, LiveKit, HeyGen, Deepgram, Redis."
    local_tts_voice: str = Field(default="", description="piper .onnx voice; empty = bundled en_US-joe-medium")
    knowledge_file: str = Field(default="", description="Q&A file for the local responder; empty = bundled")

    # Turn-taking (README "Turns and barge-in")
    # smart: a pause ends the turn only when the words and Smart Turn say the user finished;
    # silence: every pause the engine reports ends the turn (the behaviour before turn detection)
    turn_detection: Literal["smart", "silence"] = "smart"
    turn_model_file: str = ""  # Smart Turn ONNX file; empty = the one inside the pipecat-ai package
    turn_complete_threshold: float = Field(default=0.5, gt=0, lt=1)
    turn_max_wait_s: float = Field(default=2.0, ge=0, le=10)  # an unfinished turn ends after this much silence
    # The local engine's pause: a turn detector judges it, so it can be short; empty = 0.25 s (smart) / 0.4 s
    local_stt_end_silence_s: float | None = Field(default=None, ge=0.1, le=2)
    # Barge-in: the avatar yields only to words; first it pauses, and resumes if no more words come
    barge_in_min_words: int = Field(default=2, ge=1, le=10)  # in an interim; a final turn stops it anyway
    barge_in_resume_s: float = Field(default=2.5, ge=0, le=10)  # false-interruption window
    # A voice turn that began this soon after the avatar began answering the last one continues it:
    # that reply is dropped and both are answered as one (a turn ended too early). 0 = never.
    turn_continuation_s: float = Field(default=1.0, ge=0, le=5)
    # A reply that is ready while the user has begun to speak again waits, unheard, until this long
    # after their last voice (their next turn drops it, as above). 0 = start it at once.
    reply_hold_s: float = Field(default=1.0, ge=0, le=5)
    # Backchannels per language (comma-separated): said over the avatar they neither stop it nor become turns
    backchannels: dict[str, str] = {
        "en": "mhm, mm, mm-hmm, hmm, uh-huh, uh huh, yeah, yes, yep, yup, right, ok, okay, sure, i see, "
        "got it, cool, nice, great, wow, oh, ah, really, true, exactly, alright",
        "de": "mhm, ja, genau, okay, stimmt, aha, achso, klar, richtig",
        "es": "mhm, sí, vale, claro, ya, ajá, exacto, bueno",
        "fr": "mhm, oui, ouais, d'accord, ok, ah, voilà, exactement",
    }
    # Openings that mean "let me speak" (comma-separated per language): the first word of one pauses
    # the avatar, without waiting for BARGE_IN_MIN_WORDS
    barge_in_cues: dict[str, str] = {
        "en": "wait, stop, hold on, hang on, sorry, excuse me, pardon, actually, no, one second, one moment, "
        "just a second, just a moment",
        "de": "warte, warten sie, stopp, halt, moment, entschuldigung, sorry, nein",
        "es": "espera, espere, para, pare, perdón, perdona, disculpa, un momento, no",
        "fr": "attends, attendez, stop, pardon, excusez moi, non, une seconde, un instant",
    }
    echo_guard: bool = True  # user speech that repeats the avatar's own recent words is echo
    echo_tail_s: float = Field(default=2.5, ge=0, le=30)  # when a speech start is unknown: how long echo may come
    echo_match: float = Field(default=0.5, ge=0, lt=1)  # echo: more than this share of the heard words are its
    # The user near the mic is louder than the avatar's echo: once both levels are learnt and are at
    # least this far apart, speech over the avatar is told by its loudness (0 = by words only).
    echo_level_gap_db: float = Field(default=6.0, ge=0, le=40)

    # Gateway
    gateway_host: str = "127.0.0.1"
    gateway_port: int = 8000
    gateway_api_key: SecretStr | None = None
    gateway_public_url: str = ""
    # Demo mode: POST /demo/sessions creates sessions without GATEWAY_API_KEY (rate-limited per address),
    # so the bundled page works on a keyed gateway. Anyone reaching the gateway can then start sessions.
    gateway_demo_sessions: bool = False
    # Browser origins allowed besides the gateway's own (comma-separated, e.g. https://app.example.com);
    # empty = same origin only; `*` = any (only when set explicitly)
    allowed_origins: str = ""
    # Host names the gateway answers to (comma-separated, `*.example.com` allowed, `*` = any). Empty:
    # loopback names only while GATEWAY_HOST is a loopback address, which keeps a web page whose
    # domain was re-pointed at 127.0.0.1 (DNS rebinding) off a local gateway; any name otherwise.
    allowed_hosts: str = ""
    # Addresses whose X-Forwarded-For / X-Forwarded-Proto uvicorn trusts (the proxy's); as uvicorn's default
    forwarded_allow_ips: str = "127.0.0.1,::1"
    session_create_rate_per_min: float = Field(default=30.0, ge=0)  # per client address; 0 = no limit
    session_create_burst: int = Field(default=10, ge=0)  # sessions a client may create at once; 0 = no limit
    # redis: one bucket per client shared by every gateway (N gateways allow the rate once, not N
    # times); process: each gateway its own (the fallback anyway while Redis does not answer)
    session_create_rate_scope: Literal["redis", "process"] = "redis"
    # >0: the gateway serves /metrics on this port (METRICS_HOST) instead of its public one
    gateway_metrics_port: int = Field(default=0, ge=0, le=65535)
    frontend_dir: str = Field(default="", description="the page's folder; empty = frontend/ of this checkout")
    # A send to a browser that cannot complete in this long closes its socket with 4408 (the page
    # reconnects with `last_event`; the events wait in Redis), so a stalled page holds no memory.
    browser_send_timeout_s: float = Field(default=10.0, gt=0)
    # The gateway refreshes each open socket's presence this often; an entry not refreshed for 3
    # times as long (its gateway died) no longer counts as connected, and the grace period runs.
    browser_presence_refresh_s: float = Field(default=5.0, gt=0)

    # Sessions
    session_grace_s: float = 15.0
    session_idle_timeout_s: float = 300.0
    session_max_s: float = 3600.0
    ended_session_ttl_s: int = 120

    # Workers
    stt_capacity: int = 4
    avatar_capacity: int = 8
    admission_control: bool = True  # 503 on POST /v1/sessions when a worker pool is full
    worker_stale_s: float = 5.0  # a worker silent this long no longer counts
    job_lease_ms: int = 5000
    heartbeat_ms: int = 1000

    # Audio batching: the gateway holds a frame up to this long for other sessions' frames to share
    # its write to Redis, and the STT worker reads the audio feed at most once per this interval
    # (times 2.5). Each bounds the latency it adds; 0 = a write per arrival and a read per wake-up.
    audio_batch_ms: float = Field(default=2.0, ge=0, le=20)

    # Bounds
    audio_stream_maxlen: int = 1500  # ~30 s of 20 ms frames
    events_stream_maxlen: int = 2000
    turns_stream_maxlen: int = 200
    max_frame_bytes: int = 32 * 1024
    max_text_chars: int = 2000

    log_level: str = "INFO"
    # Tracing (common/tracing.py): spans per user turn across the services; off unless one is set.
    otel_exporter_otlp_endpoint: str = ""  # OTLP over HTTP, e.g. http://otel-collector:4318
    traces_file: str = ""  # spans as JSON lines appended to this file (tests, debugging)
    # Workers' Prometheus endpoints (the gateway serves /metrics on its own port). A taken port
    # falls back to a free one, advertised in `workers:{kind}`; 0 = no endpoint.
    metrics_host: str = "127.0.0.1"
    stt_metrics_port: int = Field(default=9101, ge=0, le=65535)
    avatar_metrics_port: int = Field(default=9102, ge=0, le=65535)

    def local_end_silence_s(self) -> float:
        if self.local_stt_end_silence_s is not None:
            return self.local_stt_end_silence_s
        return 0.25 if self.turn_detection == "smart" else 0.4

    def resolved_stt_provider(self) -> str:
        if self.stt_provider != "auto":
            return self.stt_provider
        return "deepgram" if self.deepgram_api_key else "local"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()

// Generated from common/models.py by `python -m common.schema`; do not edit.
// The browser <-> gateway protocol (protocol.schema.json) as TypeScript types.

/** Announces the binary frame that follows it: one chunk of the local avatar's speech. `mouth` holds mouth openness (0..1) for each `mouth_hop_ms` of the chunk, so the page can animate the face in step with what it plays. */
export interface AvatarAudio {
  ts: number;
  type: "avatar.audio";
  reply_id: string;
  seq: number;
  sample_rate: number;
  samples: number;
  mouth: number[];
  mouth_hop_ms: number;
  /** The event's id in the session's event stream: pass the last one back as `last_event` when reconnecting. Added by the gateway. */
  id?: string;
}

/** An event the page saw on the vendor's LiveKit data channel, relayed to the server. */
export interface AvatarEventIn {
  type: "avatar.event";
  event: string;
  [extra: string]: unknown;
}

/** The avatar went quiet because the user started talking over it; `avatar.resumed` follows if no words come (a cough, a door, a backchannel), else `avatar.stopped_talking`. */
export interface AvatarPaused {
  ts: number;
  type: "avatar.paused";
  reply_id: string;
  /** The event's id in the session's event stream: pass the last one back as `last_event` when reconnecting. Added by the gateway. */
  id?: string;
}

export interface AvatarReply {
  ts: number;
  type: "avatar.reply";
  reply_id: string;
  turn_id: string;
  text: string;
  replaces?: string;
  /** The event's id in the session's event stream: pass the last one back as `last_event` when reconnecting. Added by the gateway. */
  id?: string;
}

export interface AvatarResumed {
  ts: number;
  type: "avatar.resumed";
  reply_id: string;
  /** The event's id in the session's event stream: pass the last one back as `last_event` when reconnecting. Added by the gateway. */
  id?: string;
}

export interface AvatarStartedTalking {
  ts: number;
  type: "avatar.started_talking";
  reply_id: string;
  /** The event's id in the session's event stream: pass the last one back as `last_event` when reconnecting. Added by the gateway. */
  id?: string;
}

export interface AvatarStoppedTalking {
  ts: number;
  type: "avatar.stopped_talking";
  reply_id: string;
  interrupted: boolean;
  /** The event's id in the session's event stream: pass the last one back as `last_event` when reconnecting. Added by the gateway. */
  id?: string;
}

export type BrowserMessage = TextIn | InterruptIn | AvatarEventIn | EndIn | PingIn;

export interface EndIn {
  type: "end";
}

export interface ErrorEvent {
  ts: number;
  type: "error";
  code: string;
  message: string;
  fatal: boolean;
  /** The event's id in the session's event stream: pass the last one back as `last_event` when reconnecting. Added by the gateway. */
  id?: string;
}

export interface InterruptIn {
  type: "interrupt";
}

export interface LiveKitInfo {
  url: string;
  token: string;
  avatar_identity?: string;
}

export interface PingIn {
  type: "ping";
}

export type ServerEvent = SessionReady | TranscriptInterim | TranscriptFinal | AvatarReply | AvatarStartedTalking | AvatarStoppedTalking | AvatarPaused | AvatarResumed | TranscriptIgnored | AvatarAudio | ErrorEvent | SessionEnded;

/** Per-session choices a client may make; the server fills in defaults. */
export interface SessionConfig {
  avatar_id?: string | null;
  voice_id?: string | null;
  language?: string;
}

export interface SessionCreated {
  session_id: string;
  token: string;
  ws_url: string;
}

export interface SessionEnded {
  ts: number;
  type: "session.ended";
  reason: string;
  /** The event's id in the session's event stream: pass the last one back as `last_event` when reconnecting. Added by the gateway. */
  id?: string;
}

export interface SessionReady {
  ts: number;
  type: "session.ready";
  provider: string;
  stt_provider?: string;
  livekit?: LiveKitInfo;
  audio_sample_rate?: number;
  /** The event's id in the session's event stream: pass the last one back as `last_event` when reconnecting. Added by the gateway. */
  id?: string;
}

export interface TextIn {
  type: "text";
  text: string;
}

export interface TranscriptFinal {
  ts: number;
  type: "transcript.final";
  utterance_id: string;
  text: string;
  start_s: number;
  end_s: number;
  /** The event's id in the session's event stream: pass the last one back as `last_event` when reconnecting. Added by the gateway. */
  id?: string;
}

/** A final the avatar will not answer: its own voice heard back (`echo`) or a backchannel ("mhm") said over it. The page shows it struck through, or not at all. */
export interface TranscriptIgnored {
  ts: number;
  type: "transcript.ignored";
  utterance_id: string;
  reason: "echo" | "backchannel";
  /** The event's id in the session's event stream: pass the last one back as `last_event` when reconnecting. Added by the gateway. */
  id?: string;
}

export interface TranscriptInterim {
  ts: number;
  type: "transcript.interim";
  utterance_id: string;
  text: string;
  /** The event's id in the session's event stream: pass the last one back as `last_event` when reconnecting. Added by the gateway. */
  id?: string;
}

/** Every server event by its `type`. */
export interface ServerEventMap {
  "avatar.audio": AvatarAudio;
  "avatar.paused": AvatarPaused;
  "avatar.reply": AvatarReply;
  "avatar.resumed": AvatarResumed;
  "avatar.started_talking": AvatarStartedTalking;
  "avatar.stopped_talking": AvatarStoppedTalking;
  "error": ErrorEvent;
  "session.ended": SessionEnded;
  "session.ready": SessionReady;
  "transcript.final": TranscriptFinal;
  "transcript.ignored": TranscriptIgnored;
  "transcript.interim": TranscriptInterim;
}

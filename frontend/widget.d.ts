// Types of <avatar-stack-avatar> (frontend/widget.js): its attributes, methods and events.
// The server events it passes on are typed in protocol.d.ts (generated from common/models.py).
//
//   import type { AvatarStackAvatar } from "./widget.d.ts";
//   const el = document.querySelector("avatar-stack-avatar")!;
//   el.addEventListener("avatar-stack:reply", (e) => console.log(e.detail.text));

import type { ServerEvent, SessionCreated, SessionReady } from "./protocol";

export type AvatarStackState = "idle" | "connecting" | "live" | "reconnecting" | "ended" | "error";

/** Attributes (all optional). */
export interface AvatarStackAvatarAttributes {
  /** Your backend's URL that creates a session with GATEWAY_API_KEY and returns SessionCreated. */
  "session-endpoint"?: string;
  /** The gateway's base URL; default: the origin (and path) that served widget.js. */
  gateway?: string;
  /** Provider options, sent as SessionConfig. */
  "avatar-id"?: string;
  "voice-id"?: string;
  language?: string;
  /** "light", "dark" or "auto" (the default: follows prefers-color-scheme). */
  theme?: "light" | "dark" | "auto";
  /** Present: show what is said as captions over the avatar. */
  captions?: "" | boolean;
  /** "false": play the local voice straight from Web Audio, not through the echo-cancelled loopback. */
  loopback?: "true" | "false";
}

export interface AvatarStackTranscriptDetail {
  utterance_id: string;
  text: string;
  /** false while the words are provisional (interim); true once, for the final text. */
  final: boolean;
  /** Set when the server will not answer it: the avatar's own voice heard back, or a "mhm". */
  ignored?: "echo" | "backchannel";
}

export interface AvatarStackEventMap {
  /** The conversation's state changed. */
  "avatar-stack:state": CustomEvent<{ state: AvatarStackState; previous: AvatarStackState }>;
  /** The avatar is ready (session.ready). */
  "avatar-stack:ready": CustomEvent<{
    session_id: string | null;
    provider: SessionReady["provider"];
    stt_provider: string | null;
  }>;
  /** What the user said: interim words, then the final text. */
  "avatar-stack:transcript": CustomEvent<AvatarStackTranscriptDetail>;
  /** Text the avatar says (a streamed reply may come as several events with the same reply_id).
   * `replaces`: the reply dropped because the user went on with the turn it answered. */
  "avatar-stack:reply": CustomEvent<{ reply_id: string; turn_id: string; text: string; replaces: string | null }>;
  /** The avatar started or stopped being heard. */
  "avatar-stack:speaking": CustomEvent<{ speaking: boolean }>;
  /** A server error event, or a problem in the page (mic_denied, unauthorized, no_capacity, …). */
  "avatar-stack:error": CustomEvent<{ code: string; message: string; fatal: boolean }>;
  /** The session ended (session.ended). */
  "avatar-stack:ended": CustomEvent<{ reason: string }>;
  /** Every event from the server, as it came (protocol.d.ts). */
  "avatar-stack:event": CustomEvent<ServerEvent>;
}

export declare class AvatarStackAvatar extends HTMLElement {
  readonly state: AvatarStackState;
  readonly sessionId: string | null;
  readonly provider: string;
  /** Counters for tests and debugging. */
  readonly stats: {
    state: AvatarStackState;
    provider: string;
    framesSent: number;
    audioChunksReceived: number;
    audioChunksPlayed: number;
    maxPlaybackLevel: number;
    eventsSeen: number;
  };
  /** Start a conversation (call from a user gesture); `session`: one your code already created. */
  start(session?: SessionCreated | null): Promise<void>;
  /** End the conversation; the session ends on the server too. */
  stop(): Promise<void>;
  /** Send a typed message; false when not connected. */
  send(text: string): boolean;
  /** Stop the avatar talking now. */
  interrupt(): boolean;
  setMuted(muted: boolean): void;

  addEventListener<K extends keyof AvatarStackEventMap>(
    type: K,
    listener: (this: AvatarStackAvatar, ev: AvatarStackEventMap[K]) => unknown,
    options?: boolean | AddEventListenerOptions,
  ): void;
  addEventListener(
    type: string,
    listener: EventListenerOrEventListenerObject,
    options?: boolean | AddEventListenerOptions,
  ): void;
}

declare global {
  interface HTMLElementTagNameMap {
    "avatar-stack-avatar": AvatarStackAvatar;
  }
}

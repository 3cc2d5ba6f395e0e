// <avatar-stack-avatar>: the avatar as a web component for your own page. One script tag, served by
// the gateway, no build step; it reuses the page's modules (socket, microphone, player, face,
// LiveKit views). Types of its attributes, methods and events: widget.d.ts.
//
//   <script type="module" src="/widget.js"></script>   (the path on your avatar-stack gateway)
//   <avatar-stack-avatar session-endpoint="/api/avatar-session" theme="dark" captions></avatar-stack-avatar>
//
// A page of another origin must be listed in the gateway's ALLOWED_ORIGINS (module scripts, the
// socket and DELETE are checked against it). Sessions come from `session-endpoint` (your backend
// creates them with GATEWAY_API_KEY and returns {session_id, token, ws_url}: the page never sees
// the key), else from the gateway itself (open, or its demo mode), or from `start(session)`.

import { MicCapture, micErrorMessage } from "./capture.js";
import { CloudAvatar } from "./cloud.js";
import { SessionSocket } from "./connection.js";
import { Face } from "./face.js";
import { LiveKitVoice } from "./livekit-voice.js";
import { SpeechPlayer } from "./player.js";
import { createSession, deleteSession } from "./sessions.js";

const TAG = "avatar-stack-avatar";
const SCRIPT_BASE = new URL(".", import.meta.url); // the gateway that served this script
const SILENT_FRAME = new ArrayBuffer(640);
const ACTIVE = new Set(["connecting", "live", "reconnecting"]);
const OPTION_ATTRIBUTES = { "avatar-id": "avatar_id", "voice-id": "voice_id", language: "language" };

const TEMPLATE = `
  <link rel="stylesheet" href="${new URL("widget.css", import.meta.url)}">
  <div class="frame" part="frame" data-view="face">
    <svg class="face" part="face" viewBox="0 0 200 200" role="img" aria-label="The avatar's face"></svg>
    <video class="video" part="video" playsinline autoplay hidden></video>
    <audio class="audio" autoplay></audio>
    <p class="caption" part="caption" aria-live="polite" hidden></p>
    <p class="notice" part="notice" role="alert" hidden></p>
  </div>
  <div class="controls" part="controls">
    <button type="button" class="start" part="button start">Start conversation</button>
    <button type="button" class="stop" part="button stop" hidden>End</button>
    <button type="button" class="mute" part="button mute" aria-pressed="false" hidden>Mute</button>
  </div>
`;

export class AvatarStackAvatar extends HTMLElement {
  static get observedAttributes() {
    return ["theme"];
  }

  constructor() {
    super();
    const root = this.attachShadow({ mode: "open" });
    root.innerHTML = TEMPLATE;
    const $ = (sel) => root.querySelector(sel);
    this.ui = {
      frame: $(".frame"),
      face: $(".face"),
      video: $(".video"),
      audio: $(".audio"),
      caption: $(".caption"),
      notice: $(".notice"),
      start: $(".start"),
      stop: $(".stop"),
      mute: $(".mute"),
    };
    this._state = "idle";
    this.session = null;
    this.socket = null;
    this.provider = "";
    this.muted = false;
    this.speaking = false;
    this.ending = false;
    this.cloudActive = false;
    this.cloudSpeaking = false;
    this.maxPlaybackLevel = 0;
    this.eventsSeen = 0;
    this.face = new Face(this.ui.face);
    this.player = null; // made on first start (its audio context needs the user's click)
    this.mic = new MicCapture({ onFrame: (pcm) => this.socket?.sendAudio(this.muted ? SILENT_FRAME : pcm) });
    this.voice = new LiveKitVoice({ onReplyHeard: () => {} });
    this.cloud = new CloudAvatar({
      video: this.ui.video,
      audio: this.ui.audio,
      onVendorEvent: (type, data) => this.socket?.send({ ...data, type: "avatar.event", event: type }),
      onState: (state, err) => {
        if (state === "failed") this.emitError("avatar_video_failed", String(err?.message || err), false);
      },
    });
    this.ui.start.addEventListener("click", () => this.start());
    this.ui.stop.addEventListener("click", () => this.stop());
    this.ui.mute.addEventListener("click", () => this.setMuted(!this.muted));
    this.frame = this.frame.bind(this);
  }

  connectedCallback() {
    if (!this.hasAttribute("theme")) this.setAttribute("theme", "auto");
    this.dataset.state = this._state;
    this.raf = requestAnimationFrame(this.frame);
  }

  disconnectedCallback() {
    cancelAnimationFrame(this.raf);
    if (this.session) this.stop();
  }

  // -------------------------------------------------------------- public API

  /** "idle" | "connecting" | "live" | "reconnecting" | "ended" | "error" */
  get state() {
    return this._state;
  }

  get sessionId() {
    return this.session?.session_id ?? null;
  }

  /** Counters for tests and debugging. */
  get stats() {
    return {
      state: this._state,
      provider: this.provider,
      framesSent: this.socket?.framesSent ?? 0,
      audioChunksReceived: this.player?.stats.chunksReceived ?? 0,
      audioChunksPlayed: this.player?.stats.chunksPlayed ?? 0,
      maxPlaybackLevel: this.maxPlaybackLevel,
      eventsSeen: this.eventsSeen,
    };
  }

  /**
   * Start a conversation. Call it from a user gesture (the Start button does) so audio may play.
   * `session`: one your code already has ({session_id, token, ws_url}); else the widget gets one.
   */
  async start(session = null) {
    if (ACTIVE.has(this._state)) return;
    this.ending = false;
    this.provider = "";
    this.hideNotice();
    this.caption("");
    this.setState("connecting");
    this.player ??= new SpeechPlayer({ loopback: this.getAttribute("loopback") !== "false" });
    this.player.prepare();
    let micReady = Promise.resolve();
    if (navigator.mediaDevices?.getUserMedia) {
      this.mic.prepare();
      micReady = this.mic.start().then(
        () => {
          this.ui.mute.hidden = false;
        },
        (err) => this.emitError("mic_denied", micErrorMessage(err), false),
      );
    } else {
      this.emitError("mic_denied", micErrorMessage(null), false);
    }
    try {
      this.session =
        session ||
        (await createSession({
          gateway: this.gatewayUrl,
          endpoint: this.getAttribute("session-endpoint") || "",
          options: this.sessionOptions(),
        }));
    } catch (err) {
      this.emitError(err.code || "session_failed", err.message, true);
      this.finish("error");
      return;
    }
    this.socket = new SessionSocket({
      wsUrl: this.session.ws_url,
      token: this.session.token,
      onEvent: (e) => this.onEvent(e),
      onAudio: (meta, pcm) => this.onAudio(meta, pcm),
      onStatus: (status, detail) => this.onSocketStatus(status, detail),
    });
    this.socket.connect();
    await micReady;
  }

  /** End the conversation (the session ends on the server too). */
  async stop() {
    const session = this.session;
    if (!session) return;
    this.ending = true;
    this.socket?.send({ type: "end" });
    await deleteSession(gatewayOf(session, this.gatewayUrl), session);
    this.finish("ended");
  }

  /** Send a typed message; false when not connected. */
  send(text) {
    const t = String(text || "").trim();
    return Boolean(t) && Boolean(this.socket?.send({ type: "text", text: t }));
  }

  /** Stop the avatar talking now. */
  interrupt() {
    this.player?.stop();
    return Boolean(this.socket?.send({ type: "interrupt" }));
  }

  setMuted(muted) {
    this.muted = Boolean(muted);
    this.ui.mute.setAttribute("aria-pressed", String(this.muted));
    this.ui.mute.textContent = this.muted ? "Unmute" : "Mute";
  }

  get gatewayUrl() {
    const attr = this.getAttribute("gateway");
    return attr ? new URL(attr.endsWith("/") ? attr : `${attr}/`, location.href) : SCRIPT_BASE;
  }

  sessionOptions() {
    const options = {};
    for (const [attr, field] of Object.entries(OPTION_ATTRIBUTES)) {
      const value = this.getAttribute(attr);
      if (value) options[field] = value;
    }
    return options;
  }

  // -------------------------------------------------------------- server events

  onEvent(event) {
    this.eventsSeen++;
    this.emit("event", event);
    switch (event.type) {
      case "session.ready":
        this.onReady(event);
        break;
      case "transcript.interim":
      case "transcript.final":
        this.emit("transcript", {
          utterance_id: event.utterance_id,
          text: event.text,
          final: event.type === "transcript.final",
        });
        if (this.hasAttribute("captions")) this.caption(event.text, "user");
        break;
      case "transcript.ignored":
        this.emit("transcript", { utterance_id: event.utterance_id, text: "", final: true, ignored: event.reason });
        break;
      case "avatar.reply":
        this.emit("reply", { reply_id: event.reply_id, turn_id: event.turn_id, text: event.text,
                             replaces: event.replaces ?? null });
        if (this.hasAttribute("captions")) this.caption(event.text, "avatar");
        break;
      case "avatar.started_talking":
        this.cloudSpeaking = true;
        break;
      case "avatar.paused":
        this.player?.pause();
        break;
      case "avatar.resumed":
        this.player?.resume();
        break;
      case "avatar.stopped_talking":
        this.cloudSpeaking = false;
        this.player?.resume();
        if (event.interrupted) {
          this.player?.stop(event.reply_id);
          this.voice.stop(event.reply_id);
        }
        break;
      case "error":
        this.emitError(event.code, event.message, event.fatal);
        if (event.fatal) {
          const session = this.session;
          this.finish("error");
          if (session) deleteSession(gatewayOf(session, this.gatewayUrl), session);
        }
        break;
      case "session.ended":
        this.emit("ended", { reason: event.reason });
        this.finish(this._state === "error" ? "error" : "ended");
        break;
      default:
        break;
    }
  }

  onReady(event) {
    this.provider = event.provider || "";
    this.dataset.provider = this.provider;
    const lk = event.livekit;
    if (lk?.url && event.provider === "local") {
      this.showView("face");
      this.voice.connect(lk.url, lk.token);
    } else if (lk?.url) {
      this.showView("video");
      this.cloudActive = true;
      this.cloud.connect(lk.url, lk.token, lk.avatar_identity);
    } else {
      this.showView("face");
      this.voice.disconnect();
    }
    this.emit("ready", { session_id: this.sessionId, provider: this.provider, stt_provider: event.stt_provider ?? null });
    if (this.socket?.isOpen) this.setState("live");
  }

  onAudio(meta, pcm) {
    if (this.cloudActive) return;
    this.player?.enqueue(meta, pcm);
  }

  onSocketStatus(status, detail = {}) {
    if (status === "open") {
      this.setState(this.provider ? "live" : "connecting");
    } else if (status === "reconnecting") {
      this.setState("reconnecting");
    } else if (!this.ending) {
      if (detail.reason !== "ended") {
        this.emitError(detail.reason || "connection_lost", `The connection closed (${detail.code}).`, true);
      }
      this.finish(detail.reason === "ended" ? "ended" : "error");
    }
  }

  // -------------------------------------------------------------- state, view

  finish(state) {
    this.player?.stop();
    this.socket?.close();
    this.socket = null;
    this.session = null;
    this.cloudActive = false;
    this.cloudSpeaking = false;
    this.mic.stop();
    this.cloud.disconnect();
    this.voice.disconnect();
    this.ui.mute.hidden = true;
    this.setState(state);
  }

  setState(state) {
    if (state === this._state) return;
    const previous = this._state;
    this._state = state;
    this.dataset.state = state;
    const active = ACTIVE.has(state);
    this.ui.start.hidden = active;
    this.ui.stop.hidden = !active;
    this.ui.start.textContent = state === "idle" ? "Start conversation" : "Start again";
    this.emit("state", { state, previous });
  }

  showView(view) {
    this.ui.frame.dataset.view = view;
    this.ui.face.toggleAttribute("hidden", view !== "face");
    this.ui.video.hidden = view !== "video";
  }

  caption(text, who = "") {
    this.ui.caption.textContent = text || "";
    this.ui.caption.dataset.who = who;
    this.ui.caption.hidden = !text;
  }

  hideNotice() {
    this.ui.notice.hidden = true;
  }

  emitError(code, message, fatal) {
    this.ui.notice.textContent = message || code;
    this.ui.notice.dataset.code = code;
    this.ui.notice.hidden = false;
    this.emit("error", { code, message, fatal: Boolean(fatal) });
  }

  emit(name, detail) {
    this.dispatchEvent(new CustomEvent(`avatar-stack:${name}`, { detail, bubbles: true, composed: true }));
  }

  frame(now) {
    this.raf = requestAnimationFrame(this.frame);
    if (this.cloudActive) {
      this.setSpeaking(this.cloudSpeaking);
      return;
    }
    const voice = this.voice.active ? this.voice : this.player;
    if (!voice) return;
    if (this.voice.active) this.voice.tick(now);
    this.face.tick(now, voice.mouthNow());
    const level = voice.level();
    if (level > this.maxPlaybackLevel) this.maxPlaybackLevel = level;
    this.setSpeaking(Boolean(voice.playing));
  }

  setSpeaking(speaking) {
    if (speaking === this.speaking) return;
    this.speaking = speaking;
    this.dataset.speaking = String(speaking);
    this.emit("speaking", { speaking });
  }
}

/** The gateway a session belongs to, from its ws_url (wss://host/prefix/v1/sessions/{sid}/ws). */
function gatewayOf(session, fallback) {
  try {
    const url = new URL(session.ws_url);
    url.protocol = url.protocol === "wss:" ? "https:" : "http:";
    const at = url.pathname.indexOf("/v1/sessions/");
    url.pathname = at >= 0 ? url.pathname.slice(0, at + 1) : "/";
    url.search = "";
    return url;
  } catch {
    return fallback;
  }
}

if (!customElements.get(TAG)) customElements.define(TAG, AvatarStackAvatar);

// Avatar Stack page: creates a session, streams the microphone, shows the live transcript and
// the avatar's replies, plays the local avatar (face + voice) or joins a cloud avatar's LiveKit
// room, and survives dropped connections. No framework. Message shapes: common/models.py.
//
// Test-observable state: <body data-state data-avatar-speaking data-provider data-session-id
// data-muted data-audio-level>, #transcript li[data-final] / li.avatar[data-reply-id], and
// window.__avatarStack (handleEvent, ws, counters, timings, latency).

import { MicCapture, listMicrophones, micErrorMessage } from "./capture.js";
import { CloudAvatar } from "./cloud.js";
import { SessionSocket } from "./connection.js";
import { Face } from "./face.js";
import { LatencyPanel, LatencyTracker } from "./latency.js";
import { LiveKitVoice } from "./livekit-voice.js";
import { SpeechPlayer } from "./player.js";
import { createSession as createSessionAt, deleteSession as deleteSessionAt } from "./sessions.js";

const $ = (id) => document.getElementById(id);
const ui = {
  body: document.body,
  status: $("status-text"),
  banners: $("banners"),
  frame: $("avatar-frame"),
  face: $("face"),
  video: $("avatar-video"),
  videoStatus: $("video-status"),
  turn: $("turn-state"),
  audio: $("avatar-audio"),
  start: $("start-btn"),
  end: $("end-btn"),
  mute: $("mute-btn"),
  interrupt: $("interrupt-btn"),
  micSelect: $("mic-select"),
  micLevel: $("mic-level"),
  micFill: document.querySelector("#mic-level .meter-fill"),
  transcript: $("transcript"),
  emptyHint: $("empty-hint"),
  composer: $("composer"),
  input: $("composer-input"),
  send: $("send-btn"),
  detail: {
    session: $("detail-session"),
    provider: $("detail-provider"),
    stt: $("detail-stt"),
    reconnects: $("detail-reconnects"),
    latency: $("detail-latency"),
  },
};

const STATE_LABELS = {
  idle: "Ready",
  connecting: "Connecting…",
  live: "Live",
  reconnecting: "Reconnecting…",
  ended: "Conversation ended",
  error: "Something went wrong",
};
const MAX_TRANSCRIPT_ITEMS = 300;
const VOICE_RMS = 0.01; // mic frames louder than this (≈ −40 dBFS) count as the user speaking
const SILENT_FRAME = new ArrayBuffer(640); // sent while muted, so speech recognition sees silence

const player = new SpeechPlayer({ loopback: !/^(0|false|off)$/.test(new URLSearchParams(location.search).get("loopback") || "") });
const mic = new MicCapture({ onFrame });
const face = new Face(ui.face);
// The local avatar's voice when the server put it in a LiveKit room (session.ready.livekit, provider local).
const lkVoice = new LiveKitVoice({ onReplyHeard: (id, at) => player.onReplyHeard?.(id, at) });
const cloud = new CloudAvatar({
  video: ui.video,
  audio: ui.audio,
  onVendorEvent: relayVendorEvent,
  onState: onCloudState,
});

// Latency breakdown per reply for the footer's "Latency" panel; `?debug=1` opens it on load.
const breakdown = new LatencyTracker({ onChange: () => latencyPanel.render() });
const latencyPanel = new LatencyPanel($("latency"), breakdown);
if (/^(1|true|on)$/.test(new URLSearchParams(location.search).get("debug") || "")) $("latency").open = true;

const app = {
  state: "idle",
  session: null, // {session_id, token, ws_url}
  socket: null,
  ready: false, // session.ready seen for this session
  provider: "",
  muted: false,
  ending: false,
  attempt: 0, // counts session starts and finishes, so late async work can tell it is stale
  cloudSpeaking: false, // the server or vendor says the avatar talks (cloud avatars: no local audio)
  speaking: false,
  micLevel: 0,
  lastVoiceAt: 0, // performance.now() of the last mic frame with speech in it
  voiceStartAt: 0, // performance.now() when the user last started speaking after a pause
  bargeIns: [], // per interrupted reply: how long after the user's voice onset the page went quiet
  lastTypedAt: 0,
  lastFinalAt: 0, // performance.now() of the last transcript.final
  replyAt: new Map(), // reply_id → performance.now() its text arrived
  lastHeardAt: 0,
  timings: [], // per reply: {reply_id, source, latency_ms, final_ms, reply_ms, audio_ms}
  lastPlaybackLevel: 0,
  maxPlaybackLevel: 0,
  livekit: null, // {url, token, state, error}
  thinkingFor: null, // utterance id (or "typed") the avatar is about to answer
  thinkingTimer: 0,
  avatarPaused: false, // the server paused the avatar's voice while the user talks over it
};

// ------------------------------------------------------------------------------------ state

function setState(state) {
  app.state = state;
  ui.body.dataset.state = state;
  let label = STATE_LABELS[state];
  if (state === "connecting" && app.socket?.isOpen) label = "Starting the avatar…";
  ui.status.textContent = label;
  const active = isActive();
  const hadFocus = document.activeElement;
  ui.start.hidden = active;
  ui.end.hidden = !active;
  ui.start.textContent = state === "idle" ? "Start conversation" : "Start a new conversation";
  ui.mute.disabled = !active || !mic.running;
  ui.interrupt.disabled = state !== "live";
  const canType = active && Boolean(app.socket?.isOpen);
  ui.input.disabled = !canType;
  ui.send.disabled = !canType;
  ui.input.placeholder = canType ? "Type a message" : "Start a conversation to type a message";
  // Keep keyboard focus on the Start/End slot when one replaces the other.
  if (hadFocus === ui.start && ui.start.hidden) ui.end.focus();
  else if (hadFocus === ui.end && ui.end.hidden) ui.start.focus();
}

function isActive() {
  return app.state === "connecting" || app.state === "live" || app.state === "reconnecting";
}

// ------------------------------------------------------------------------------------ session

async function startSession() {
  if (isActive()) return;
  clearBanners();
  clearConversation();
  app.ready = false;
  app.ending = false;
  app.provider = "";
  app.cloudSpeaking = false;
  ui.body.dataset.provider = "";
  showView("face");
  setState("connecting");
  const attempt = ++app.attempt;
  // Inside the click: audio contexts created here are allowed to play (autoplay policy).
  player.prepare();
  let micStarting = Promise.resolve(false);
  if (navigator.mediaDevices?.getUserMedia) {
    mic.prepare();
    micStarting = mic.start(ui.micSelect.value).then(
      () => {
        if (attempt === app.attempt) return true;
        if (!isActive()) mic.stop(); // the session failed or ended while the microphone was opening
        return false;
      },
      (err) => {
        showBanner("mic_denied", micErrorMessage(err));
        return false;
      },
    );
  } else {
    showBanner("mic_denied", micErrorMessage(null));
  }

  let created;
  try {
    created = await createSession();
  } catch (err) {
    showBanner(err.code || "session_failed", err.message);
    finish("error");
    return;
  }
  app.session = created;
  ui.body.dataset.sessionId = created.session_id;
  ui.detail.session.textContent = created.session_id;
  ui.detail.reconnects.textContent = "0";
  app.socket = new SessionSocket({
    wsUrl: created.ws_url,
    token: created.token,
    onEvent: handleEvent,
    onAudio,
    onStatus: onSocketStatus,
  });
  app.socket.connect();
  if (await micStarting) {
    setState(app.state); // mute becomes available
    refreshMicList();
  }
}

/** Optional choices from the page's address: ?avatar_id=…&voice_id=…&language=… */
function sessionOptions() {
  const query = new URLSearchParams(location.search);
  const options = {};
  for (const key of ["avatar_id", "voice_id", "language"]) {
    const value = query.get(key);
    if (value) options[key] = value;
  }
  return options;
}

function createSession() {
  // The page is served by the gateway: its API (or, on a keyed gateway, its demo mode) is here.
  return createSessionAt({ gateway: new URL(".", location.href), options: sessionOptions() });
}

async function endSession() {
  const session = app.session;
  if (!session) return;
  app.ending = true;
  app.socket?.send({ type: "end" });
  await deleteSession(session);
  finish("ended");
}

function deleteSession(session, keepalive = false) {
  return deleteSessionAt(new URL(".", location.href), session, keepalive);
}

/** Release everything the session held; `state` is "ended" or "error". */
function finish(state) {
  app.attempt++; // a microphone still opening for this session closes itself
  player.stop();
  app.socket?.close();
  app.socket = null;
  app.session = null;
  app.cloudSpeaking = false;
  app.micLevel = 0;
  mic.stop();
  cloud.disconnect();
  lkVoice.disconnect();
  setState(state);
}

// ------------------------------------------------------------------------------------ socket

function onSocketStatus(status, detail = {}) {
  if (status === "open") {
    removeBanner("connection_lost");
    if (detail.resumed) {
      ui.detail.reconnects.textContent = String(app.socket?.reconnects ?? 0);
      showBanner("reconnected", "Connection restored. The conversation continues.", { level: "info", timeoutMs: 4000 });
    }
    setState(app.ready ? "live" : "connecting");
    return;
  }
  if (status === "reconnecting") {
    showBanner("connection_lost", "Connection lost. Reconnecting…", { level: "warning", dismissible: false });
    setState("reconnecting");
    return;
  }
  // closed
  if (app.ending) return;
  removeBanner("connection_lost");
  switch (detail.reason) {
    case "ended":
      finish(app.state === "error" ? "error" : "ended");
      return;
    case "bad_token":
    case "unknown_session":
      showBanner(detail.reason, "This conversation is no longer available. Start a new one.");
      break;
    case "origin_not_allowed":
      showBanner(detail.reason, "This page's address is not allowed to connect to the server (ALLOWED_ORIGINS).");
      break;
    case "connection_lost":
      showBanner("connection_lost", "Connection lost. The conversation could not be resumed; start a new one.");
      break;
    default:
      showBanner(detail.reason || "connection_lost", `The server closed the connection (${detail.code}).`);
  }
  finish("error");
}

/** Handle one event from the server (also the test hook: window.__avatarStack.handleEvent). */
function handleEvent(event) {
  switch (event.type) {
    case "session.ready":
      onReady(event);
      break;
    case "transcript.interim":
      upsertUtterance(event.utterance_id, event.text, false);
      break;
    case "transcript.final": {
      app.lastFinalAt = performance.now();
      // End of speech: where the server's VAD ended it, on this page's clock (else the last loud frame).
      const vadEnd = app.socket?.captureTimeOf(event.end_s) ?? null;
      breakdown.final(event, app.lastFinalAt, vadEnd ?? app.lastVoiceAt, vadEnd != null ? "vad" : "level");
      upsertUtterance(event.utterance_id, event.text, true);
      setThinking(event.utterance_id);
      break;
    }
    case "transcript.ignored": {
      // The avatar's own voice heard back (echo) or a "mhm" said over it: not a turn.
      const li = findItem("data-utterance-id", event.utterance_id);
      if (li && event.reason === "echo") li.remove();
      else if (li) li.dataset.ignored = event.reason;
      if (app.thinkingFor === event.utterance_id) setThinking(null);
      break;
    }
    case "avatar.paused":
      player.pause(); // the user started talking over it: quiet now, resume if it was nothing
      app.avatarPaused = true;
      noteBargeIn(event.reply_id);
      markReply(event.reply_id, "paused", "true");
      updateTurnState();
      break;
    case "avatar.resumed":
      player.resume();
      app.avatarPaused = false;
      markReply(event.reply_id, "paused", "false");
      updateTurnState();
      break;
    case "avatar.reply":
      if (!app.replyAt.has(event.reply_id)) app.replyAt.set(event.reply_id, performance.now());
      if (app.replyAt.size > 64) app.replyAt.delete(app.replyAt.keys().next().value);
      breakdown.reply(event, performance.now());
      // The user went on with the turn the avatar had begun to answer: that answer is gone.
      if (event.replaces) findItem("data-reply-id", event.replaces)?.remove();
      upsertReply(event.reply_id, event.text);
      break;
    case "avatar.started_talking":
      app.cloudSpeaking = true;
      setThinking(null);
      if (app.livekit) breakdown.audio(event.reply_id, event.ts, performance.now(), "cloud"); // local: first chunk
      else if (lkVoice.active) breakdown.audio(event.reply_id, event.ts, performance.now(), "local");
      markReply(event.reply_id, "speaking", "true");
      break;
    case "avatar.stopped_talking":
      app.cloudSpeaking = false;
      if (app.avatarPaused) player.resume(); // a later reply must play
      app.avatarPaused = false;
      markReply(event.reply_id, "speaking", "false");
      if (event.interrupted) {
        player.stop(event.reply_id); // barge-in: silence it now, drop its queued chunks
        lkVoice.stop(event.reply_id);
        markReply(event.reply_id, "interrupted", "true");
        noteBargeIn(event.reply_id);
      }
      break;
    case "avatar.audio":
      break; // arrives through onAudio together with its binary frame
    case "error":
      showBanner(event.code, event.message, { level: event.fatal ? "error" : "warning" });
      if (event.fatal) {
        // The session cannot go on: make sure the server lets go of it too, then tidy up.
        const session = app.session;
        finish("error");
        if (session) deleteSession(session);
      }
      break;
    case "session.ended":
      app.ending = false;
      if (event.reason && event.reason !== "user_ended" && event.reason !== "deleted") {
        showBanner("session_ended", endedMessage(event.reason), { level: "info" });
      }
      finish(app.state === "error" ? "error" : "ended");
      break;
    default:
      break; // newer servers may send more: ignore what we do not know
  }
}

/** How long after the user's voice onset the avatar went quiet (paused or cut), once per reply. */
function noteBargeIn(replyId) {
  if (app.bargeIns.some((b) => b.reply_id === replyId)) return;
  app.bargeIns.push({ reply_id: replyId, after_voice_onset_ms: Math.round(performance.now() - app.voiceStartAt) });
  if (app.bargeIns.length > 100) app.bargeIns.shift();
}

function onReady(event) {
  app.ready = true;
  app.provider = event.provider || "";
  ui.body.dataset.provider = app.provider;
  ui.detail.provider.textContent = app.provider || "–";
  ui.detail.stt.textContent = event.stt_provider || "–";
  if (event.livekit?.url && event.provider === "local") {
    showView("face"); // the local face, its voice a track in the session's LiveKit room
    lkVoice.connect(event.livekit.url, event.livekit.token);
  } else if (event.livekit?.url) {
    showView("video");
    app.livekit = { url: event.livekit.url, token: event.livekit.token, state: "connecting", error: null };
    ui.frame.dataset.livekitUrl = event.livekit.url;
    cloud.connect(event.livekit.url, event.livekit.token, event.livekit.avatar_identity);
  } else {
    showView("face");
    lkVoice.disconnect(); // a new owner could not join LiveKit: the voice comes down the socket
  }
  if (app.socket?.isOpen) setState("live");
}

function onAudio(meta, pcm) {
  if (app.livekit) return; // cloud avatars speak through LiveKit
  breakdown.audio(meta.reply_id, meta.ts, performance.now(), "local");
  player.enqueue(meta, pcm);
}

function endedMessage(reason) {
  if (/idle/.test(reason)) return "The conversation ended after a period of silence.";
  if (/max_duration/.test(reason)) return "The conversation reached its time limit.";
  if (/fail/.test(reason)) return "The conversation ended because a service failed.";
  if (/disconnect|grace|left/.test(reason)) return "The conversation ended because the connection was lost.";
  return `The conversation ended (${reason}).`;
}

// ------------------------------------------------------------------------------------ cloud

function showView(view) {
  ui.frame.dataset.view = view;
  ui.face.toggleAttribute("hidden", view !== "face");
  ui.video.hidden = view !== "video";
  ui.videoStatus.hidden = true;
  if (view === "face") {
    delete ui.frame.dataset.livekitUrl;
    delete ui.frame.dataset.livekitState;
    app.livekit = null;
  }
}

const VIDEO_STATUS = {
  connecting: "Connecting to the avatar…",
  reconnecting: "Reconnecting to the avatar…",
  disconnected: "The avatar's video has ended.",
  failed: "The avatar's video is unavailable.",
};

function onCloudState(state, err) {
  if (app.livekit) {
    app.livekit.state = state;
    app.livekit.error = err ? String(err.message || err) : null;
  }
  ui.frame.dataset.livekitState = state;
  ui.videoStatus.textContent = VIDEO_STATUS[state] || "";
  ui.videoStatus.hidden = !VIDEO_STATUS[state];
  if (state === "failed") {
    showBanner("avatar_video_failed", `The avatar's video could not be connected: ${err?.message || err}`);
  } else if (state === "connected") {
    removeBanner("avatar_video_failed");
  }
}

function relayVendorEvent(type, data) {
  if (type === "avatar_start_talking") app.cloudSpeaking = true;
  else if (type === "avatar_stop_talking") app.cloudSpeaking = false;
  app.socket?.send({ ...data, type: "avatar.event", event: type });
}

// ------------------------------------------------------------------------------------ mic

function onFrame(pcm, level) {
  app.micLevel = app.muted ? 0 : level;
  if (!app.muted && level > VOICE_RMS) {
    const now = performance.now();
    if (now - app.lastVoiceAt > 300) app.voiceStartAt = now; // onset after a pause
    app.lastVoiceAt = now;
  }
  app.socket?.sendAudio(app.muted ? SILENT_FRAME : pcm);
}

function toggleMute() {
  app.muted = !app.muted;
  ui.mute.setAttribute("aria-pressed", String(app.muted));
  ui.mute.textContent = app.muted ? "Unmute" : "Mute";
  ui.body.dataset.muted = String(app.muted);
}

async function refreshMicList() {
  let mics;
  try {
    mics = await listMicrophones();
  } catch {
    return;
  }
  const current = mic.deviceId || ui.micSelect.value;
  ui.micSelect.replaceChildren(new Option("Default microphone", ""));
  mics.forEach((d, i) => {
    if (d.deviceId === "default") return;
    ui.micSelect.append(new Option(d.label || `Microphone ${i + 1}`, d.deviceId));
  });
  if ([...ui.micSelect.options].some((o) => o.value === current)) ui.micSelect.value = current;
}

async function onMicChosen() {
  if (!mic.running) return;
  try {
    await mic.start(ui.micSelect.value);
    removeBanner("mic_denied");
  } catch (err) {
    showBanner("mic_denied", micErrorMessage(err));
  }
}

// ------------------------------------------------------------------------------------ transcript

function clearConversation() {
  ui.transcript.replaceChildren();
  ui.emptyHint.hidden = false;
  ui.detail.latency.textContent = "–";
  breakdown.reset();
}

function addMessage(role) {
  const li = document.createElement("li");
  li.className = `msg ${role}`;
  const who = document.createElement("span");
  who.className = "who";
  who.textContent = role === "user" ? "You" : "Avatar";
  const text = document.createElement("p");
  text.className = "text";
  li.append(who, text);
  const stick = isScrolledToEnd();
  ui.transcript.append(li);
  while (ui.transcript.children.length > MAX_TRANSCRIPT_ITEMS) ui.transcript.firstElementChild.remove();
  ui.emptyHint.hidden = true;
  if (stick) scrollToEnd();
  return li;
}

function findItem(attr, id) {
  return ui.transcript.querySelector(`li[${attr}="${CSS.escape(String(id))}"]`);
}

function upsertUtterance(id, text, final) {
  text = (text || "").trim();
  let li = findItem("data-utterance-id", id);
  if (!li) {
    if (!text) return;
    li = addMessage("user");
    li.dataset.utteranceId = id;
    li.dataset.source = "voice";
  } else if (li.dataset.final === "true" && !final) {
    return; // a late interim never replaces the final text
  }
  if (final && !text) {
    li.remove(); // the recogniser decided it was not speech
    return;
  }
  const stick = isScrolledToEnd();
  li.querySelector(".text").textContent = text;
  li.dataset.final = String(final);
  // Screen readers hear the final text once, not every provisional guess.
  if (final) li.removeAttribute("aria-hidden");
  else li.setAttribute("aria-hidden", "true");
  if (stick) scrollToEnd();
}

function upsertReply(replyId, text) {
  text = (text || "").trim();
  let li = findItem("data-reply-id", replyId);
  if (!li) {
    li = addMessage("avatar");
    li.dataset.replyId = replyId;
  }
  const p = li.querySelector(".text");
  const old = p.textContent;
  // A reply may come whole, growing (each event repeats what came before) or in pieces.
  p.textContent = !old || text.startsWith(old) ? text : old.endsWith(text) ? old : `${old} ${text}`;
  if (isScrolledToEnd(80)) scrollToEnd();
}

function markReply(replyId, key, value) {
  const li = findItem("data-reply-id", replyId);
  if (li) li.dataset[key] = value;
}

function isScrolledToEnd(slack = 48) {
  const t = ui.transcript;
  return t.scrollHeight - t.scrollTop - t.clientHeight <= slack;
}

function scrollToEnd() {
  ui.transcript.scrollTop = ui.transcript.scrollHeight;
}

function sendTyped(e) {
  e.preventDefault();
  const text = ui.input.value.trim();
  if (!text) return;
  if (!app.socket?.send({ type: "text", text })) {
    showBanner("not_connected", "Not connected right now; your message was not sent.", { level: "warning", timeoutMs: 5000 });
    return;
  }
  app.lastTypedAt = performance.now();
  breakdown.typed(app.lastTypedAt);
  const li = addMessage("user");
  li.dataset.source = "text";
  li.dataset.final = "true";
  li.querySelector(".text").textContent = text;
  scrollToEnd();
  ui.input.value = "";
  setThinking("typed");
}

function interrupt() {
  player.stop();
  app.socket?.send({ type: "interrupt" });
}

// ------------------------------------------------------------------------------------ banners

const BANNER_TITLES = [
  [/capacity|busy|concurren|quota/, "All avatars are busy"],
  [/key|auth|credential|unauthori|config/, "Not configured"],
  [/mic|microphone/, "Microphone unavailable"],
  [/origin/, "Not allowed from this page"],
  [/connection|not_connected|network/, "Connection"],
  [/reconnected/, "Back online"],
  [/video|livekit/, "Avatar video"],
  [/ended/, "Conversation ended"],
];

/**
 * Show (or update) the banner for `code`. Levels: error (default), warning, info.
 * One banner per code, so a repeating problem does not stack up.
 */
function showBanner(code, message, { level = "error", dismissible = true, timeoutMs = 0 } = {}) {
  code = String(code || "error");
  let banner = ui.banners.querySelector(`[data-code="${CSS.escape(code)}"]`);
  if (!banner) {
    banner = document.createElement("div");
    banner.dataset.code = code;
    const body = document.createElement("div");
    body.className = "banner-body";
    const title = document.createElement("strong");
    title.className = "banner-title";
    const text = document.createElement("span");
    text.className = "banner-text";
    body.append(title, text);
    banner.append(body);
    ui.banners.append(banner);
  }
  banner.className = `banner banner-${level}`;
  banner.setAttribute("role", level === "info" ? "status" : "alert");
  const title = BANNER_TITLES.find(([re]) => re.test(code))?.[1] || (level === "error" ? "Something went wrong" : "Note");
  banner.querySelector(".banner-title").textContent = title;
  banner.querySelector(".banner-text").textContent = message || code;
  banner.querySelector(".banner-close")?.remove();
  if (dismissible) {
    const close = document.createElement("button");
    close.type = "button";
    close.className = "banner-close";
    close.setAttribute("aria-label", `Dismiss: ${title}`);
    close.textContent = "×";
    close.addEventListener("click", () => banner.remove());
    banner.append(close);
  }
  clearTimeout(banner._timer);
  if (timeoutMs) banner._timer = setTimeout(() => banner.remove(), timeoutMs);
  return banner;
}

function removeBanner(code) {
  ui.banners.querySelector(`[data-code="${CSS.escape(code)}"]`)?.remove();
}

function clearBanners() {
  ui.banners.replaceChildren();
}

// ------------------------------------------------------------------------------------ timing

player.onReplyHeard = (replyId, heardAt) => {
  breakdown.heard(replyId, heardAt);
  // Response time: from the end of the user's speech (or the typed message) to the avatar's
  // first audio reaching the speakers.
  const voice = app.lastVoiceAt > app.lastHeardAt && app.lastVoiceAt > app.lastTypedAt;
  const since = voice ? app.lastVoiceAt : app.lastTypedAt;
  app.lastHeardAt = heardAt;
  if (!since) return;
  const latency = Math.round(heardAt - since);
  const after = (t) => (t >= since ? Math.round(t - since) : null);
  app.timings.push({
    reply_id: replyId,
    source: voice ? "voice" : "text",
    latency_ms: latency, // until the first audio is heard
    final_ms: voice ? after(app.lastFinalAt) : null, // until the final transcript arrived
    reply_ms: after(app.replyAt.get(replyId) ?? 0), // until the reply text arrived
    audio_ms: after(performance.now()), // until its first audio chunk arrived
  });
  if (app.timings.length > 100) app.timings.shift();
  ui.detail.latency.textContent = `${(latency / 1000).toFixed(2)} s after you ${voice ? "stopped speaking" : "sent"}`;
};

// ------------------------------------------------------------------------------------ turn state

const TURN_LABELS = { listening: "Listening", thinking: "Thinking…", speaking: "Speaking" };

/** The turn the page waits on an answer for (null: none); "thinking" until the avatar talks. */
function setThinking(utteranceId) {
  app.thinkingFor = utteranceId;
  clearTimeout(app.thinkingTimer);
  // A turn that gets no answer (the server judged it, the avatar failed) must not think forever.
  if (utteranceId) app.thinkingTimer = setTimeout(() => setThinking(null), 15000);
  updateTurnState();
}

/** listening / thinking / speaking, on <body data-turn> and in the status line under the avatar. */
function updateTurnState() {
  const live = app.ready && app.state !== "ended" && app.state !== "error"; // session.ready seen
  let turn = "";
  if (live) turn = app.speaking && !app.avatarPaused ? "speaking" : app.thinkingFor ? "thinking" : "listening";
  if (ui.body.dataset.turn === turn) return;
  ui.body.dataset.turn = turn;
  ui.turn.textContent = TURN_LABELS[turn] || "";
  ui.turn.hidden = !turn;
}

// ------------------------------------------------------------------------------------ animation

function frame(now) {
  const local = !app.livekit;
  const voice = lkVoice.active ? lkVoice : player; // the same face, its voice from LiveKit or the socket
  const speaking = local ? voice.playing : app.cloudSpeaking;
  if (speaking !== app.speaking) {
    app.speaking = speaking;
    ui.body.dataset.avatarSpeaking = String(speaking);
  }
  updateTurnState();
  if (local) {
    if (lkVoice.active) lkVoice.tick(now);
    face.tick(now, voice.mouthNow());
    const level = voice.level();
    app.lastPlaybackLevel = level;
    if (level > app.maxPlaybackLevel) app.maxPlaybackLevel = level;
    const shown = level.toFixed(3);
    if (ui.body.dataset.audioLevel !== shown) ui.body.dataset.audioLevel = shown;
  }
  // Mic meter on a dB scale: −60 dBFS empty, 0 dBFS full.
  const pct = app.micLevel > 0 ? Math.max(0, Math.min(100, ((20 * Math.log10(app.micLevel) + 60) / 60) * 100)) : 0;
  ui.micFill.style.transform = `scaleX(${pct / 100})`;
  const rounded = String(Math.round(pct / 5) * 5);
  if (ui.micLevel.getAttribute("aria-valuenow") !== rounded) ui.micLevel.setAttribute("aria-valuenow", rounded);
  requestAnimationFrame(frame);
}

// ------------------------------------------------------------------------------------ wiring

ui.start.addEventListener("click", startSession);
ui.end.addEventListener("click", endSession);
ui.mute.addEventListener("click", toggleMute);
ui.interrupt.addEventListener("click", interrupt);
ui.composer.addEventListener("submit", sendTyped);
ui.micSelect.addEventListener("change", onMicChosen);
navigator.mediaDevices?.addEventListener?.("devicechange", refreshMicList);
window.addEventListener("keydown", (e) => {
  // Escape interrupts the avatar while it talks (the button does the same).
  if (e.key === "Escape" && app.state === "live" && app.speaking) interrupt();
});
window.addEventListener("pagehide", () => {
  // Leaving the page ends the session now rather than after the server's grace period.
  if (!app.session) return;
  app.ending = true;
  app.socket?.send({ type: "end" });
  deleteSession(app.session, true);
});

refreshMicList();
setState("idle");
requestAnimationFrame(frame);

window.__avatarStack = {
  handleEvent,
  handleAudio: onAudio, // (avatar.audio event, ArrayBuffer of PCM16): as if it came from the socket
  get ws() {
    return app.socket?.ws ?? null;
  },
  get socket() {
    return app.socket;
  },
  get state() {
    return app.state;
  },
  get sessionId() {
    return app.session?.session_id ?? null;
  },
  get provider() {
    return app.provider;
  },
  get audioChunksReceived() {
    return player.stats.chunksReceived;
  },
  get audioChunksPlayed() {
    return player.stats.chunksPlayed;
  },
  get audioChunksDropped() {
    return player.stats.chunksDropped;
  },
  get lastPlaybackLevel() {
    return app.lastPlaybackLevel;
  },
  get maxPlaybackLevel() {
    return app.maxPlaybackLevel;
  },
  get mouthOpen() {
    return face.open;
  },
  get lastVoiceAt() {
    return app.lastVoiceAt;
  },
  get firstHeard() {
    return Object.fromEntries(player.firstHeard);
  },
  get timings() {
    return app.timings.slice();
  },
  get bargeIns() {
    return app.bargeIns.slice();
  },
  get latency() {
    return breakdown.snapshot(); // the Latency panel's numbers: {last, median, count, replies}
  },
  get livekit() {
    return app.livekit && { ...app.livekit, connectAttempts: cloud.connectAttempts, eventsRelayed: cloud.eventsRelayed, eventsReceived: cloud.eventsReceived };
  },
  get turnState() {
    return ui.body.dataset.turn || "";
  },
  get audioOutput() {
    return player.output; // "loopback" (echo-cancelled WebRTC path) or "direct"
  },
  get livekitVoice() {
    return { active: lkVoice.active, state: lkVoice.state, ...lkVoice.stats };
  },
  voiceRoom: () => lkVoice.room, // tests: try to publish with the page's token
  voiceStats: () => lkVoice.receiverStats(),
  get framesSent() {
    return app.socket?.framesSent ?? 0;
  },
};

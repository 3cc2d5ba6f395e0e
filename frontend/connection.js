// The session WebSocket: events down (JSON, and the binary audio frame that follows each
// `avatar.audio`), audio and JSON up. A dropped connection is reopened with backoff within the
// grace period, resuming after the last event received (`last_event`) so nothing is lost or
// repeated.

const BACKOFF_MS = [200, 500, 1000, 2000, 3000];
const PING_EVERY_MS = 15000;
const MAX_BUFFERED_BYTES = 256 * 1024; // above this, drop audio rather than queue it (stale speech)
const BACKLOG_FRAMES = 100; // while (re)connecting, keep the last 2 s of speech to send on open
const SENT_HISTORY = 3000; // capture times of the last 60 s of frames sent (for captureTimeOf)
const BYTES_PER_S = 16000 * 2; // PCM16 mono 16 kHz: the server's session audio time

// Close codes after which reconnecting cannot help. Every other code reconnects with
// `last_event` within the grace period: 1006 (network), 1011 (the server's bus failed), 4408 (this
// page read too slowly; the server kept the events).
const FINAL_CLOSES = {
  4401: "bad_token",
  4403: "origin_not_allowed",
  4404: "unknown_session",
};
// The server refused what this page sent (1003: 20 bad frames in a row; 1009: a frame over
// 32 KiB); the session goes on. Reconnect once (a glitch); a second time this page is what is
// broken, so stop instead of looping.
const REFUSED_CLOSES = {
  1003: "bad_frame",
  1009: "frame_too_large",
};

export class SessionSocket {
  /**
   * @param {{wsUrl: string, token: string, graceMs?: number,
   *   onEvent: (e: object) => void, onAudio: (meta: object, pcm: ArrayBuffer) => void,
   *   onStatus: (status: "open"|"reconnecting"|"closed", detail?: object) => void}} opts
   */
  constructor({ wsUrl, token, graceMs = 15000, onEvent, onAudio, onStatus }) {
    this.wsUrl = wsUrl;
    this.token = token;
    this.graceMs = graceMs;
    this.onEvent = onEvent;
    this.onAudio = onAudio;
    this.onStatus = onStatus;
    this.ws = null;
    this.lastEventId = "";
    this.pendingAudio = null; // an `avatar.audio` event waiting for its binary frame
    this.ended = false;
    this.closing = false;
    this.droppedAt = 0; // when the connection was lost, 0 while connected
    this.attempt = 0;
    this.quietCloses = 0; // 1000 closes in a row with no event in between
    this.refusedCloses = 0; // 1003/1009 closes: one reconnect is allowed
    this.retryTimer = 0;
    this.pingTimer = 0;
    this.reconnects = 0;
    this.framesSent = 0;
    this.framesDropped = 0;
    this.backlog = []; // [pcm, capturedAt] captured while not connected, oldest first
    this.bytesSent = 0; // audio bytes sent so far in this session: the server's session time × 32000
    this.sent = []; // [end byte offset, capture time] of the frames sent, oldest first
  }

  /**
   * The page time (performance.now()) at which the audio at session time `seconds` was captured:
   * the server counts a session's audio in seconds of what this page sent, so the frame holding
   * that byte maps the server's VAD times (transcript.final end_s) onto this page's clock.
   * null when that audio was not sent by this page or is too old.
   */
  captureTimeOf(seconds) {
    if (typeof seconds !== "number" || !Number.isFinite(seconds) || !this.sent.length) return null;
    const at = seconds * BYTES_PER_S;
    let lo = 0;
    let hi = this.sent.length - 1;
    if (at > this.sent[hi][0] || at < (this.sent[0][0] - 640)) return null;
    while (lo < hi) {
      const mid = (lo + hi) >> 1;
      if (this.sent[mid][0] < at) lo = mid + 1;
      else hi = mid;
    }
    const [end, capturedAt] = this.sent[lo];
    return capturedAt - ((end - at) / BYTES_PER_S) * 1000; // a frame's capture time is its end
  }

  get isOpen() {
    return this.ws?.readyState === WebSocket.OPEN;
  }

  connect() {
    clearTimeout(this.retryTimer);
    const params = new URLSearchParams({ token: this.token });
    if (this.lastEventId) params.set("last_event", this.lastEventId);
    const sep = this.wsUrl.includes("?") ? "&" : "?";
    const ws = new WebSocket(`${this.wsUrl}${sep}${params}`);
    ws.binaryType = "arraybuffer";
    this.ws = ws;
    this.pendingAudio = null;
    ws.onopen = () => {
      if (ws !== this.ws) return;
      if (this.droppedAt) this.reconnects++;
      this.droppedAt = 0;
      this.attempt = 0;
      clearInterval(this.pingTimer);
      this.pingTimer = setInterval(() => this.send({ type: "ping" }), PING_EVERY_MS);
      const backlog = this.backlog;
      this.backlog = [];
      for (const [pcm, capturedAt] of backlog) this.sendAudio(pcm, capturedAt);
      this.onStatus("open", { resumed: Boolean(this.lastEventId) });
    };
    ws.onmessage = (m) => {
      if (ws === this.ws) this.receive(m.data);
    };
    ws.onclose = (e) => {
      if (ws === this.ws) this.closed(e);
    };
  }

  receive(data) {
    if (typeof data !== "string") {
      const meta = this.pendingAudio;
      this.pendingAudio = null;
      if (!meta) return; // a binary frame always follows its avatar.audio event; ignore strays
      if (meta.id) this.lastEventId = meta.id;
      this.onAudio(meta, data);
      return;
    }
    let event;
    try {
      event = JSON.parse(data);
    } catch {
      return;
    }
    if (!event || typeof event.type !== "string") return;
    this.quietCloses = 0;
    if (event.type === "avatar.audio") {
      // Commit its id only once the audio arrived: a drop in between replays both.
      this.pendingAudio = event;
      return;
    }
    if (event.id) this.lastEventId = event.id;
    if (event.type === "session.ended") this.ended = true;
    this.onEvent(event);
  }

  closed(e) {
    clearInterval(this.pingTimer);
    this.ws = null;
    if (this.closing) return;
    if (this.ended) {
      this.onStatus("closed", { reason: "ended", code: e.code });
      return;
    }
    let final = FINAL_CLOSES[e.code];
    if (REFUSED_CLOSES[e.code] && ++this.refusedCloses > 1) final = REFUSED_CLOSES[e.code];
    if (final) {
      this.onStatus("closed", { reason: final, code: e.code, message: e.reason });
      return;
    }
    if (e.code === 1000 && ++this.quietCloses >= 2) {
      // The server closes normally only when the session is over.
      this.onStatus("closed", { reason: "ended", code: e.code });
      return;
    }
    const now = Date.now();
    if (!this.droppedAt) this.droppedAt = now;
    const left = this.droppedAt + this.graceMs - now;
    if (left <= 0) {
      this.onStatus("closed", { reason: "connection_lost", code: e.code });
      return;
    }
    const delay = Math.min(BACKOFF_MS[Math.min(this.attempt, BACKOFF_MS.length - 1)], left);
    this.attempt++;
    this.onStatus("reconnecting", { attempt: this.attempt, code: e.code, deadline: this.droppedAt + this.graceMs });
    this.retryTimer = setTimeout(() => this.connect(), delay);
  }

  /** Send a JSON message; false when not connected (the caller tells the user). */
  send(message) {
    if (!this.isOpen) return false;
    this.ws.send(JSON.stringify(message));
    return true;
  }

  /**
   * Send one PCM16 frame (`capturedAt`: when the microphone delivered it, page clock). While
   * (re)connecting the last 2 s are kept and sent on open, so the first words are not lost; a
   * backed-up socket drops frames rather than queue stale speech.
   */
  sendAudio(pcm, capturedAt = performance.now()) {
    if (!this.isOpen) {
      if (this.closing) return false;
      this.backlog.push([pcm, capturedAt]);
      if (this.backlog.length > BACKLOG_FRAMES) {
        this.backlog.shift();
        this.framesDropped++;
      }
      return false;
    }
    if (this.ws.bufferedAmount > MAX_BUFFERED_BYTES) {
      this.framesDropped++;
      return false;
    }
    this.ws.send(pcm);
    this.framesSent++;
    this.bytesSent += pcm.byteLength;
    this.sent.push([this.bytesSent, capturedAt]);
    if (this.sent.length > SENT_HISTORY) this.sent.splice(0, this.sent.length - SENT_HISTORY);
    return true;
  }

  /** Close for good (the page is done with this session). */
  close() {
    this.closing = true;
    this.backlog = [];
    clearTimeout(this.retryTimer);
    clearInterval(this.pingTimer);
    if (this.ws && this.ws.readyState <= WebSocket.OPEN) this.ws.close(1000, "client done");
    this.ws = null;
  }
}

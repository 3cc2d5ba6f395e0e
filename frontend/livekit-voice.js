// The local avatar's voice over LiveKit: the avatar worker publishes piper's speech as an audio
// track in the session's room and its mouth envelope on the data channel (topic "avatar.mouth").
// The page joins with a subscribe-only token, plays the track through WebRTC (so Chromium's echo
// canceller hears it as the far end) and draws the face from the envelope, or from the track's
// level when no envelope covers the moment.
//
// Only the avatar's own participant is listened to: tracks and data of anyone else are ignored.

import { loadLivekit } from "./cloud.js";

export const AVATAR_IDENTITY = "avatar-stack-avatar";
const MOUTH_TOPIC = "avatar.mouth";
const HEARD_RMS = 0.005; // the analyser's RMS above which the avatar is audible
const PLAYOUT_LEAD_MS = 60; // jitter buffer + output: how long after its data message a chunk is heard
const MAX_CHUNKS = 64; // mouth envelopes kept (one per TTS chunk)

function roomOf(token) {
  try {
    const body = JSON.parse(atob(token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/")));
    return body?.video?.room || "";
  } catch {
    return "";
  }
}

export class LiveKitVoice {
  /** @param {{onState?: (state: string, err?: Error) => void, onReplyHeard?: (replyId: string, atMs: number) => void}} opts */
  constructor({ onState = () => {}, onReplyHeard = () => {} } = {}) {
    this.onState = onState;
    this.onReplyHeard = onReplyHeard;
    this.room = null;
    this.url = "";
    this.roomName = "";
    this.state = "idle";
    this.track = null;
    this.element = null;
    this.ctx = null;
    this.analyser = null;
    this.buf = null;
    this.chunks = []; // {replyId, start, end, mouth, hopMs} on the performance.now() clock
    this.discarded = new Set();
    this.awaitingHeard = new Set(); // replies whose first audio has not been heard yet
    this.heard = new Set();
    this.stats = { tracks: 0, ignoredTracks: 0, mouthMessages: 0, ignoredData: 0, connects: 0 };
  }

  get active() {
    return this.room !== null;
  }

  /** Join (or stay in) the room of `token`. A takeover's new token for the same room keeps the
   * connection: the new avatar's track simply arrives on it. */
  async connect(url, token) {
    const name = roomOf(token);
    if (this.room && this.url === url && this.roomName === name) return;
    await this.disconnect();
    this.url = url;
    this.roomName = name;
    this.setState("connecting");
    let lk;
    try {
      lk = await loadLivekit();
    } catch (err) {
      this.setState("failed", err);
      return;
    }
    const { Room, RoomEvent, Track } = lk;
    const room = new Room({ adaptiveStream: false, dynacast: false });
    this.room = room;
    room
      .on(RoomEvent.TrackSubscribed, (track, _pub, participant) => {
        if (participant.identity !== AVATAR_IDENTITY || track.kind !== Track.Kind.Audio) {
          this.stats.ignoredTracks++;
          return;
        }
        this.attach(track);
      })
      .on(RoomEvent.TrackUnsubscribed, (track) => {
        if (track === this.track) this.detach();
      })
      .on(RoomEvent.DataReceived, (payload, participant, _kind, topic) => this.onData(payload, participant, topic))
      .on(RoomEvent.Reconnecting, () => this.setState("reconnecting"))
      .on(RoomEvent.Reconnected, () => this.setState("connected"))
      .on(RoomEvent.Disconnected, () => {
        if (this.room === room) this.setState("disconnected");
      });
    this.stats.connects++;
    try {
      await room.connect(url, token, { autoSubscribe: true });
      if (this.room !== room) return;
      await room.startAudio().catch(() => {});
      this.setState("connected");
    } catch (err) {
      if (this.room !== room) return;
      this.room = null;
      this.url = "";
      this.setState("failed", err);
    }
  }

  setState(state, err) {
    this.state = state;
    this.onState(state, err);
  }

  attach(track) {
    this.detach();
    this.track = track;
    this.stats.tracks++;
    this.element = track.attach();
    this.element.hidden = true;
    this.element.dataset.avatarVoice = "livekit";
    document.body.append(this.element);
    if (!this.ctx) {
      this.ctx = new AudioContext();
      this.analyser = this.ctx.createAnalyser();
      this.analyser.fftSize = 1024;
      this.buf = new Float32Array(this.analyser.fftSize);
    }
    this.ctx.resume().catch(() => {});
    this.source = this.ctx.createMediaStreamSource(new MediaStream([track.mediaStreamTrack]));
    this.source.connect(this.analyser); // measured only: the <audio> element plays it
  }

  detach() {
    if (this.source) this.source.disconnect();
    this.source = null;
    if (this.track) this.track.detach();
    if (this.element) this.element.remove();
    this.track = null;
    this.element = null;
  }

  onData(payload, participant, topic) {
    if (topic !== MOUTH_TOPIC || participant?.identity !== AVATAR_IDENTITY) {
      this.stats.ignoredData++;
      return;
    }
    let msg;
    try {
      msg = JSON.parse(new TextDecoder().decode(payload));
    } catch {
      return;
    }
    if (!msg || typeof msg.reply_id !== "string" || this.discarded.has(msg.reply_id)) return;
    this.stats.mouthMessages++;
    const start = performance.now() + (Number(msg.delay_ms) || 0) + PLAYOUT_LEAD_MS;
    const durMs = ((Number(msg.samples) || 0) / (Number(msg.sample_rate) || 16000)) * 1000;
    this.chunks.push({
      replyId: msg.reply_id,
      start,
      end: start + durMs,
      mouth: Array.isArray(msg.mouth) ? msg.mouth : [],
      hopMs: Number(msg.mouth_hop_ms) || 20,
    });
    if (this.chunks.length > MAX_CHUNKS) this.chunks.shift();
    if (!this.heard.has(msg.reply_id)) this.awaitingHeard.add(msg.reply_id);
  }

  /** Barge-in: the worker already cleared the track's queue; stop the face at once too. */
  stop(replyId) {
    this.discarded.add(replyId);
    this.awaitingHeard.delete(replyId);
    this.chunks = this.chunks.filter((c) => c.replyId !== replyId);
    if (this.discarded.size > 256) this.discarded = new Set([...this.discarded].slice(-128));
  }

  /** Call once per animation frame: notices when a reply's first audio is heard. */
  tick(now) {
    if (this.awaitingHeard.size === 0 || this.level() < HEARD_RMS) return;
    for (const replyId of this.awaitingHeard) {
      this.heard.add(replyId);
      if (this.heard.size > 64) this.heard.delete(this.heard.values().next().value);
      this.onReplyHeard(replyId, now);
    }
    this.awaitingHeard.clear();
  }

  level() {
    if (!this.analyser) return 0;
    this.analyser.getFloatTimeDomainData(this.buf);
    let sum = 0;
    for (let i = 0; i < this.buf.length; i++) sum += this.buf[i] * this.buf[i];
    return Math.sqrt(sum / this.buf.length);
  }

  mouthNow() {
    const now = performance.now();
    while (this.chunks.length && this.chunks[0].end < now - 1000) this.chunks.shift();
    for (const c of this.chunks) {
      if (now >= c.start && now < c.end && c.mouth.length) {
        const i = Math.min(c.mouth.length - 1, Math.floor((now - c.start) / c.hopMs));
        return Math.max(0, Math.min(1, c.mouth[i] || 0));
      }
    }
    return Math.min(1, this.level() * 4);
  }

  get playing() {
    return this.level() > HEARD_RMS / 2;
  }

  /** What the page's receiver sees of the track: jitter and underruns (concealment), for the bench. */
  async receiverStats() {
    const receiver = this.track?.receiver;
    if (!receiver) return null;
    const report = await receiver.getStats();
    for (const s of report.values()) {
      if (s.type === "inbound-rtp" && s.kind === "audio") {
        return {
          jitter_ms: (s.jitter || 0) * 1000,
          jitter_buffer_ms: s.jitterBufferEmittedCount ? (s.jitterBufferDelay / s.jitterBufferEmittedCount) * 1000 : 0,
          packets_received: s.packetsReceived || 0,
          packets_lost: s.packetsLost || 0,
          concealed_samples: s.concealedSamples || 0,
          concealment_events: s.concealmentEvents || 0,
          silent_concealed_samples: s.silentConcealedSamples || 0,
          total_samples: s.totalSamplesReceived || 0,
        };
      }
    }
    return null;
  }

  async disconnect() {
    const room = this.room;
    this.room = null;
    this.url = "";
    this.roomName = "";
    this.detach();
    this.chunks = [];
    this.awaitingHeard.clear();
    if (room) await room.disconnect().catch(() => {});
  }
}

// Local avatar speech: PCM16 chunks scheduled back to back on a Web Audio clock, plus the mouth
// envelope that travels with each chunk, looked up at the time the listener actually hears it.
//
// Echo: Chromium's echo canceller only subtracts audio that the page plays out of a WebRTC
// stream, not Web Audio's own output, so the avatar's voice would come back through the
// microphone. The output therefore goes through a loopback RTCPeerConnection pair inside the page
// and plays from the remote track in an <audio> element, where the canceller sees it. If the
// loopback cannot connect, the voice plays straight from Web Audio (echo guard on the server still
// applies).

const LEAD_S = 0.06; // headroom before the first chunk of a burst, absorbs network jitter
const MAX_QUEUE_S = 180; // safety bound on audio scheduled ahead (a reply arrives faster than it plays)
const LOOPBACK_TIMEOUT_MS = 3000; // a loopback that has not connected by then is given up for direct output

export class SpeechPlayer {
  /** @param {{loopback?: boolean, audioElement?: HTMLAudioElement}} options */
  constructor({ loopback = true, audioElement = null } = {}) {
    this.useLoopback = loopback && typeof RTCPeerConnection !== "undefined";
    this.audioElement = audioElement;
    this.output = "direct"; // "loopback" once the voice plays through WebRTC (echo-cancelled)
    this.paused = false;
    this.ctx = null;
    this.analyser = null;
    this.levelBuf = null;
    this.nextStartTime = 0;
    /** @type {{src: AudioBufferSourceNode, replyId: string, start: number, end: number, mouth: number[], hopS: number}[]} */
    this.scheduled = [];
    this.discarded = new Set(); // reply ids cut off by barge-in or interrupt: drop their chunks
    this.stats = { chunksReceived: 0, chunksPlayed: 0, chunksDropped: 0 };
    this.firstHeard = new Map(); // reply_id → performance.now() when its first chunk is heard
    this.onReplyHeard = null; // (replyId, heardAtMs) => void
  }

  /** Create/resume the output context; call from a user gesture. */
  prepare() {
    if (!this.ctx) {
      this.ctx = new AudioContext({ latencyHint: "interactive" });
      this.gain = this.ctx.createGain();
      this.analyser = this.ctx.createAnalyser();
      this.analyser.fftSize = 1024;
      this.levelBuf = new Float32Array(this.analyser.fftSize);
      this.gain.connect(this.analyser);
      if (this.useLoopback) this.startLoopback().catch(() => this.playDirect());
      else this.playDirect();
    }
    if (this.ctx.state !== "running" && !this.paused) this.ctx.resume().catch(() => {});
  }

  playDirect() {
    if (this.output === "direct" && this.directConnected) return;
    this.closeLoopback();
    this.analyser.connect(this.ctx.destination);
    this.directConnected = true;
    this.output = "direct";
  }

  /** Web Audio → MediaStream → RTCPeerConnection → RTCPeerConnection → <audio>, all in this page. */
  async startLoopback() {
    const dest = this.ctx.createMediaStreamDestination();
    this.analyser.connect(dest);
    const send = new RTCPeerConnection();
    const recv = new RTCPeerConnection();
    this.loopback = { send, recv, dest };
    send.onicecandidate = (e) => e.candidate && recv.addIceCandidate(e.candidate).catch(() => {});
    recv.onicecandidate = (e) => e.candidate && send.addIceCandidate(e.candidate).catch(() => {});
    const track = new Promise((resolve) => {
      recv.ontrack = (e) => resolve(e);
    });
    for (const t of dest.stream.getAudioTracks()) send.addTrack(t, dest.stream);
    const offer = await send.createOffer();
    await send.setLocalDescription(offer);
    await recv.setRemoteDescription(offer);
    const answer = await recv.createAnswer();
    await recv.setLocalDescription(answer);
    await send.setRemoteDescription(answer);
    const connected = new Promise((resolve, reject) => {
      const check = () => {
        if (recv.connectionState === "connected") resolve();
        else if (recv.connectionState === "failed" || recv.connectionState === "closed") reject(new Error("loopback failed"));
      };
      recv.onconnectionstatechange = check;
      check();
      setTimeout(() => reject(new Error("loopback timeout")), LOOPBACK_TIMEOUT_MS);
    });
    const [event] = await Promise.all([track, connected]);
    const receiver = event.receiver;
    if ("jitterBufferTarget" in receiver) receiver.jitterBufferTarget = 0; // speech, not music: least delay
    const el = this.audioElement || new Audio();
    el.srcObject = new MediaStream([event.track]);
    el.autoplay = true;
    await el.play();
    this.output = "loopback";
  }

  closeLoopback() {
    if (!this.loopback) return;
    const { send, recv, dest } = this.loopback;
    this.loopback = null;
    try {
      this.analyser.disconnect(dest);
    } catch {
      /* already disconnected */
    }
    send.close();
    recv.close();
  }

  /** Freeze playback where it is (the user started talking over the avatar); chunks keep queueing. */
  pause() {
    this.paused = true;
    if (this.ctx && this.ctx.state === "running") this.ctx.suspend().catch(() => {});
  }

  resume() {
    this.paused = false;
    if (this.ctx && this.ctx.state !== "running") this.ctx.resume().catch(() => {});
  }

  /** Queue one chunk. `pcm` is PCM16 LE mono at `meta.sample_rate`. */
  enqueue(meta, pcm) {
    this.stats.chunksReceived++;
    if (this.discarded.has(meta.reply_id) || !pcm || pcm.byteLength < 2) {
      this.stats.chunksDropped++;
      return;
    }
    this.prepare();
    const ctx = this.ctx;
    const samples = new Int16Array(pcm, 0, pcm.byteLength >> 1);
    const rate = meta.sample_rate || 16000;
    const buffer = ctx.createBuffer(1, samples.length, rate);
    const data = buffer.getChannelData(0);
    for (let i = 0; i < samples.length; i++) data[i] = samples[i] / 32768;

    const now = ctx.currentTime;
    if (this.nextStartTime < now + 0.005) this.nextStartTime = now + LEAD_S; // gap or first chunk
    if (this.nextStartTime - now > MAX_QUEUE_S) {
      this.stats.chunksDropped++;
      return;
    }
    const start = this.nextStartTime;
    const src = ctx.createBufferSource();
    src.buffer = buffer;
    src.connect(this.gain);
    src.start(start);
    this.nextStartTime = start + buffer.duration;

    const item = {
      src,
      replyId: meta.reply_id,
      start,
      end: this.nextStartTime,
      mouth: Array.isArray(meta.mouth) ? meta.mouth : [],
      hopS: (meta.mouth_hop_ms || 20) / 1000,
      stopped: false,
    };
    this.scheduled.push(item);
    src.onended = () => {
      if (!item.stopped) this.stats.chunksPlayed++;
      const i = this.scheduled.indexOf(item);
      if (i >= 0) this.scheduled.splice(i, 1);
    };
    if (!this.firstHeard.has(meta.reply_id)) {
      const heardAt = this.contextToPerf(start);
      this.firstHeard.set(meta.reply_id, heardAt);
      if (this.firstHeard.size > 64) this.firstHeard.delete(this.firstHeard.keys().next().value);
      if (this.onReplyHeard) this.onReplyHeard(meta.reply_id, heardAt);
    }
  }

  /** performance.now() timestamp at which audio scheduled at context time `t` reaches the ear. */
  contextToPerf(t) {
    const ctx = this.ctx;
    const stamp = ctx.getOutputTimestamp ? ctx.getOutputTimestamp() : null;
    if (stamp && stamp.performanceTime > 0) return stamp.performanceTime + (t - stamp.contextTime) * 1000;
    return performance.now() + (t - ctx.currentTime + (ctx.outputLatency || ctx.baseLatency || 0)) * 1000;
  }

  /** Context time of what the listener hears right now. */
  hearingTime() {
    const ctx = this.ctx;
    const stamp = ctx.getOutputTimestamp ? ctx.getOutputTimestamp() : null;
    if (stamp && stamp.performanceTime > 0) {
      return stamp.contextTime + (performance.now() - stamp.performanceTime) / 1000;
    }
    return ctx.currentTime - (ctx.outputLatency || 0);
  }

  /** Stop at once. With a reply id: that reply only (and drop its late chunks); else everything. */
  stop(replyId = null) {
    const victims = replyId == null ? this.scheduled.slice() : this.scheduled.filter((s) => s.replyId === replyId);
    if (replyId != null) this.discarded.add(replyId);
    else for (const s of victims) this.discarded.add(s.replyId);
    for (const s of victims) {
      s.stopped = true;
      try {
        s.src.stop();
      } catch {
        /* not started yet on some engines: disconnect below still silences it */
      }
      s.src.disconnect();
      const i = this.scheduled.indexOf(s);
      if (i >= 0) this.scheduled.splice(i, 1);
    }
    if (this.ctx && this.scheduled.length === 0) this.nextStartTime = this.ctx.currentTime;
    if (this.paused) this.resume(); // what was paused is gone; later replies must play
    if (this.discarded.size > 256) this.discarded = new Set([...this.discarded].slice(-128));
  }

  get playing() {
    if (!this.ctx || this.scheduled.length === 0 || this.paused) return false;
    const t = this.hearingTime();
    return this.scheduled.some((s) => s.end > t && s.start <= t + 0.05);
  }

  /** Mouth openness 0..1 for what is heard now, from the chunk's envelope. */
  mouthNow() {
    if (!this.ctx || this.paused) return 0;
    const t = this.hearingTime();
    for (const s of this.scheduled) {
      if (t >= s.start && t < s.end) {
        if (s.mouth.length === 0) return Math.min(1, this.level() * 4);
        const i = Math.min(s.mouth.length - 1, Math.floor((t - s.start) / s.hopS));
        return Math.max(0, Math.min(1, s.mouth[i] || 0));
      }
    }
    return 0;
  }

  /** RMS of the output right now, measured by the analyser (proves audio actually plays). */
  level() {
    if (!this.analyser || this.ctx.state !== "running") return 0; // a suspended graph outputs nothing
    this.analyser.getFloatTimeDomainData(this.levelBuf);
    let sum = 0;
    for (let i = 0; i < this.levelBuf.length; i++) sum += this.levelBuf[i] * this.levelBuf[i];
    return Math.sqrt(sum / this.levelBuf.length);
  }
}

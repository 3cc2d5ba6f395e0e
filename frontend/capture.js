// Microphone capture: getUserMedia (echo cancellation + noise suppression) → AudioWorklet →
// 20 ms PCM16 frames at 16 kHz, handed to `onFrame(arrayBuffer, level)`.

const CONSTRAINTS = {
  echoCancellation: true,
  noiseSuppression: true,
  autoGainControl: true,
  channelCount: 1,
};

export class MicCapture {
  /** @param {{onFrame: (pcm: ArrayBuffer, level: number) => void}} opts */
  constructor({ onFrame }) {
    this.onFrame = onFrame;
    this.ctx = null;
    this.stream = null;
    this.source = null;
    this.node = null;
    this.deviceId = "";
    this.useDeviceRate = false; // set when the browser refuses a 16 kHz context for the mic
  }

  /**
   * Create the AudioContext. Call synchronously inside the click handler that starts a session,
   * so the context is allowed to run (autoplay policy).
   */
  prepare() {
    if (this.ctx) return;
    const options = { latencyHint: "interactive" };
    if (!this.useDeviceRate) options.sampleRate = 16000;
    this.ctx = new AudioContext(options);
    this.ctx.resume().catch(() => {});
  }

  get running() {
    return Boolean(this.stream);
  }

  /** Open the microphone (or switch to `deviceId`). Throws the getUserMedia error on failure. */
  async start(deviceId = this.deviceId) {
    this.prepare();
    const audio = { ...CONSTRAINTS };
    if (deviceId) audio.deviceId = { exact: deviceId };
    const stream = await navigator.mediaDevices.getUserMedia({ audio });
    this.releaseStream();
    this.stream = stream;
    this.deviceId = stream.getAudioTracks()[0]?.getSettings().deviceId || deviceId || "";

    if (!this.node) {
      await this.ctx.audioWorklet.addModule(new URL("./capture-worklet.js", import.meta.url));
      this.node = new AudioWorkletNode(this.ctx, "capture-processor", {
        numberOfInputs: 1,
        numberOfOutputs: 0,
        channelCount: 1,
        channelCountMode: "explicit",
      });
      this.node.port.onmessage = (e) => this.onFrame(e.data.pcm, e.data.level);
    }
    try {
      this.source = this.ctx.createMediaStreamSource(stream);
    } catch (err) {
      // Firefox refuses to connect a microphone to a context whose rate differs from the
      // device's. Fall back to a context at the device rate; the worklet resamples to 16 kHz.
      if (err.name !== "NotSupportedError" || this.useDeviceRate) throw err;
      this.useDeviceRate = true;
      for (const t of stream.getTracks()) t.stop();
      this.stream = null;
      await this.closeContext();
      return this.start(deviceId);
    }
    this.source.connect(this.node);
    if (this.ctx.state !== "running") await this.ctx.resume().catch(() => {});
  }

  releaseStream() {
    if (this.source) this.source.disconnect();
    this.source = null;
    if (this.stream) for (const t of this.stream.getTracks()) t.stop();
    this.stream = null;
  }

  async closeContext() {
    this.releaseStream();
    if (this.node) this.node.port.onmessage = null;
    this.node = null;
    const ctx = this.ctx;
    this.ctx = null; // before awaiting: a new session may prepare() a fresh one meanwhile
    if (ctx) await ctx.close().catch(() => {});
  }

  async stop() {
    await this.closeContext();
  }
}

/** Audio input devices, labels included once the user has granted the microphone. */
export async function listMicrophones() {
  if (!navigator.mediaDevices?.enumerateDevices) return [];
  const devices = await navigator.mediaDevices.enumerateDevices();
  return devices.filter((d) => d.kind === "audioinput" && d.deviceId);
}

/** A user-facing sentence for a getUserMedia failure. */
export function micErrorMessage(err) {
  switch (err?.name) {
    case "NotAllowedError":
    case "SecurityError":
      return "Microphone access was denied. Allow it in the browser's site settings, or type your messages below.";
    case "NotFoundError":
    case "OverconstrainedError":
      return "No microphone was found. Connect one and choose it from the list, or type your messages below.";
    case "NotReadableError":
      return "The microphone is in use by another application or could not be opened.";
    default:
      if (!navigator.mediaDevices) {
        return "This page needs a secure connection (https or localhost) to use the microphone.";
      }
      return `The microphone could not be started (${err?.message || err}).`;
  }
}

// AudioWorklet: microphone → 16 kHz mono PCM16, 20 ms (320 samples, 640 bytes) per frame.
//
// The page asks for an AudioContext at 16 kHz, so normally this only converts float → int16.
// Where the browser refuses a 16 kHz context for a microphone (Firefox with some devices), the
// context runs at the device rate and this resamples: a 2nd-order low-pass at ~7 kHz, then
// linear interpolation. Each frame is posted to the page with its RMS level (0..1).

const TARGET_RATE = 16000;
const FRAME_SAMPLES = 320; // 20 ms at 16 kHz

class CaptureProcessor extends AudioWorkletProcessor {
  constructor() {
    super();
    this.ratio = sampleRate / TARGET_RATE; // input samples per output sample
    this.frame = new Int16Array(FRAME_SAMPLES);
    this.filled = 0;
    this.sumSquares = 0;
    // Resampler state (unused at 16 kHz).
    this.pos = 0; // fractional read position into the (filtered) input, relative to `prev`
    this.prev = 0;
    if (this.ratio > 1) this.lowpass = biquadLowpass(sampleRate, 7000);
    this.z1 = 0;
    this.z2 = 0;
  }

  process(inputs) {
    const input = inputs[0];
    if (!input || input.length === 0) return true;
    const mono = input.length === 1 ? input[0] : mixdown(input);
    if (this.ratio === 1) {
      for (let i = 0; i < mono.length; i++) this.push(mono[i]);
    } else {
      this.resample(mono);
    }
    return true;
  }

  resample(block) {
    const f = this.lowpass;
    for (let i = 0; i < block.length; i++) {
      let x = block[i];
      if (f) {
        // Transposed direct form II biquad.
        const y = f.b0 * x + this.z1;
        this.z1 = f.b1 * x - f.a1 * y + this.z2;
        this.z2 = f.b2 * x - f.a2 * y;
        x = y;
      }
      // Emit every output sample whose position lies between prev (pos 0) and x (pos 1).
      while (this.pos <= 1) {
        this.push(this.prev + (x - this.prev) * this.pos);
        this.pos += this.ratio;
      }
      this.pos -= 1;
      this.prev = x;
    }
  }

  push(sample) {
    const s = sample > 1 ? 1 : sample < -1 ? -1 : sample;
    this.sumSquares += s * s;
    this.frame[this.filled++] = s < 0 ? s * 0x8000 : s * 0x7fff;
    if (this.filled === FRAME_SAMPLES) {
      const level = Math.sqrt(this.sumSquares / FRAME_SAMPLES);
      const pcm = this.frame.buffer;
      this.port.postMessage({ pcm, level }, [pcm]);
      this.frame = new Int16Array(FRAME_SAMPLES);
      this.filled = 0;
      this.sumSquares = 0;
    }
  }
}

function mixdown(channels) {
  const out = new Float32Array(channels[0].length);
  for (const ch of channels) for (let i = 0; i < out.length; i++) out[i] += ch[i];
  for (let i = 0; i < out.length; i++) out[i] /= channels.length;
  return out;
}

// RBJ cookbook low-pass, Q = 1/sqrt(2).
function biquadLowpass(rate, cutoff) {
  const w0 = (2 * Math.PI * cutoff) / rate;
  const alpha = Math.sin(w0) / (2 * Math.SQRT1_2);
  const cos = Math.cos(w0);
  const a0 = 1 + alpha;
  return {
    b0: (1 - cos) / 2 / a0,
    b1: (1 - cos) / a0,
    b2: (1 - cos) / 2 / a0,
    a1: (-2 * cos) / a0,
    a2: (1 - alpha) / a0,
  };
}

registerProcessor("capture-processor", CaptureProcessor);

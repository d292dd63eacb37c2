// The browser caller's audio, as a phone line carries it: G.711 μ-law at 8 kHz, and a streaming
// resampler between the line's 8 kHz and the audio device's rate (48 or 44.1 kHz). No DOM: the
// page and its AudioWorklet (talk-worklet.js) both import this module.

export const LINE_RATE = 8000;
export const FRAME_SAMPLES = 160; // 20 ms at 8 kHz: Twilio's frame of caller audio

// --- G.711 μ-law, bit for bit as the reference encoder (and Python's audioop) ---------------

const BIAS = 0x84;
const CLIP = 8159; // in 14-bit units
const SEGMENT_ENDS = [0x3f, 0x7f, 0xff, 0x1ff, 0x3ff, 0x7ff, 0xfff, 0x1fff];

/** One 16-bit sample (an integer, -32768..32767) as a μ-law byte. */
export function encodeMulaw(sample) {
  let value = sample >> 2; // 14 bits, as G.711 works
  let mask = 0xff;
  if (value < 0) {
    value = -value;
    mask = 0x7f;
  }
  value = Math.min(value, CLIP) + (BIAS >> 2);
  let segment = 0;
  while (segment < 8 && value > SEGMENT_ENDS[segment]) segment++;
  if (segment >= 8) return 0x7f ^ mask;
  return (((segment << 4) | ((value >> (segment + 1)) & 0x0f)) ^ mask) & 0xff;
}

/** A μ-law byte as a 16-bit sample. */
export function decodeMulaw(byte) {
  const u = ~byte & 0xff;
  const magnitude = ((((u & 0x0f) << 3) + BIAS) << ((u & 0x70) >> 4)) - BIAS;
  return u & 0x80 ? -magnitude : magnitude;
}

const DECODED = Float32Array.from({ length: 256 }, (_, byte) => decodeMulaw(byte) / 32768);

/** μ-law bytes as samples in [-1, 1). */
export function mulawToFloat(bytes) {
  const samples = new Float32Array(bytes.length);
  for (let i = 0; i < bytes.length; i++) samples[i] = DECODED[bytes[i]];
  return samples;
}

/** A sample in [-1, 1] (clipped beyond) as a 16-bit integer. */
export function floatTo16(x) {
  const scaled = Math.round(x * 32768);
  return scaled > 32767 ? 32767 : scaled < -32768 ? -32768 : scaled;
}

// --- the resampler ----------------------------------------------------------------------------

// A Kaiser-windowed sinc low-pass at 95 % of the lower rate's Nyquist frequency, 16 zero
// crossings each side: for 48 kHz → 8 kHz, -0.22 dB at 3.4 kHz and at least 83 dB of
// attenuation from 4.6 kHz (what would fold back into the band), 2.1 ms of delay; the same
// kernel up to 48 kHz leaves the 8 kHz spectrum's images 83 dB down. Naive decimation (every
// sixth sample) would fold all of 4-24 kHz into the call.
const ZERO_CROSSINGS = 16;
const KAISER_BETA = 8;
const CUTOFF = 0.95;
const PHASES = 512; // kernel table entries per input sample (linear interpolation between)

function besselI0(x) {
  let sum = 1;
  let term = 1;
  for (let k = 1; k < 50; k++) {
    term *= (x / (2 * k)) ** 2;
    sum += term;
    if (term < sum * 1e-12) break;
  }
  return sum;
}

/** Any rate to any rate, a block at a time, with state between blocks. */
export class Resampler {
  constructor(inRate, outRate) {
    this.step = inRate / outRate; // input samples per output sample
    const cycles = (CUTOFF * Math.min(inRate, outRate)) / 2 / inRate; // cutoff, per input sample
    this.width = ZERO_CROSSINGS / (2 * cycles); // the kernel's half-width, in input samples
    const size = Math.ceil(this.width * PHASES) + 2;
    this.table = new Float32Array(size);
    const norm = besselI0(KAISER_BETA);
    for (let i = 0; i < size; i++) {
      const t = i / PHASES;
      if (t >= this.width) break;
      const x = 2 * cycles * t;
      const sinc = x === 0 ? 1 : Math.sin(Math.PI * x) / (Math.PI * x);
      const window = besselI0(KAISER_BETA * Math.sqrt(1 - (t / this.width) ** 2)) / norm;
      this.table[i] = 2 * cycles * sinc * window;
    }
    this.reset();
  }

  /** Forget the past (the line's audio was cleared): the next block starts afresh. */
  reset() {
    this.lead = Math.ceil(this.width); // zeros before the first sample: a full kernel there
    this.buffer = new Float32Array(this.lead + 4096);
    this.length = this.lead;
    this.position = this.lead; // of the next output sample, in input samples
  }

  /** A block of input samples in; the output samples they complete. */
  process(input) {
    if (this.length + input.length > this.buffer.length) {
      const grown = new Float32Array(2 * (this.length + input.length));
      grown.set(this.buffer.subarray(0, this.length));
      this.buffer = grown;
    }
    this.buffer.set(input, this.length);
    this.length += input.length;
    const { buffer, table, width, step } = this;
    const available = Math.max(0, Math.floor((this.length - 1 - width - this.position) / step) + 1);
    const output = new Float32Array(available);
    let position = this.position;
    for (let n = 0; n < available; n++) {
      const first = Math.ceil(position - width);
      const last = Math.floor(position + width);
      let sum = 0;
      for (let k = first; k <= last; k++) {
        const t = Math.abs(position - k) * PHASES;
        const i = t | 0;
        sum += buffer[k] * (table[i] + (table[i + 1] - table[i]) * (t - i));
      }
      output[n] = sum;
      position += step;
    }
    // Keep only what later outputs still need.
    const drop = Math.max(0, Math.min(this.length, Math.ceil(position - width)));
    buffer.copyWithin(0, drop, this.length);
    this.length -= drop;
    this.position = position - drop;
    return output;
  }
}

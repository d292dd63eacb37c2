// The browser caller's two audio processors, on the audio thread (an AudioWorklet module):
// "talk-capture" turns the microphone into 20 ms μ-law frames at 8 kHz, as Twilio sends a
// caller's audio; "talk-player" plays the agent's μ-law audio as Twilio's playback buffer does,
// and says when each mark has been reached (or flushed by `clear`).

import {
  FRAME_SAMPLES,
  LINE_RATE,
  Resampler,
  encodeMulaw,
  floatTo16,
  mulawToFloat,
} from "./talk-audio.js";

// The jitter buffer: playback starts (and restarts after running dry) once this much agent
// audio is queued, or once a mark says nothing more is coming before it. Audio arrives in
// bursts faster than real time, so this only absorbs the network's jitter.
const JITTER_MS = 60;
const REPORT_EVERY = 16; // process() calls (~40 ms) between reports of what is buffered

class Capture extends AudioWorkletProcessor {
  constructor() {
    super();
    this.down = new Resampler(sampleRate, LINE_RATE); // sampleRate: the context's, a global here
    this.frame = new Uint8Array(FRAME_SAMPLES);
    this.filled = 0;
  }

  process(inputs) {
    const samples = inputs[0] && inputs[0][0];
    if (!samples) return true; // no microphone yet (or it stopped): nothing to send
    for (const x of this.down.process(samples)) {
      this.frame[this.filled++] = encodeMulaw(floatTo16(x));
      if (this.filled === FRAME_SAMPLES) {
        this.port.postMessage(this.frame, [this.frame.buffer]);
        this.frame = new Uint8Array(FRAME_SAMPLES);
        this.filled = 0;
      }
    }
    return true;
  }
}

class Player extends AudioWorkletProcessor {
  constructor() {
    super();
    this.up = new Resampler(LINE_RATE, sampleRate);
    this.queue = []; // {audio: Float32Array, offset} and {mark: name}, in the order received
    this.buffered = 0; // samples of audio in the queue
    this.playing = false;
    this.prebuffer = Math.round((sampleRate * JITTER_MS) / 1000);
    this.calls = 0;
    this.port.onmessage = (event) => this.receive(event.data);
  }

  receive(message) {
    if (message.type === "media") {
      const audio = this.up.process(mulawToFloat(message.payload));
      if (audio.length) {
        this.queue.push({ audio, offset: 0 });
        this.buffered += audio.length;
      }
    } else if (message.type === "mark") {
      this.queue.push({ mark: message.name });
    } else if (message.type === "clear") {
      // Twilio drops the buffered audio and echoes every mark still pending.
      const marks = this.queue.filter((item) => item.mark !== undefined).map((item) => item.mark);
      this.queue = [];
      this.buffered = 0;
      this.playing = false;
      this.up.reset(); // the next audio is a new response, not the rest of this one
      this.port.postMessage({ type: "cleared", marks });
      this.report();
    }
  }

  process(inputs, outputs) {
    const out = outputs[0][0];
    if (!this.playing) {
      this.playing =
        this.buffered >= this.prebuffer || this.queue.some((item) => item.mark !== undefined);
    }
    let written = 0;
    while (this.queue.length) {
      const head = this.queue[0];
      if (head.mark !== undefined) {
        // Everything queued before it has played.
        this.queue.shift();
        this.port.postMessage({ type: "played", mark: head.mark });
        continue;
      }
      if (!this.playing || written === out.length) break;
      const count = Math.min(out.length - written, head.audio.length - head.offset);
      out.set(head.audio.subarray(head.offset, head.offset + count), written);
      written += count;
      head.offset += count;
      this.buffered -= count;
      if (head.offset === head.audio.length) this.queue.shift();
    }
    if (this.buffered === 0) this.playing = false; // ran dry: buffer again before playing
    if (++this.calls % REPORT_EVERY === 0) this.report();
    return true;
  }

  report() {
    this.port.postMessage({ type: "buffered", ms: Math.round((this.buffered / sampleRate) * 1000) });
  }
}

registerProcessor("talk-capture", Capture);
registerProcessor("talk-player", Player);

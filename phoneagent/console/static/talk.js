// "Talk to this persona": the page plays Twilio's part of a phone call over a WebSocket in the
// Media Streams format (see phoneagent/console/talk.py). The microphone goes out as 20 ms μ-law
// `media` frames; the agent's audio is played with its marks echoed once played and flushed by
// `clear`; the transcript and the handoffs arrive as `console.*` messages.

const section = document.getElementById("talk");
const csrf = document.querySelector("main").dataset.csrf;
const personaSelect = document.getElementById("persona");
const useDraft = document.getElementById("use-draft");
const editor = document.getElementById("draft-editor");
const draft = document.getElementById("draft");
const draftMessages = document.getElementById("draft-messages");
const loadFile = document.getElementById("load-file");
const startButton = document.getElementById("start");
const hangUpButton = document.getElementById("hang-up");
const status = document.getElementById("call-status");
const transcript = document.getElementById("transcript");

const MAX_DRAFT_BYTES = Number(section.dataset.maxDraftBytes);
const CHECK_DELAY_MS = 400; // the editor is checked once the operator pauses typing
const CLOSE_WAIT_MS = 3000; // after our `stop`, how long the server gets to close the call

// --- the draft editor -----------------------------------------------------------------------

let checkTimer = null;
let checkSeq = 0;

function showProblems(problems, okText) {
  draftMessages.replaceChildren();
  if (!problems.length) {
    const ok = document.createElement("p");
    ok.className = "ok";
    ok.textContent = okText;
    draftMessages.append(ok);
    return;
  }
  const list = document.createElement("ul");
  list.className = "problems";
  for (const problem of problems) {
    const item = document.createElement("li");
    item.className = "error";
    item.textContent = problem;
    list.append(item);
  }
  draftMessages.append(list);
}

async function checkDraft() {
  const seq = ++checkSeq;
  const text = draft.value;
  if (new TextEncoder().encode(text).length > MAX_DRAFT_BYTES) {
    showProblems([`the draft is larger than ${MAX_DRAFT_BYTES / 1024} KiB`]);
    return;
  }
  const url = `/console/talk/check?persona=${encodeURIComponent(personaSelect.value)}`;
  try {
    const response = await fetch(url, {
      method: "POST",
      headers: { "Content-Type": "text/plain; charset=utf-8", "X-CSRF-Token": csrf },
      body: text,
      credentials: "same-origin",
    });
    if (seq !== checkSeq) return; // a later check is on its way
    if (!response.ok) {
      showProblems([`The draft could not be checked (HTTP ${response.status}).`]);
      return;
    }
    const answer = await response.json();
    showProblems(answer.problems, `No problems: ${answer.persona ? answer.persona.name : ""}`);
  } catch (error) {
    if (seq === checkSeq) showProblems([`The draft could not be checked: ${error.message}`]);
  }
}

function checkSoon() {
  clearTimeout(checkTimer);
  checkTimer = setTimeout(checkDraft, CHECK_DELAY_MS);
}

async function loadPersonaFile() {
  const response = await fetch(`/console/talk/persona/${encodeURIComponent(personaSelect.value)}`, {
    credentials: "same-origin",
  });
  if (!response.ok) {
    showProblems([`The persona's file could not be loaded (HTTP ${response.status}).`]);
    return;
  }
  draft.value = await response.text();
  checkDraft();
}

if (useDraft) {
  useDraft.addEventListener("change", () => {
    editor.hidden = !useDraft.checked;
    if (useDraft.checked && !draft.value) loadPersonaFile();
  });
  draft.addEventListener("input", checkSoon);
  loadFile.addEventListener("click", loadPersonaFile);
  personaSelect.addEventListener("change", () => {
    if (useDraft.checked) checkDraft(); // the draft now stands for another persona's file
  });
}

// --- the call -------------------------------------------------------------------------------

function setStatus(text, state) {
  status.textContent = text;
  if (state) status.dataset.state = state;
}

function count(name) {
  status.dataset[name] = String(Number(status.dataset[name]) + 1);
}

// The transcript's lines by turn (role and start): a turn the caller interrupted comes again,
// cut to what was heard, and replaces its line.
const lines = new Map();

function addLine(role, text, note, key) {
  const item = document.createElement("li");
  item.className = role;
  const who = document.createElement("span");
  who.className = "who";
  who.textContent = { caller: "You", agent: "Agent", event: "Call" }[role] || role;
  item.append(who, " ", text);
  if (note) {
    const small = document.createElement("span");
    small.className = "muted";
    small.textContent = ` (${note})`;
    item.append(small);
  }
  const previous = key && lines.get(key);
  if (previous) previous.replaceWith(item);
  else transcript.append(item);
  if (key) lines.set(key, item);
}

function toBase64(bytes) {
  let text = "";
  for (const byte of bytes) text += String.fromCharCode(byte);
  return btoa(text);
}

function fromBase64(text) {
  const raw = atob(text);
  const bytes = new Uint8Array(raw.length);
  for (let i = 0; i < raw.length; i++) bytes[i] = raw.charCodeAt(i);
  return bytes;
}

const END_REASONS = {
  caller_hung_up: "You hung up.",
  agent_hung_up: "The agent hung up.",
  transferred: "The call was transferred (shown, not dialled).",
  time_limit: "The persona's time limit was reached.",
  twilio_disconnected: "The connection was lost.",
  model_disconnected: "The model went away.",
  drain_goodbye: "The server is shutting down.",
  server_shutdown: "The server is shutting down.",
  signed_out: "Your console session ended (signed out, or it expired): sign in again.",
};

class BrowserCall {
  constructor(personaId, draftText) {
    this.personaId = personaId;
    this.draftText = draftText;
    this.sequence = 0; // Twilio numbers every message from `start` on
    this.chunk = 0;
    this.ended = false;
  }

  async start() {
    if (!window.isSecureContext || !navigator.mediaDevices || !window.AudioWorkletNode) {
      throw new Error(
        "This browser cannot use the microphone here: open the console over https:// " +
          "(or on localhost), in a current browser.",
      );
    }
    this.microphone = await navigator.mediaDevices.getUserMedia({
      audio: { channelCount: 1, echoCancellation: true, noiseSuppression: true, autoGainControl: true },
    });
    // At the microphone's own rate where the browser says it: some browsers cannot connect a
    // microphone to a context running at another rate. The worklet resamples to 8 kHz.
    const { sampleRate } = this.microphone.getAudioTracks()[0].getSettings();
    const options = { latencyHint: "interactive" };
    if (sampleRate) options.sampleRate = sampleRate;
    this.context = new AudioContext(options);
    await this.context.audioWorklet.addModule(section.dataset.worklet);
    await this.context.resume();
    this.player = new AudioWorkletNode(this.context, "talk-player", {
      numberOfInputs: 0,
      outputChannelCount: [1],
    });
    this.player.port.onmessage = (event) => this.fromPlayer(event.data);
    this.player.connect(this.context.destination);
    // One silent output, connected: a node with none may never be run.
    this.capture = new AudioWorkletNode(this.context, "talk-capture", {
      channelCount: 1,
      channelCountMode: "explicit",
      outputChannelCount: [1],
    });
    this.capture.connect(this.context.destination);
    this.capture.port.onmessage = (event) => this.sendMedia(event.data);
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    this.socket = new WebSocket(`${scheme}//${location.host}/console/talk/stream`);
    this.socket.onmessage = (event) => this.receive(JSON.parse(event.data));
    this.socket.onclose = () => this.finish();
    this.socket.onerror = () => setStatus("The connection to the server failed.", "failed");
  }

  send(message) {
    if (this.socket && this.socket.readyState === WebSocket.OPEN) {
      this.socket.send(JSON.stringify(message));
    }
  }

  sendEvent(event, body) {
    this.sequence += 1;
    this.send({ event, sequenceNumber: String(this.sequence), streamSid: this.streamSid, ...body });
  }

  sendMedia(frame) {
    if (!this.streamSid || this.ended) return;
    const timestamp = this.chunk * 20; // ms of caller audio since `start`
    this.chunk += 1;
    this.sendEvent("media", {
      media: {
        track: "inbound",
        chunk: String(this.chunk),
        timestamp: String(timestamp),
        payload: toBase64(frame),
      },
    });
    count("framesSent");
  }

  echoMark(name) {
    this.sendEvent("mark", { mark: { name } });
    count("marksEchoed");
  }

  fromPlayer(message) {
    if (message.type === "played") this.echoMark(message.mark);
    else if (message.type === "cleared") message.marks.forEach((name) => this.echoMark(name));
    else if (message.type === "buffered") status.dataset.bufferedMs = String(message.ms);
  }

  receive(message) {
    switch (message.event) {
      case "console.call": {
        this.callSid = message.callSid;
        this.streamSid = message.streamSid;
        this.accountSid = message.accountSid;
        const parameters = { persona: this.personaId, csrf };
        if (this.draftText !== null) parameters.draft = this.draftText;
        this.send({ event: "connected", protocol: "Call", version: "1.0.0" });
        this.sendEvent("start", {
          start: {
            streamSid: this.streamSid,
            accountSid: this.accountSid,
            callSid: this.callSid,
            tracks: ["inbound"],
            customParameters: parameters,
            mediaFormat: { encoding: "audio/x-mulaw", sampleRate: 8000, channels: 1 },
          },
        });
        this.context.createMediaStreamSource(this.microphone).connect(this.capture);
        status.dataset.callSid = this.callSid;
        setStatus(`Connected (${this.callSid}). Speak when the agent has greeted you.`, "live");
        break;
      }
      case "media":
        this.player.port.postMessage({ type: "media", payload: fromBase64(message.media.payload) });
        count("framesReceived");
        break;
      case "mark":
        this.player.port.postMessage({ type: "mark", name: message.mark.name });
        break;
      case "clear":
        this.player.port.postMessage({ type: "clear" });
        count("clears");
        break;
      case "console.turn": {
        const turn = message.turn;
        const note = turn.interrupted ? "interrupted" : "";
        addLine(turn.role, turn.text, note, `${turn.role}@${turn.start_ms}`);
        break;
      }
      case "console.handoff":
        if (message.action === "transfer") {
          addLine("event", `Transfer to ${message.target} (${message.number}): not dialled.`);
          // Twilio ends the stream once the call is redirected to the <Dial>.
          this.sendEvent("stop", { stop: { accountSid: this.accountSid, callSid: this.callSid } });
        } else {
          addLine("event", "The agent hung up.");
        }
        break;
      case "console.refused":
        this.refused = true;
        setStatus(`The call could not start: ${message.reason}.`, "refused");
        if (message.problems && message.problems.length) {
          showProblems(message.problems);
          if (useDraft) editor.hidden = false;
        }
        break;
      case "console.ended":
        this.endReason = message.reason;
        break;
      default:
        break; // a message this page does not know: Twilio's callers ignore them too
    }
  }

  hangUp() {
    if (this.ended) return;
    if (!this.callSid) {
      this.socket.close(); // not a call yet: nothing to stop
      return;
    }
    setStatus("Hanging up…");
    this.sendEvent("stop", { stop: { accountSid: this.accountSid, callSid: this.callSid } });
    setTimeout(() => this.socket && this.socket.close(), CLOSE_WAIT_MS);
  }

  finish() {
    if (this.ended) return;
    this.ended = true;
    if (this.microphone) this.microphone.getTracks().forEach((track) => track.stop());
    if (this.context) this.context.close();
    if (!this.callSid) {
      setStatus("The server refused the call: sign in again, or reload the page.", "failed");
    } else if (!this.refused) {
      const reason = END_REASONS[this.endReason] || "The call ended.";
      addLine("event", reason);
      setStatus(`Call over. ${reason}`, "ended");
    }
    callEnded();
  }

  abort() {
    this.ended = true;
    if (this.socket) this.socket.close();
    if (this.microphone) this.microphone.getTracks().forEach((track) => track.stop());
    if (this.context) this.context.close();
  }
}

let call = null;

function callEnded() {
  call = null;
  startButton.disabled = false;
  hangUpButton.disabled = true;
  if (personaSelect) personaSelect.disabled = false;
  if (useDraft) useDraft.disabled = false;
  startButton.focus();
}

startButton.addEventListener("click", async () => {
  if (call) return;
  startButton.disabled = true;
  personaSelect.disabled = true;
  useDraft.disabled = true;
  transcript.replaceChildren();
  lines.clear();
  for (const name of ["framesReceived", "framesSent", "marksEchoed", "clears"]) {
    status.dataset[name] = "0";
  }
  setStatus("Starting: allow the microphone if the browser asks.", "starting");
  call = new BrowserCall(personaSelect.value, useDraft.checked ? draft.value : null);
  try {
    await call.start();
    hangUpButton.disabled = false;
    hangUpButton.focus();
  } catch (error) {
    call.abort();
    setStatus(`The call could not start: ${error.message}`, "failed");
    callEnded();
  }
});

hangUpButton.addEventListener("click", () => {
  if (call) call.hangUp();
});

"use strict";
// A live call's page: its turns, state, transfer and barge-ins as they happen (server-sent
// events from /console/calls/SID/events; the browser reconnects by itself, and the server
// resumes after the last turn it sent), and its duration ticking. Outside text is only ever
// set with textContent.
(() => {
  const call = document.getElementById("call");
  if (!call || call.dataset.live !== "true") return;
  const transcript = document.getElementById("transcript");
  const empty = document.getElementById("transcript-empty");
  const status = document.getElementById("live-status");
  const durationCell = document.getElementById("call-duration");
  const offset = Number(call.dataset.now) - Date.now() / 1000;

  const duration = window.consoleDuration; // duration.js

  const timer = setInterval(() => {
    const started = Number(durationCell.dataset.started);
    if (started) durationCell.textContent = duration(Date.now() / 1000 + offset - started);
  }, 1000);

  function span(className, text) {
    const element = document.createElement("span");
    element.className = className;
    element.textContent = text;
    return element;
  }

  function addTurn(turn) {
    const item = document.createElement("li");
    const role = turn.role === "agent" ? "agent" : "caller";
    item.className = `turn ${role}${turn.interrupted ? " interrupted" : ""}`;
    item.append(
      span("who", role === "agent" ? "Agent" : "Caller"), " ",
      span("at muted", turn.at), " ",
      span("text", turn.text),
    );
    if (turn.interrupted) {
      item.append(" ", span("flag", "interrupted: the caller talked over the agent"));
    }
    transcript.append(item);
    empty.hidden = true;
  }

  function setText(id, text) {
    const element = document.getElementById(id);
    if (element.textContent !== text) element.textContent = text;
  }

  const source = new EventSource(call.dataset.events);
  let state = document.getElementById("call-state").textContent;

  source.addEventListener("turn", (event) => addTurn(JSON.parse(event.data)));
  source.addEventListener("status", (event) => {
    const now = JSON.parse(event.data);
    setText("call-state", now.state);
    setText("call-transfer", now.transfer || "none");
    setText("call-barge-ins", String(now.barge_ins));
    if (now.state !== state) {
      state = now.state;
      status.textContent = now.transfer ? `Now ${now.state}: to ${now.transfer}.` : `Now ${now.state}.`;
    }
  });
  source.addEventListener("note", (event) => {
    status.textContent = JSON.parse(event.data).text;
  });
  source.addEventListener("ended", (event) => {
    source.close();
    clearInterval(timer);
    const ended = JSON.parse(event.data);
    setText("call-state", "ended");
    setText("call-transfer", ended.transfer || "none");
    const link = document.createElement("a");
    link.href = window.location.pathname;
    link.textContent = "Show the whole call";
    status.replaceChildren(`The call ended: ${ended.end || "no reason given"}. `, link);
    call.dataset.live = "ended";
  });
  source.addEventListener("error", () => {
    if (source.readyState === EventSource.CLOSED) {
      clearInterval(timer);
      status.textContent = "Live updates stopped: reload the page.";
    } else {
      status.textContent = "Connection lost: reconnecting…";
    }
  });
  source.addEventListener("open", () => {
    if (status.textContent.startsWith("Connection lost")) status.textContent = "Reconnected.";
  });
})();

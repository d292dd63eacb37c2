"use strict";
// Live calls: the list refreshes itself every two seconds, and durations tick every second.
// Everything shown is set as text (textContent): numbers and names come from outside.
(() => {
  const table = document.getElementById("live-calls");
  if (!table) return;
  const body = table.tBodies[0];
  const count = document.getElementById("live-count");
  const empty = document.getElementById("live-empty");
  const problem = document.getElementById("live-problem");
  // The server's clock minus this browser's: durations count from the server's start times.
  let offset = Number(table.dataset.now) - Date.now() / 1000;

  const duration = window.consoleDuration; // duration.js

  function tick() {
    const now = Date.now() / 1000 + offset;
    for (const cell of table.querySelectorAll(".duration[data-started]")) {
      const started = Number(cell.dataset.started);
      if (started) cell.textContent = duration(now - started);
    }
  }

  function cell(row, first, second) {
    const td = row.insertCell();
    td.append(first);
    if (second) {
      const muted = document.createElement("span");
      muted.className = "muted";
      muted.textContent = second;
      td.append(document.createElement("br"), muted);
    }
    return td;
  }

  function render(calls) {
    const rows = document.createDocumentFragment();
    for (const call of calls) {
      const row = document.createElement("tr");
      row.dataset.callSid = call.call_sid;
      const link = document.createElement("a");
      link.href = call.url;
      link.textContent = call.caller;
      cell(row, link);
      cell(row, call.persona, call.called);
      const time = cell(row, call.duration);
      time.className = "duration";
      time.dataset.started = call.started_at || "";
      cell(row, call.state, call.transfer ? `to ${call.transfer}` : "");
      cell(row, call.here ? "this instance" : "another instance");
      rows.append(row);
    }
    body.replaceChildren(rows);
    const text = `${calls.length} call${calls.length === 1 ? "" : "s"} in progress`;
    if (count.textContent !== text) count.textContent = text; // announced (aria-live)
    empty.hidden = calls.length > 0;
    tick();
  }

  async function refresh() {
    try {
      const response = await fetch(table.dataset.source, { headers: { Accept: "application/json" } });
      if (response.status === 401) {
        window.location.reload(); // the session ended: the page asks to sign in again
        return;
      }
      if (!response.ok) return;
      const data = await response.json();
      offset = data.now - Date.now() / 1000;
      problem.textContent = data.problem || "";
      problem.hidden = !data.problem;
      render(data.calls);
    } catch (error) {
      // The server is away for a moment (restarting): the next refresh tries again.
    }
  }

  setInterval(refresh, 2000);
  setInterval(tick, 1000);
})();

// The video page without reloading: the upload is posted with fetch asking for newline-delimited
// JSON events; each frame's answer is added to the table as it arrives. Text goes in through
// textContent only.
"use strict";
document.addEventListener("DOMContentLoaded", () => {
  const form = document.getElementById("video-form");
  const input = document.getElementById("file");
  const drop = document.getElementById("drop");
  const button = document.getElementById("submit");
  const progress = document.getElementById("progress");
  const rows = document.getElementById("frames");
  const count = document.getElementById("frame-count");
  const fps = document.getElementById("fps");
  const kind = document.getElementById("video-kind");
  const state = document.getElementById("video-state");
  const errorCard = document.getElementById("video-error");

  function ordinal(n) {
    const tens = n % 100;
    const suffix = tens >= 11 && tens <= 13 ? "th" : { 1: "st", 2: "nd", 3: "rd" }[n % 10] || "th";
    return `${n}${suffix}`;
  }

  function cell(row, text, className) {
    const td = document.createElement("td");
    td.textContent = text;
    if (className) td.className = className;
    row.append(td);
    return td;
  }

  function showError(title, message) {
    errorCard.querySelector(".error-title").textContent = title;
    errorCard.querySelector(".error-message").textContent = message;
    errorCard.hidden = false;
  }

  function handle(event) {
    if (event.event === "start") {
      const total = event.frames ? `${event.frames} frames` : "frame count unknown";
      const sampling = event.every === 1 ? "every frame" : `every ${ordinal(event.every)} frame`;
      kind.textContent = `${event.kind}, ${total}, ${sampling}`;
      state.textContent = "Streaming…";
    } else if (event.event === "frame") {
      const row = document.createElement("tr");
      row.className = "frame-row";
      row.dataset.frame = String(event.frame_id);
      cell(row, String(event.frame_id));
      if (event.error) {
        cell(row, event.error, "bad").colSpan = 2;
      } else {
        cell(row, event.label, "label");
        cell(row, `${(event.prob * 100).toFixed(1)}%`);
      }
      cell(row, `${event.server_ms} ms`);
      cell(row, String(event.count));
      cell(row, String(event.fps));
      rows.append(row);
      count.textContent = String(event.count);
      fps.textContent = String(event.fps);
    } else if (event.event === "end") {
      count.textContent = String(event.count);
      fps.textContent = String(event.fps);
      state.textContent = `Done: ${event.count} frames in ${event.elapsed_s} s. ${event.note || ""}`;
      state.className = "state done";
    } else if (event.event === "error") {
      state.textContent = "Stopped.";
      showError(event.title, event.message);
    }
  }

  async function send() {
    if (!input.files.length) return;
    button.disabled = true;
    errorCard.hidden = true;
    rows.replaceChildren();
    count.textContent = "0";
    fps.textContent = "";
    state.textContent = "Uploading…";
    state.className = "state";
    progress.hidden = false;
    try {
      const response = await fetch(form.action, {
        method: "POST",
        body: new FormData(form),
        headers: { Accept: "application/x-ndjson" },
      });
      if (!response.ok) {
        const body = await response.json().catch(() => ({}));
        state.textContent = "";
        progress.hidden = true;
        showError(body.title || `Error ${response.status}`, body.message || "The upload was refused.");
        return;
      }
      const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffered = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffered += value;
        const lines = buffered.split("\n");
        buffered = lines.pop();
        for (const line of lines) if (line.trim()) handle(JSON.parse(line));
      }
    } catch (err) {
      showError("The stream broke off", "The page lost its connection to the UI server.");
    } finally {
      button.disabled = false;
    }
  }

  form.addEventListener("submit", (event) => { event.preventDefault(); send(); });
  for (const name of ["dragenter", "dragover"]) {
    drop.addEventListener(name, (event) => { event.preventDefault(); drop.classList.add("dragging"); });
  }
  for (const name of ["dragleave", "drop"]) {
    drop.addEventListener(name, () => drop.classList.remove("dragging"));
  }
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    if (event.dataTransfer && event.dataTransfer.files.length) input.files = event.dataTransfer.files;
  });
});

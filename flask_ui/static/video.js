// The video page without reloading: the upload is posted with fetch asking for newline-delimited
// JSON events. Each answered frame comes with a small JPEG of itself; it is shown with its own
// boxes (a detector's, or a face model's faces with their top expression: overlay.js) as one
// element, so the overlay is always in step with its frame, and the last few frames stay in a strip. Skipped frames (live mode) are counted and listed, never drawn.
// Text goes in through textContent only.
"use strict";
document.addEventListener("DOMContentLoaded", () => {
  const { overlay, summary, hasBoxes, percent } = window.VisionOverlay;
  const STRIP_LENGTH = 8; // frames kept in the strip: the page's memory stays bounded
  const form = document.getElementById("video-form");
  const input = document.getElementById("file");
  const drop = document.getElementById("drop");
  const button = document.getElementById("submit");
  const progress = document.getElementById("progress");
  const rows = document.getElementById("frames");
  const count = document.getElementById("frame-count");
  const fps = document.getElementById("fps");
  const skipped = document.getElementById("skipped-count");
  const kind = document.getElementById("video-kind");
  const state = document.getElementById("video-state");
  const errorCard = document.getElementById("video-error");
  const player = document.getElementById("player");
  const stage = document.getElementById("stage");
  const caption = document.getElementById("stage-caption");
  const strip = document.getElementById("strip");

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

  // One frame and its answer as one element: replacing it replaces both at once.
  function framed(event) {
    const figure = document.createElement("figure");
    figure.className = "boxed";
    figure.dataset.frame = String(event.frame_id);
    const img = document.createElement("img");
    img.alt = `Frame ${event.frame_id}`;
    img.src = event.image;
    figure.append(img);
    if (hasBoxes(event)) figure.append(overlay(event));
    return figure;
  }

  function show(event) {
    if (typeof event.image !== "string" || !event.image.startsWith("data:image/jpeg;base64,")) return;
    player.hidden = false;
    stage.replaceChildren(framed(event));
    caption.textContent = `Frame ${event.frame_id}: ${summary(event)}`;
    const item = document.createElement("li");
    item.dataset.frame = String(event.frame_id);
    const label = document.createElement("span");
    label.className = "strip-label";
    label.textContent = `frame ${event.frame_id}`;
    item.append(framed(event), label);
    strip.append(item);
    while (strip.children.length > STRIP_LENGTH) strip.firstElementChild.remove();
  }

  function addRow(event) {
    const row = document.createElement("tr");
    row.className = event.skipped ? "frame-row skipped" : "frame-row";
    row.dataset.frame = String(event.frame_id);
    cell(row, String(event.frame_id));
    if (event.skipped) {
      cell(row, "skipped: a newer frame was computed", "muted").colSpan = 3;
    } else if (event.error) {
      cell(row, event.error, "bad").colSpan = 2;
      cell(row, `${event.server_ms} ms`);
    } else if (hasBoxes(event)) {
      // a detector's labels and scores, or each face's top expression and its probability
      const labels = cell(row, "");
      if (!event.detections.length) labels.textContent = summary(event);
      event.detections.forEach((d, i) => {
        const span = document.createElement("span");
        span.className = "label";
        span.textContent = d.label;
        labels.append(...(i ? [", ", span] : [span]));
      });
      cell(row, event.detections.map((d) => percent(d.score)).join(", "));
      cell(row, `${event.server_ms} ms`);
    } else {
      cell(row, event.label, "label");
      cell(row, `${(event.prob * 100).toFixed(1)}%`);
      cell(row, `${event.server_ms} ms`);
    }
    cell(row, String(event.count));
    cell(row, String(event.fps));
    rows.append(row);
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
      const mode = event.mode === "live" ? "live" : "in order";
      kind.textContent = `${event.kind}, ${total}, ${sampling} · ${event.model || "default model"}, ${mode}`;
      state.textContent = "Streaming…";
    } else if (event.event === "frame") {
      addRow(event);
      if (!event.skipped && !event.error) show(event);
      count.textContent = String(event.count);
      fps.textContent = String(event.fps);
      skipped.textContent = String(event.skipped_count);
    } else if (event.event === "end") {
      count.textContent = String(event.count);
      fps.textContent = String(event.fps);
      skipped.textContent = String(event.skipped_count);
      const skips = event.skipped_count ? `, ${event.skipped_count} skipped` : "";
      state.textContent = `Done: ${event.count} frames in ${event.elapsed_s} s (${event.fps} frames/s${skips}). ${event.note || ""}`;
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
    stage.replaceChildren();
    strip.replaceChildren();
    caption.textContent = "";
    player.hidden = true;
    count.textContent = "0";
    skipped.textContent = "0";
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

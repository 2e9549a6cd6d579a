// The live page: the browser's camera (getUserMedia), its frames sent to the model and the
// answers drawn over the live video as they arrive (overlay.js: a detector's boxes, a face model's
// faces with their top expression; a classifier's top class as a caption).
//
// It never lags behind the camera: at most `in flight` frames (1 or 2) are sent and not yet
// answered, and a frame is captured only when a slot is free, always the camera's newest one.
// The frames the camera shows meanwhile are never sent (the server never queues stale ones), and
// an answer older than the one drawn is counted but not drawn. Each frame is one plain POST to
// /live/frame with the form's model and settings, so a change applies to the next frame; a frame
// that fails shows why, and the next one is sent all the same. Text goes in through textContent.
"use strict";
document.addEventListener("DOMContentLoaded", () => {
  const { overlay, summary, hasBoxes, percent } = window.VisionOverlay;
  const MAX_SIDE = 640; // frames are sent at most this many pixels a side
  const QUALITY = 0.8; // their JPEG quality (about 30-50 KB at 640x480)
  const RATE_WINDOW_MS = 3000; // frames/s over the last 3 s
  const LATENCIES = 30; // the latency shown is the median of the last 30 answers
  const PAUSE_AFTER_REFUSAL_MS = 250; // a frame refused (its settings, its image): then the next
  const PAUSE_AFTER_FAILURE_MS = 1000; // the service down or busy: retried at most once a second

  const form = document.getElementById("live-form");
  const startButton = document.getElementById("start");
  const stopButton = document.getElementById("stop");
  const inFlightChoice = document.getElementById("in-flight");
  const figure = document.getElementById("camera-figure");
  const video = document.getElementById("camera");
  const top = document.getElementById("live-top");
  const caption = document.getElementById("live-caption");
  const faceList = document.getElementById("live-faces");
  const state = document.getElementById("live-state");
  const frameError = document.getElementById("frame-error");
  const errorCard = document.getElementById("live-error");
  const counters = {
    answers: document.getElementById("answer-count"),
    fps: document.getElementById("live-fps"),
    latency: document.getElementById("latency"),
    server: document.getElementById("server-ms"),
    errors: document.getElementById("error-count"),
    unsent: document.getElementById("unsent-count"),
  };

  let camera = null; // the MediaStream while running
  let running = false;
  let requests = null; // AbortController of the frames in flight
  let inFlight = 0;
  let fresh = false; // the camera has shown a frame not sent yet
  let shown = 0; // frames the camera has shown since the start
  let sent = 0; // frames sent (their sequence numbers)
  let drawn = 0; // sequence number of the answer drawn
  let generation = 0; // bumped when the model or a setting changes: older answers are not drawn
  let answers = 0;
  let errors = 0;
  let answeredAt = [];
  let latencies = [];
  let startedAt = 0;

  function showError(problem, title, message) {
    errorCard.dataset.problem = problem;
    errorCard.querySelector(".error-title").textContent = title;
    errorCard.querySelector(".error-message").textContent = message;
    errorCard.hidden = false;
  }

  // getUserMedia's refusals in words that say what to do.
  function cameraRefused(err) {
    const name = err && err.name;
    if (name === "NotAllowedError" || name === "SecurityError") {
      showError(
        "camera-refused",
        "The camera was refused",
        "This page may not use the camera. Allow it (the camera icon in the address bar, or the " +
          "site's settings) and press “Start the camera” again.",
      );
    } else if (name === "NotFoundError" || name === "OverconstrainedError") {
      showError(
        "camera-absent",
        "No camera found",
        "This browser has no camera to give. Connect one (or enable it in the system's " +
          "settings) and press “Start the camera” again.",
      );
    } else if (name === "NotReadableError" || name === "AbortError") {
      showError(
        "camera-busy",
        "The camera cannot be read",
        "Another application may be using it. Close that application and try again.",
      );
    } else {
      showError("camera-failed", "The camera did not start", `${name || "Error"}: ${(err && err.message) || ""}`);
    }
  }

  function median(values) {
    const sorted = [...values].sort((a, b) => a - b);
    return sorted[Math.floor(sorted.length / 2)];
  }

  function resetCounters() {
    answers = errors = sent = drawn = shown = 0;
    answeredAt = [];
    latencies = [];
    counters.answers.textContent = "0";
    counters.errors.textContent = "0";
    counters.unsent.textContent = "0";
    for (const name of ["fps", "latency", "server"]) counters[name].textContent = "–";
    frameError.hidden = true;
  }

  function clearDrawing() {
    for (const layer of figure.querySelectorAll(".overlay")) layer.remove();
    top.hidden = true;
    caption.textContent = "";
    faceList.replaceChildren();
  }

  function count(latency, serverMs) {
    const now = performance.now();
    answers += 1;
    answeredAt.push(now);
    while (answeredAt.length && answeredAt[0] < now - RATE_WINDOW_MS) answeredAt.shift();
    latencies.push(latency);
    if (latencies.length > LATENCIES) latencies.shift();
    const span = Math.min(RATE_WINDOW_MS, now - startedAt);
    counters.answers.textContent = String(answers);
    counters.fps.textContent = span > 0 ? ((answeredAt.length * 1000) / span).toFixed(1) : "–";
    counters.latency.textContent = `${Math.round(median(latencies))} ms`;
    counters.server.textContent = `${Number(serverMs).toFixed(1)} ms`;
    counters.unsent.textContent = String(Math.max(0, shown - sent - (fresh ? 1 : 0)));
  }

  // Each face's seven expressions as bars, below the video.
  function listFaces(faces) {
    faceList.replaceChildren(
      ...faces.map((face, i) => {
        const item = document.createElement("li");
        item.className = "face";
        item.dataset.top = face.top;
        const head = document.createElement("p");
        head.className = "face-head";
        head.textContent = `Face ${i + 1}: ${face.top} ${percent(face.prob, 1)}`;
        const bars = document.createElement("ol");
        bars.className = "topk expressions";
        for (const [name, prob] of face.expression) {
          const bar = document.createElement("li");
          bar.dataset.expression = name;
          if (name === face.top) bar.className = "highest";
          const label = document.createElement("span");
          label.className = "label";
          label.textContent = name;
          const value = document.createElement("span");
          value.className = "prob";
          value.textContent = percent(prob, 1);
          const track = document.createElement("span");
          track.className = "bar";
          const fill = document.createElement("span");
          fill.className = "fill";
          fill.style.width = percent(prob, 1);
          track.append(fill);
          bar.append(label, value, track);
          bars.append(bar);
        }
        item.append(head, bars);
        return item;
      }),
    );
  }

  function draw(seq, answer) {
    if (seq < drawn) return; // an older frame answered after a newer one: never drawn over it
    drawn = seq;
    for (const layer of figure.querySelectorAll(".overlay")) layer.remove();
    if (hasBoxes(answer)) {
      const layer = overlay(answer);
      layer.dataset.frame = String(seq);
      figure.append(layer);
      top.hidden = true;
    } else {
      top.textContent = summary(answer);
      top.hidden = !top.textContent;
    }
    caption.textContent = `Frame ${seq} · ${answer.model}: ${summary(answer)}`;
    if (answer.task === "face_expression") listFaces(answer.faces);
    else faceList.replaceChildren();
  }

  function failed(seq, title, message) {
    errors += 1;
    counters.errors.textContent = String(errors);
    frameError.textContent = `Frame ${seq} was not answered: ${title}. ${message} The next frames are sent all the same.`;
    frameError.hidden = false;
  }

  function capture() {
    const scale = Math.min(1, MAX_SIDE / Math.max(video.videoWidth, video.videoHeight));
    const canvas = document.createElement("canvas");
    canvas.width = Math.round(video.videoWidth * scale);
    canvas.height = Math.round(video.videoHeight * scale);
    canvas.getContext("2d").drawImage(video, 0, 0, canvas.width, canvas.height);
    return new Promise((resolve, reject) => {
      canvas.toBlob((blob) => (blob ? resolve(blob) : reject(new Error("no frame"))), "image/jpeg", QUALITY);
    });
  }

  const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

  async function send() {
    const seq = ++sent;
    const mine = generation;
    const signal = requests.signal;
    inFlight += 1;
    try {
      const started = performance.now();
      const body = new FormData(form); // the model and the shown settings (picker.js disables the rest)
      body.set("file", await capture(), `frame-${seq}.jpg`);
      const response = await fetch(form.action, {
        method: "POST",
        body,
        headers: { Accept: "application/json" },
        signal,
      });
      const answer = await response.json().catch(() => ({}));
      if (!running || signal.aborted) return;
      if (!response.ok || answer.event === "error") {
        failed(seq, answer.title || `Error ${response.status}`, answer.message || "The UI answered something unexpected.");
        await sleep(response.status >= 500 ? PAUSE_AFTER_FAILURE_MS : PAUSE_AFTER_REFUSAL_MS);
        return;
      }
      count(performance.now() - started, answer.server_ms);
      if (mine === generation) draw(seq, answer);
    } catch (err) {
      if (!running || signal.aborted) return;
      failed(seq, "The UI is not reachable", "The page could not reach its server.");
      await sleep(PAUSE_AFTER_FAILURE_MS);
    } finally {
      inFlight -= 1;
      pump();
    }
  }

  // Send the camera's newest frame while a slot is free and it has not been sent.
  function pump() {
    const slots = Number(inFlightChoice.value) || 1;
    while (running && fresh && video.videoWidth && inFlight < slots) {
      fresh = false;
      send();
    }
  }

  // Marks each new camera frame as fresh, then sends it if a slot is free. Each start watches
  // anew: a watch left from an earlier start ends at its next frame.
  function watchFrames() {
    const run = requests;
    const watching = () => running && run === requests;
    const onFrame = () => {
      shown += 1;
      fresh = true;
      pump();
    };
    if ("requestVideoFrameCallback" in video) {
      const next = () => {
        if (!watching()) return;
        onFrame();
        video.requestVideoFrameCallback(next);
      };
      video.requestVideoFrameCallback(next);
      return;
    }
    let time = -1;
    const poll = () => {
      if (!watching()) return;
      if (video.currentTime !== time) {
        time = video.currentTime;
        onFrame();
      }
      setTimeout(poll, 10);
    };
    poll();
  }

  function stop(message) {
    running = false;
    if (requests) requests.abort(); // frames in flight: their answers are no longer wanted
    if (camera) for (const track of camera.getTracks()) track.stop();
    camera = null;
    video.srcObject = null;
    figure.hidden = true;
    clearDrawing();
    startButton.disabled = false;
    stopButton.disabled = true;
    state.textContent = message || "Stopped.";
  }

  async function start() {
    errorCard.hidden = true;
    if (!window.isSecureContext || !navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
      showError(
        "camera-unavailable",
        "This browser gives this page no camera",
        "Browsers give the camera only to pages served over HTTPS or from this computer " +
          "(http://localhost or http://127.0.0.1). Open the UI that way, or put it behind HTTPS.",
      );
      return;
    }
    startButton.disabled = true;
    state.textContent = "Asking for the camera…";
    try {
      camera = await navigator.mediaDevices.getUserMedia({
        video: { width: { ideal: 640 }, height: { ideal: 480 } },
        audio: false,
      });
    } catch (err) {
      camera = null;
      cameraRefused(err);
      startButton.disabled = false;
      state.textContent = "No camera.";
      return;
    }
    for (const track of camera.getVideoTracks()) {
      track.addEventListener("ended", () => stop("The camera stopped (unplugged, or taken by the system)."));
    }
    video.srcObject = camera;
    figure.hidden = false;
    await video.play().catch(() => {});
    resetCounters();
    clearDrawing();
    requests = new AbortController();
    running = true;
    startedAt = performance.now();
    stopButton.disabled = false;
    state.textContent = `Live: ${video.videoWidth}×${video.videoHeight} from the camera.`;
    watchFrames();
  }

  startButton.addEventListener("click", start);
  stopButton.addEventListener("click", () => stop());
  form.addEventListener("submit", (event) => event.preventDefault());
  // another model or setting: answers to the frames sent before are not drawn
  form.addEventListener("change", (event) => {
    if (event.target === inFlightChoice) return;
    generation += 1;
    clearDrawing();
  });
  inFlightChoice.addEventListener("change", pump);
  window.addEventListener("pagehide", () => stop());
});

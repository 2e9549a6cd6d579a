// The image page without reloading: the same form post, sent with fetch; the server answers the
// result fragment (already escaped by its templates, a detector's boxes drawn in it as SVG),
// which replaces the result section. The chosen photo stays chosen: picking another model or
// changing a setting runs it again.
"use strict";
document.addEventListener("DOMContentLoaded", () => {
  const form = document.getElementById("upload");
  const input = document.getElementById("file");
  const drop = document.getElementById("drop");
  const result = document.getElementById("result");
  const button = document.getElementById("submit");
  let inFlight = null;

  function showFailure(title, message) {
    const card = document.createElement("div");
    card.className = "card error";
    card.setAttribute("role", "alert");
    const h2 = document.createElement("h2");
    h2.className = "error-title";
    h2.textContent = title;
    const p = document.createElement("p");
    p.className = "error-message";
    p.textContent = message;
    card.append(h2, p);
    result.replaceChildren(card);
  }

  async function send() {
    if (!input.files.length) return;
    if (inFlight) inFlight.abort(); // only the newest choice's answer is shown
    const request = new AbortController();
    inFlight = request;
    button.disabled = true;
    button.textContent = "Running…";
    try {
      const response = await fetch(form.action, {
        method: "POST",
        body: new FormData(form),
        headers: { "X-Requested-With": "fetch" },
        signal: request.signal,
      });
      const html = await response.text();
      if (inFlight === request) result.innerHTML = html;
    } catch (err) {
      if (err.name !== "AbortError") {
        showFailure("The UI is not reachable", "The page could not reach its server; is it still running?");
      }
    } finally {
      if (inFlight === request) {
        inFlight = null;
        button.disabled = false;
        button.textContent = "Run";
      }
    }
  }

  form.addEventListener("submit", (event) => { event.preventDefault(); send(); });
  // a photo chosen, another model picked or a setting changed: (re)run the chosen photo
  form.addEventListener("change", send);
  for (const name of ["dragenter", "dragover"]) {
    drop.addEventListener(name, (event) => { event.preventDefault(); drop.classList.add("dragging"); });
  }
  for (const name of ["dragleave", "drop"]) {
    drop.addEventListener(name, () => drop.classList.remove("dragging"));
  }
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    if (event.dataTransfer && event.dataTransfer.files.length) {
      input.files = event.dataTransfer.files;
      send();
    }
  });
});

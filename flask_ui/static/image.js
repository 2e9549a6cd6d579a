// The image page without reloading: the same form post, sent with fetch; the server answers the
// result fragment (already escaped by its templates), which replaces the result section.
"use strict";
document.addEventListener("DOMContentLoaded", () => {
  const form = document.getElementById("upload");
  const input = document.getElementById("file");
  const drop = document.getElementById("drop");
  const result = document.getElementById("result");
  const button = document.getElementById("submit");

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
    button.disabled = true;
    button.textContent = "Classifying…";
    try {
      const response = await fetch(form.action, {
        method: "POST",
        body: new FormData(form),
        headers: { "X-Requested-With": "fetch" },
      });
      result.innerHTML = await response.text();
    } catch (err) {
      showFailure("The UI is not reachable", "The page could not reach its server; is it still running?");
    } finally {
      button.disabled = false;
      button.textContent = "Classify";
      form.reset();
    }
  }

  form.addEventListener("submit", (event) => { event.preventDefault(); send(); });
  input.addEventListener("change", send);
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

// The model picker: only the settings of the chosen model's task are shown and sent (the others'
// fieldsets are hidden and disabled), with the chosen model's own defaults as placeholders.
// Without this script every field shows, and the server ignores those of the other task.
"use strict";
document.addEventListener("DOMContentLoaded", () => {
  const select = document.getElementById("model");
  if (!select) return;
  const form = select.form;

  function update() {
    const option = select.selectedOptions[0];
    const task = option ? option.dataset.task : "";
    for (const fieldset of form.querySelectorAll("fieldset[data-task]")) {
      const applies = fieldset.dataset.task === task;
      fieldset.hidden = !applies;
      fieldset.disabled = !applies;
    }
    const threshold = form.querySelector("#score_threshold");
    if (threshold && option && option.dataset.scoreThreshold) threshold.placeholder = option.dataset.scoreThreshold;
    const faceThreshold = form.querySelector("#face_score_threshold");
    if (faceThreshold && option && option.dataset.faceScoreThreshold) {
      faceThreshold.placeholder = option.dataset.faceScoreThreshold;
    }
    form.dataset.task = task;
  }

  select.addEventListener("change", update);
  update();
});

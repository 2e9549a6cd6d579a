// The boxes of a detector or a face model over a picture, shared by the video and live pages: an
// SVG whose viewBox is the picture's size as the server saw it (`width` x `height`), so the
// browser scales every shape with the picture, whatever size it is shown at. The shapes (box,
// label tag, landmark dots) come computed from the server (flask_ui/overlay.py), the same as the
// image page's template draws. Text goes in through textContent only.
"use strict";
window.VisionOverlay = (() => {
  const SVG = "http://www.w3.org/2000/svg";

  function svg(name, attributes) {
    const element = document.createElementNS(SVG, name);
    for (const [key, value] of Object.entries(attributes)) element.setAttribute(key, String(value));
    return element;
  }

  // An answer's boxes (`detections`: shapes with `box`, `tag`, `text_at`, `text`, `points`).
  function overlay(answer) {
    const layer = svg("svg", {
      class: "overlay",
      viewBox: `0 0 ${Number(answer.width)} ${Number(answer.height)}`,
      preserveAspectRatio: "none",
      "aria-hidden": "true",
      "font-size": Number(answer.font_size),
    });
    const radius = Number(answer.point_radius) || 2;
    for (const d of [...answer.detections].reverse()) { // the highest score drawn last, on top
      const [x1, y1, x2, y2] = d.box.map(Number);
      const [tx, ty, tw, th] = d.tag.map(Number);
      const group = svg("g", { class: "box" });
      group.dataset.label = d.label;
      group.dataset.score = String(d.score);
      group.append(svg("rect", { class: "outline", x: x1, y: y1, width: x2 - x1, height: y2 - y1, stroke: d.colour }));
      for (const [x, y] of d.points || []) {
        group.append(svg("circle", { class: "point", cx: Number(x), cy: Number(y), r: radius, fill: d.colour }));
      }
      group.append(svg("rect", { class: "tag", x: tx, y: ty, width: tw, height: th, fill: d.colour }));
      const text = svg("text", { class: "tag-text", x: Number(d.text_at[0]), y: Number(d.text_at[1]), fill: d.ink });
      text.textContent = d.text;
      group.append(text);
      layer.append(group);
    }
    return layer;
  }

  function percent(p, digits = 0) {
    return `${(Number(p) * 100).toFixed(digits)}%`;
  }

  // An answer in words: the boxes' labels, the faces' top expressions, or the top class.
  function summary(answer) {
    if (answer.task === "face_expression") {
      if (!answer.faces.length) return "no face found";
      return answer.faces.map((f) => `${f.top} ${percent(f.prob)}`).join(", ");
    }
    if (answer.task === "detection") {
      if (!answer.detections.length) return "nothing found";
      return answer.detections.map((d) => `${d.label} ${percent(d.score)}`).join(", ");
    }
    if (answer.label === undefined) return "";
    return `${answer.label} ${percent(answer.prob, 1)}`;
  }

  function hasBoxes(answer) {
    return answer.task === "detection" || answer.task === "face_expression";
  }

  return { overlay, summary, hasBoxes, percent };
})();

"""The parity check of a new repository entry: both runtimes, loaded by the classes the services
use, run on real photos through the serving preprocessing and postprocessing, and must agree.

- classification: the top-5 classes identical and the probabilities (the softmax of logits, or
  the model's own probabilities) within `PARITY_MAX_ABS_DIFF`;
- detection: the same objects (count, classes, in order) with boxes within `BOX_MAX_DIFF_PX`
  pixels of the photo and scores within `SCORE_MAX_DIFF`, at the model's default thresholds; a
  detector with landmarks (faces) also has every landmark within `BOX_MAX_DIFF_PX` pixels, and
  every anchor's class scores (found or not: most photos hold no face) are within `SCORE_MAX_DIFF`.

Each runtime must also answer a photo the same at batch 1 and at batch N (the dynamic batch axis).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from export.errors import ExportError
from visionserve.postprocessing import softmax
from visionserve.repository import ModelEntry, ModelRepository
from visionserve.tasks import Prepared, create_task

PARITY_MAX_ABS_DIFF = 1e-4
PARITY_TOPK = 5
BOX_MAX_DIFF_PX = 1.0
SCORE_MAX_DIFF = 1e-3
_MAX_PHOTO_PIXELS = 50_000_000


def _outputs(entry: ModelEntry, batch: np.ndarray) -> dict[str, np.ndarray]:
    """Both runtimes' raw outputs for `batch`, each checked at batch 1 against batch N."""
    from visionserve.runtimes.onnx import OnnxRuntime
    from visionserve.runtimes.torch import TorchRuntime

    results = {}
    for runtime in (
        OnnxRuntime(entry, threads=torch.get_num_threads()),
        TorchRuntime(entry, threads=torch.get_num_threads()),
    ):
        runtime.load()
        # the dynamic batch axis at its largest (the photos in batches of max_batch_size), and at 1
        step = entry.config.max_batch_size
        whole = np.concatenate(
            [runtime.predict_batch(batch[i : i + step]) for i in range(0, len(batch), step)]
        )
        single = runtime.predict_batch(batch[:1])
        scale = max(1.0, float(np.abs(single).max()))
        if not np.allclose(whole[:1], single, atol=1e-4 * scale):
            raise ExportError(
                f"parity check failed: {runtime.backend} answers the same photo differently at batch 1 "
                f"and at batch {min(len(batch), step)} (is the model deterministic?); nothing was written"
            )
        results[runtime.backend] = whole
        runtime.close()
    return results


def check_parity(entry_root: Path, photos: list[Path]) -> dict[str, object]:
    """Run both runtimes, as served, on the photos; what was compared and whether it `passed`."""
    entry = ModelRepository(entry_root.parent).get(entry_root.name)
    task = create_task(entry, max_image_pixels=_MAX_PHOTO_PIXELS)
    prepared = [task.preprocess(p.read_bytes()) for p in photos]
    outputs = _outputs(entry, np.stack([p.tensor for p in prepared]))
    if entry.config.task == "detection":
        return _detection_parity(task, prepared, outputs, [p.name for p in photos])
    return _classification_parity(entry, outputs, [p.name for p in photos])


def _classification_parity(
    entry: ModelEntry, outputs: dict[str, np.ndarray], names: list[str]
) -> dict[str, object]:
    if entry.config.output.kind == "logits":
        onnx_probs, torch_probs = softmax(outputs["onnx"]), softmax(outputs["torch"])
    else:
        onnx_probs, torch_probs = outputs["onnx"].astype(np.float32), outputs["torch"].astype(np.float32)
    max_diff = float(np.abs(onnx_probs - torch_probs).max())
    k = min(PARITY_TOPK, onnx_probs.shape[1])
    per_photo = []
    identical = True
    for name, row_onnx, row_torch in zip(names, onnx_probs, torch_probs, strict=True):
        top_onnx = np.argsort(-row_onnx, kind="stable")[:k].tolist()
        top_torch = np.argsort(-row_torch, kind="stable")[:k].tolist()
        identical &= top_onnx == top_torch
        per_photo.append(
            {"photo": name, "top1": entry.labels[top_onnx[0]], "prob": round(float(row_onnx[top_onnx[0]]), 4)}
        )
    return {
        "photos": per_photo,
        "topk": k,
        "topk_identical": identical,
        "max_abs_prob_diff": max_diff,
        "threshold": PARITY_MAX_ABS_DIFF,
        "passed": identical and max_diff < PARITY_MAX_ABS_DIFF,
    }


def _detection_parity(
    task: object, prepared: list[Prepared], outputs: dict[str, np.ndarray], names: list[str]
) -> dict[str, object]:
    from visionserve.tasks.detection import Detections, DetectionTask

    assert isinstance(task, DetectionTask)
    params = task.parameters({})
    per_photo = []
    same = True
    box_diff = score_diff = landmark_diff = 0.0
    for i, name in enumerate(names):
        meta = prepared[i].meta
        found = {
            backend: task.postprocess(outputs[backend][i], meta, params) for backend in ("onnx", "torch")
        }
        onnx, torch_ = found["onnx"], found["torch"]
        assert isinstance(onnx, Detections) and isinstance(torch_, Detections)
        classes_onnx = [d.index for d in onnx.detections]
        if classes_onnx != [d.index for d in torch_.detections]:
            same = False
        else:
            for a, b in zip(onnx.detections, torch_.detections, strict=True):
                corners_a = np.array([a.box.x1, a.box.y1, a.box.x2, a.box.y2])
                corners_b = np.array([b.box.x1, b.box.y1, b.box.x2, b.box.y2])
                box_diff = max(box_diff, float(np.abs(corners_a - corners_b).max()))
                score_diff = max(score_diff, abs(a.score - b.score))
                if a.landmarks:
                    points_a, points_b = np.array(a.landmarks), np.array(b.landmarks)
                    landmark_diff = max(landmark_diff, float(np.abs(points_a - points_b).max()))
        top = onnx.detections[0] if onnx.detections else None
        per_photo.append(
            {
                "photo": name,
                "objects": len(onnx.detections),
                "top": top.label if top else None,
                "score": round(top.score, 4) if top else None,
            }
        )
    result: dict[str, object] = {
        "photos": per_photo,
        "same_objects": same,
        "max_box_diff_px": box_diff,
        "max_score_diff": score_diff,
        "thresholds": {"box_px": BOX_MAX_DIFF_PX, "score": SCORE_MAX_DIFF},
        "passed": same and box_diff <= BOX_MAX_DIFF_PX and score_diff <= SCORE_MAX_DIFF,
    }
    if task.landmarks:
        scores = slice(4, 4 + task.classes)
        raw_diff = float(np.abs(outputs["onnx"][..., scores] - outputs["torch"][..., scores]).max())
        result["max_landmark_diff_px"] = landmark_diff
        result["max_anchor_score_diff"] = raw_diff
        result["passed"] = (
            bool(result["passed"]) and landmark_diff <= BOX_MAX_DIFF_PX and raw_diff <= SCORE_MAX_DIFF
        )
    return result


def describe(parity: dict[str, object]) -> str:
    """One line for the export's progress output."""
    if "same_objects" in parity:
        landmarks = (
            f", max landmark diff {parity['max_landmark_diff_px']:.3f} px, max score diff over all "
            f"anchors {parity['max_anchor_score_diff']:.2e}"
            if "max_landmark_diff_px" in parity
            else ""
        )
        return (
            f"    same objects: {parity['same_objects']}, max box diff {parity['max_box_diff_px']:.3f} px "
            f"(threshold {BOX_MAX_DIFF_PX}){landmarks}, max score diff {parity['max_score_diff']:.2e} "
            f"(threshold {SCORE_MAX_DIFF:.0e})"
        )
    return (
        f"    top-{parity['topk']} identical: {parity['topk_identical']}, "
        f"max |p_onnx - p_torch| = {parity['max_abs_prob_diff']:.2e} (threshold {PARITY_MAX_ABS_DIFF:.0e})"
    )

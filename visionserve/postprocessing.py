"""Model output -> answers: softmax, top-k, labels. Shared by every runtime and protocol."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ClassScore:
    """One class of one image: its label, probability and index in the model's output."""

    label: str
    prob: float
    index: int


def softmax(scores: np.ndarray) -> np.ndarray:
    """Row-wise softmax of a (N, C) array, computed stably in float64 and returned as float32."""
    shifted = scores.astype(np.float64) - scores.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    probs: np.ndarray = (exp / exp.sum(axis=-1, keepdims=True)).astype(np.float32)
    return probs


def top_k(probs: np.ndarray, k: int, labels: tuple[str, ...]) -> list[ClassScore]:
    """The k most probable classes of one row, most probable first (ties: lower index first)."""
    # a stable sort of 1000 scores costs ~20 us and orders ties exactly (lower index first)
    order = np.argsort(-probs, kind="stable")[:k]
    return [ClassScore(label=labels[i], prob=float(probs[i]), index=int(i)) for i in order]


def postprocess(
    outputs: np.ndarray, k: int, labels: tuple[str, ...], *, kind: str = "logits"
) -> list[list[ClassScore]]:
    """A batch of model outputs (N, C) -> top-k predictions per image."""
    probs = softmax(outputs) if kind == "logits" else outputs.astype(np.float32)
    return [top_k(row, k, labels) for row in probs]

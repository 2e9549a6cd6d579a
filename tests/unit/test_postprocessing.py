"""Softmax, top-k and labels (visionserve/postprocessing.py)."""

from __future__ import annotations

import numpy as np
import pytest

from visionserve.postprocessing import ClassScore, postprocess, softmax, top_k

LABELS = tuple(f"class_{i}" for i in range(6))


def test_softmax_rows_sum_to_one() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(scale=5.0, size=(4, 1000)).astype(np.float32)
    probs = softmax(logits)
    assert probs.shape == (4, 1000)
    assert probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
    assert (probs >= 0).all()
    # row-wise: each row's order is its logits' order
    np.testing.assert_array_equal(probs.argmax(axis=1), logits.argmax(axis=1))


def test_softmax_known_values() -> None:
    probs = softmax(np.array([[0.0, np.log(3.0)], [1.0, 1.0]], dtype=np.float32))
    np.testing.assert_allclose(probs, [[0.25, 0.75], [0.5, 0.5]], rtol=1e-6)


@pytest.mark.parametrize("scale", [1e4, -1e4, 3e38])
def test_softmax_is_stable_with_huge_logits(scale: float) -> None:
    logits = np.array([[scale, scale - 1.0, 0.0, scale - 1.0]], dtype=np.float32)
    with np.errstate(over="raise", invalid="raise", divide="raise"):  # no inf, no NaN
        probs = softmax(logits)
    assert np.isfinite(probs).all()
    np.testing.assert_allclose(probs.sum(), 1.0, rtol=1e-6)
    if scale > 1e10:
        # float32 cannot tell scale from scale - 1: they tie
        np.testing.assert_allclose(probs[0], [1 / 3, 1 / 3, 0.0, 1 / 3], atol=1e-6)
    elif scale > 0:
        e = np.exp(-1.0)
        np.testing.assert_allclose(
            probs[0], [1 / (1 + 2 * e), e / (1 + 2 * e), 0.0, e / (1 + 2 * e)], rtol=1e-5
        )
    else:
        np.testing.assert_allclose(probs[0], [0.0, 0.0, 1.0, 0.0], atol=1e-6)


def test_softmax_is_shift_invariant() -> None:
    logits = np.array([[1.0, 2.0, 3.0]], dtype=np.float32)
    np.testing.assert_allclose(softmax(logits), softmax(logits + 1000.0), rtol=1e-6)


def test_top_k_order() -> None:
    probs = np.array([0.1, 0.4, 0.05, 0.3, 0.15, 0.0], dtype=np.float32)
    result = top_k(probs, 3, LABELS)
    assert [score.index for score in result] == [1, 3, 4]
    assert [score.label for score in result] == ["class_1", "class_3", "class_4"]
    assert result[0] == ClassScore(label="class_1", prob=float(np.float32(0.4)), index=1)
    assert all(isinstance(score.prob, float) and isinstance(score.index, int) for score in result)


def test_top_k_ties_lower_index_first() -> None:
    probs = np.array([0.1, 0.2, 0.2, 0.1, 0.2, 0.2], dtype=np.float32)
    assert [score.index for score in top_k(probs, 6, LABELS)] == [1, 2, 4, 5, 0, 3]
    uniform = np.full(1000, 1e-3, dtype=np.float32)
    assert [score.index for score in top_k(uniform, 5, tuple(map(str, range(1000))))] == [0, 1, 2, 3, 4]


def test_top_k_larger_than_classes_returns_all() -> None:
    probs = np.array([0.1, 0.2, 0.3, 0.15, 0.05, 0.2], dtype=np.float32)
    result = top_k(probs, 50, LABELS)
    assert len(result) == len(LABELS)
    assert [score.index for score in result] == [2, 1, 5, 3, 0, 4]


def test_postprocess_logits() -> None:
    logits = np.array([[0.0, 1.0, 2.0, 3.0, 4.0, 5.0], [5.0, 4.0, 3.0, 2.0, 1.0, 0.0]], dtype=np.float32)
    result = postprocess(logits, 2, LABELS)
    assert len(result) == 2
    assert [s.index for s in result[0]] == [5, 4]
    assert [s.index for s in result[1]] == [0, 1]
    expected = np.exp(5.0) / np.exp(np.arange(6.0)).sum()
    assert result[0][0].prob == pytest.approx(expected, rel=1e-5)
    assert result[1][0].label == "class_0"


def test_postprocess_probabilities_passthrough() -> None:
    probs = np.array([[0.05, 0.5, 0.1, 0.2, 0.1, 0.05]], dtype=np.float64)
    (result,) = postprocess(probs, 3, LABELS, kind="probabilities")
    # used as they are: no second softmax (which would flatten 0.5 to ~0.23)
    assert [s.index for s in result] == [1, 3, 2]
    assert [s.prob for s in result] == pytest.approx([0.5, 0.2, 0.1])


def test_postprocess_logits_is_not_passthrough() -> None:
    probs = np.array([[0.05, 0.5, 0.1, 0.2, 0.1, 0.05]], dtype=np.float32)
    (result,) = postprocess(probs, 1, LABELS, kind="logits")
    assert result[0].prob < 0.3

"""ONNX Runtime on CPU holds each model's weights once per process (issue 15's memory target): a
lane of 1-thread sessions is ONE session used by several callers at once, and the adaptive
layout's sessions compute with one shared copy of the optimised weights. Over the real bundled
models: outputs equal a plain session's, concurrent calls stay correct, and the sessions really
read the shared buffers."""

from __future__ import annotations

import logging
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from tests.conftest import DETECTOR, photo_bytes
from visionserve.cpu import FIXED, NARROW, WIDE, Lane, on_lane
from visionserve.preprocessing import ImagePreprocessor
from visionserve.repository import ModelEntry, ModelRepository
from visionserve.runtimes.onnx import PREPACKING_OPS, OnnxRuntime, graph_initializers

ADAPTIVE = (Lane(WIDE, 1, 2), Lane(NARROW, 2, 1))
"""The default layout on 2 cores: one 2-thread session alone, two 1-thread slots under load."""
PHOTOS = ("chelsea.png", "coffee.png", "flower.jpg", "astronaut.png")
MODELS = ("efficientnet_lite0", DETECTOR, "retinaface_mnet025", "mini_xception")


def lane_sessions(runtime: OnnxRuntime, kind: str) -> list[ort.InferenceSession]:
    """The sessions in lane `kind`'s free queue (taken out and put back: nothing runs meanwhile)."""
    free = runtime._free[kind]
    sessions = [free.get_nowait() for _ in range(free.qsize())]
    for session in sessions:
        free.put(session)
    return sessions


def photo_batch(entry: ModelEntry, names: tuple[str, ...] = PHOTOS) -> np.ndarray:
    preprocessor = ImagePreprocessor(entry.config.input, max_image_pixels=50_000_000)
    return np.stack([preprocessor(photo_bytes(name)) for name in names])


@pytest.fixture(scope="module")
def entries(real_repository: Path, real_detector: ModelEntry, real_faces: object) -> dict[str, ModelEntry]:
    """The four bundled ONNX models (exported first if missing, by the fixtures named)."""
    repository = ModelRepository(real_repository)
    return {name: repository.get(name) for name in MODELS}


@pytest.fixture(scope="module")
def adaptive(entries: dict[str, ModelEntry]) -> Iterator[dict[str, OnnxRuntime]]:
    """Each model with the adaptive layout, as served by default on 2 cores."""
    runtimes = {
        name: OnnxRuntime(entry, threads=2, instances=2, lanes=ADAPTIVE) for name, entry in entries.items()
    }
    for runtime in runtimes.values():
        runtime.load()
    yield runtimes
    for runtime in runtimes.values():
        runtime.close()


@pytest.fixture(scope="module")
def plain(entries: dict[str, ModelEntry]) -> Iterator[dict[str, OnnxRuntime]]:
    """Each model as one plain 2-thread session of `model.onnx` (the fixed layout: nothing shared)."""
    runtimes = {name: OnnxRuntime(entry, threads=2) for name, entry in entries.items()}
    for runtime in runtimes.values():
        runtime.load()
    yield runtimes
    for runtime in runtimes.values():
        runtime.close()


def on(runtime: OnnxRuntime, kind: str, batch: np.ndarray) -> np.ndarray:
    with on_lane(kind):
        return runtime.predict_batch(batch)


@pytest.mark.parametrize("name", MODELS)
def test_the_narrow_lane_is_one_session_in_two_slots_beside_the_wide_one(
    name: str, adaptive: dict[str, OnnxRuntime]
) -> None:
    runtime = adaptive[name]
    (wide,) = lane_sessions(runtime, WIDE)
    narrow = lane_sessions(runtime, NARROW)
    assert len(narrow) == 2 and narrow[0] is narrow[1]
    assert wide is not narrow[0]
    assert runtime.sessions(NARROW) == 2 and runtime.sessions(WIDE) == 1 and runtime.sessions() == 3


@pytest.mark.parametrize("name", MODELS)
def test_the_sessions_share_one_copy_of_the_optimised_weights(
    name: str, adaptive: dict[str, OnnxRuntime], entries: dict[str, ModelEntry]
) -> None:
    runtime = adaptive[name]
    weights = runtime.shared_weights
    assert weights is not None and runtime.shared_arena
    assert weights.nbytes > 0.5 * entries[name].artefact_path("onnx").stat().st_size  # most of the model
    assert all(array.ctypes.data % 64 == 0 for array in weights.arrays.values())
    for kind in (WIDE, NARROW):
        for session in lane_sessions(runtime, kind):
            assert session._visionserve_weights is weights  # alive as long as the session


@pytest.mark.parametrize("name", MODELS)
def test_every_session_equals_a_plain_session_on_real_photos(
    name: str, adaptive: dict[str, OnnxRuntime], plain: dict[str, OnnxRuntime], entries: dict[str, ModelEntry]
) -> None:
    batch = photo_batch(entries[name])
    expected = plain[name].predict_batch(batch)
    for kind in (WIDE, NARROW):
        got = on(adaptive[name], kind, batch)
        assert got.shape == expected.shape
        assert np.abs(got - expected).max() <= 1e-6, kind


def test_the_sessions_compute_with_the_shared_buffers(entries: dict[str, ModelEntry]) -> None:
    """Zeroing a shared weight changes what every session computes, wide and narrow: none of them
    runs on a copy of its own."""
    runtime = OnnxRuntime(entries["efficientnet_lite0"], threads=2, instances=2, lanes=ADAPTIVE)
    runtime.load()
    try:
        assert runtime.shared_weights is not None
        batch = photo_batch(runtime.model, PHOTOS[:2])
        before = {kind: on(runtime, kind, batch) for kind in (WIDE, NARROW)}
        largest = max(runtime.shared_weights.arrays.values(), key=lambda array: array.nbytes)
        kept = largest.copy()
        largest[...] = 0
        try:
            for kind in (WIDE, NARROW):
                assert np.abs(on(runtime, kind, batch) - before[kind]).max() > 1e-3, kind
        finally:
            largest[...] = kept
        for kind in (WIDE, NARROW):
            assert np.array_equal(on(runtime, kind, batch), before[kind])
    finally:
        runtime.close()


@pytest.mark.parametrize("name", ["efficientnet_lite0", "mini_xception"])
def test_two_threads_at_once_on_the_one_narrow_session_get_their_own_answers(
    name: str, adaptive: dict[str, OnnxRuntime], plain: dict[str, OnnxRuntime], entries: dict[str, ModelEntry]
) -> None:
    runtime = adaptive[name]
    batches = [photo_batch(entries[name], (photo,)) for photo in PHOTOS]
    expected = [plain[name].predict_batch(batch) for batch in batches]
    start = threading.Barrier(2)
    wrong: list[tuple[int, int]] = []

    def work(first: int) -> None:
        start.wait()
        with on_lane(NARROW):
            for step in range(40):
                index = (first + step) % len(batches)
                if np.abs(runtime.predict_batch(batches[index]) - expected[index]).max() > 1e-6:
                    wrong.append((first, index))

    threads = [threading.Thread(target=work, args=(first,)) for first in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not wrong
    assert runtime.sessions(NARROW) == 2


def test_sessions_with_a_pool_are_never_shared_but_share_the_weights(entries: dict[str, ModelEntry]) -> None:
    """Narrow sessions of 2 threads (a larger machine's layout) are distinct sessions: concurrent
    runs on one would share its pool. They still use the one copy of the weights."""
    runtime = OnnxRuntime(
        entries["mini_xception"], threads=2, instances=2, lanes=(Lane(WIDE, 1, 2), Lane(NARROW, 2, 2))
    )
    runtime.load()
    try:
        narrow = lane_sessions(runtime, NARROW)
        (wide,) = lane_sessions(runtime, WIDE)
        assert len({id(session) for session in [*narrow, wide]}) == 3
        assert runtime.shared_weights is not None
        assert all(session._visionserve_weights is runtime.shared_weights for session in [*narrow, wide])
    finally:
        runtime.close()


def test_a_fixed_layout_of_one_thread_instances_is_one_session(entries: dict[str, ModelEntry]) -> None:
    runtime = OnnxRuntime(entries["mini_xception"], threads=1, instances=2)
    runtime.load()
    try:
        first, second = lane_sessions(runtime, FIXED)
        assert first is second and runtime.sessions() == 2
        assert runtime.shared_weights is None  # one session: nothing to share, model.onnx as it is
    finally:
        runtime.close()


def test_one_session_loads_model_onnx_as_it_is(plain: dict[str, OnnxRuntime]) -> None:
    runtime = plain["efficientnet_lite0"]
    assert runtime.shared_weights is None and not runtime.shared_arena
    (session,) = lane_sessions(runtime, FIXED)
    assert not hasattr(session, "_visionserve_weights")


def test_without_a_writable_temp_folder_each_session_keeps_its_own_weights(
    entries: dict[str, ModelEntry], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def refuse(*args: object, **kwargs: object) -> str:
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(tempfile, "mkdtemp", refuse)
    runtime = OnnxRuntime(entries["mini_xception"], threads=2, instances=2, lanes=ADAPTIVE)
    with caplog.at_level(logging.WARNING, logger="visionserve.runtimes.onnx"):
        runtime.load()
    try:
        assert runtime.shared_weights is None
        assert "keep a copy of the weights each" in caplog.text and "Read-only" in caplog.text
        narrow = lane_sessions(runtime, NARROW)
        assert narrow[0] is narrow[1]  # still one 1-thread session for both slots
        batch = photo_batch(runtime.model, PHOTOS[:2])
        assert np.abs(on(runtime, WIDE, batch) - on(runtime, NARROW, batch)).max() <= 1e-6
    finally:
        runtime.close()


def test_close_drops_the_sessions_then_the_weights(entries: dict[str, ModelEntry]) -> None:
    runtime = OnnxRuntime(entries["mini_xception"], threads=2, instances=2, lanes=ADAPTIVE)
    runtime.load()
    (wide,) = lane_sessions(runtime, WIDE)
    weights = runtime.shared_weights
    runtime.close()
    assert runtime.shared_weights is None and runtime.sessions() == 0
    assert wide._visionserve_weights is weights  # a session still held elsewhere keeps its weights


@pytest.mark.parametrize("name", MODELS)
def test_the_initializer_reader_matches_the_onnx_package(name: str, entries: dict[str, ModelEntry]) -> None:
    onnx = pytest.importorskip("onnx")
    from onnx import numpy_helper

    path = entries[name].artefact_path("onnx")
    model = onnx.load(str(path))
    prepacked = {value for node in model.graph.node if node.op_type in PREPACKING_OPS for value in node.input}
    expected = {
        tensor.name: numpy_helper.to_array(tensor)
        for tensor in model.graph.initializer
        if tensor.HasField("raw_data") and tensor.name not in prepacked
    }
    found = graph_initializers(path.read_bytes(), min_bytes=0)
    assert set(found) == set(expected)
    for key, array in expected.items():
        assert found[key].dtype == array.dtype and found[key].shape == array.shape
        assert np.array_equal(found[key], array)
        assert found[key].ctypes.data % 64 == 0
    large = graph_initializers(path.read_bytes())
    assert set(large) == {key for key, array in expected.items() if array.nbytes >= 1024}


def test_the_classifiers_gemm_weights_stay_with_each_session(entries: dict[str, ModelEntry]) -> None:
    """ONNX Runtime pre-packs a Gemm's weights per session; shared, they would be held twice."""
    onnx = pytest.importorskip("onnx")
    path = entries["efficientnet_lite0"].artefact_path("onnx")
    gemm = [node for node in onnx.load(str(path)).graph.node if node.op_type == "Gemm"]
    assert gemm
    found = graph_initializers(path.read_bytes(), min_bytes=0)
    assert not {value for node in gemm for value in node.input} & set(found)


def test_a_malformed_model_is_refused() -> None:
    with pytest.raises(ValueError, match="truncated"):
        graph_initializers(bytes([0x3A, 0x10, 0x01]))  # field 7 (graph), 16 bytes announced, 1 there
    assert graph_initializers(b"") == {}

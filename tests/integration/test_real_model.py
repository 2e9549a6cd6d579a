"""The real exported EfficientNet-Lite0 on real photos, through both runtimes and the HTTP API."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from tests.conftest import photo_bytes, wait_ready
from tests.fixtures import app_of
from visionserve.cpu import NARROW, WIDE, available_cpus, on_lane, plan_adaptive
from visionserve.photos import packaged_photos
from visionserve.postprocessing import postprocess, softmax
from visionserve.preprocessing import ImagePreprocessor
from visionserve.repository import InputSpec, ModelEntry
from visionserve.runtimes.base import ModelRuntime
from visionserve.runtimes.onnx import OnnxRuntime
from visionserve.runtimes.torch import TorchRuntime
from visionserve.settings import ServerSettings

pytestmark = pytest.mark.real_model

CATS = {"tabby", "tiger cat", "Persian cat", "Siamese cat", "Egyptian cat"}
COFFEE = {"espresso", "cup", "coffee mug"}
THREADS = available_cpus()


def _loaded(runtime: ModelRuntime) -> ModelRuntime:
    runtime.load()
    runtime.warmup(1)
    return runtime


@pytest.fixture(scope="module")
def onnx_runtime(real_entry: ModelEntry) -> Iterator[ModelRuntime]:
    runtime = _loaded(OnnxRuntime(real_entry, threads=THREADS))
    yield runtime
    runtime.close()


@pytest.fixture(scope="module")
def torch_eager(real_entry: ModelEntry) -> Iterator[ModelRuntime]:
    runtime = _loaded(TorchRuntime(real_entry, threads=THREADS, compile=False))
    yield runtime
    runtime.close()


@pytest.fixture(scope="module")
def torch_app(real_entry: ModelEntry) -> Iterator[TestClient]:
    """The HTTP app on the PyTorch runtime as deployed: compiled with inductor (slow warm-up)."""
    runtime = TorchRuntime(real_entry, threads=THREADS, compile=True)
    with TestClient(app_of(ServerSettings(), runtime)) as client:
        wait_ready(client, timeout_s=280)
        yield client


@pytest.fixture(scope="module")
def onnx_app(real_entry: ModelEntry) -> Iterator[TestClient]:
    with TestClient(app_of(ServerSettings(), OnnxRuntime(real_entry, threads=THREADS))) as client:
        wait_ready(client)
        yield client


def _classify(
    runtime: ModelRuntime, entry: ModelEntry, name: str, spec: InputSpec | None = None
) -> dict[str, float]:
    preprocessor = ImagePreprocessor(spec or entry.config.input, max_image_pixels=50_000_000)
    scores = runtime.predict_batch(preprocessor(photo_bytes(name))[np.newaxis])
    (top,) = postprocess(scores, 5, entry.labels)
    return {p.label: p.prob for p in top}


@pytest.mark.parametrize("runtime_name", ["onnx_runtime", "torch_eager"])
def test_real_photos_are_classified_confidently(
    runtime_name: str, request: pytest.FixtureRequest, real_entry: ModelEntry
) -> None:
    runtime = request.getfixturevalue(runtime_name)
    cat = _classify(runtime, real_entry, "chelsea.png")
    assert next(iter(cat)) in CATS
    assert sum(p for label, p in cat.items() if label in CATS) > 0.85  # measured 0.91
    coffee = _classify(runtime, real_entry, "coffee.png")
    assert next(iter(coffee)) == "espresso"
    assert coffee["espresso"] > 0.9  # measured 0.96
    flower = _classify(runtime, real_entry, "flower.jpg")
    assert next(iter(flower)) == "daisy"
    assert flower["daisy"] > 0.25  # measured 0.32


def test_configured_preprocessing_is_the_one_the_model_was_trained_with(
    onnx_runtime: ModelRuntime, real_entry: ModelEntry
) -> None:
    """EfficientNet-Lite wants (pixel - 127) / 128; torchvision's mean/std costs confidence."""
    spec = real_entry.config.input
    assert spec.mean == pytest.approx((127 / 255,) * 3) and spec.std == pytest.approx((128 / 255,) * 3)
    wrong = spec.model_copy(update={"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)})
    right_daisy = _classify(onnx_runtime, real_entry, "flower.jpg")["daisy"]
    wrong_daisy = _classify(onnx_runtime, real_entry, "flower.jpg", wrong).get("daisy", 0.0)
    assert right_daisy > 2 * wrong_daisy  # measured 0.32 vs 0.11


def _photo_batch(entry: ModelEntry) -> tuple[list[str], np.ndarray]:
    photos = packaged_photos()
    assert len(photos) >= 7, "scikit-image and scikit-learn photos are test requirements"
    preprocessor = ImagePreprocessor(entry.config.input, max_image_pixels=50_000_000)
    return [p.name for p in photos], np.stack([preprocessor(p.read_bytes()) for p in photos])


def _assert_parity(reference: np.ndarray, other: np.ndarray) -> None:
    p_ref, p_other = softmax(reference), softmax(other)
    assert np.abs(p_ref - p_other).max() < 1e-4
    for row_ref, row_other in zip(p_ref, p_other, strict=True):
        top_ref = np.argsort(-row_ref, kind="stable")[:5]
        top_other = np.argsort(-row_other, kind="stable")[:5]
        assert top_ref.tolist() == top_other.tolist()


def test_parity_onnx_vs_torch_eager(
    onnx_runtime: ModelRuntime, torch_eager: ModelRuntime, real_entry: ModelEntry
) -> None:
    _, batch = _photo_batch(real_entry)
    _assert_parity(onnx_runtime.predict_batch(batch), torch_eager.predict_batch(batch))


def test_export_recorded_its_parity(real_entry: ModelEntry) -> None:
    parity = real_entry.config.parity
    assert parity["passed"] is True and parity["topk_identical"] is True
    assert isinstance(parity["max_abs_prob_diff"], float) and parity["max_abs_prob_diff"] < 1e-4


def test_batch_axis_is_dynamic(
    onnx_runtime: ModelRuntime, torch_eager: ModelRuntime, real_entry: ModelEntry
) -> None:
    _, batch = _photo_batch(real_entry)
    for runtime in (onnx_runtime, torch_eager):
        whole = runtime.predict_batch(batch[:3])
        singles = np.concatenate([runtime.predict_batch(batch[i : i + 1]) for i in range(3)])
        np.testing.assert_allclose(whole, singles, atol=1e-4)


def _concurrent_answers(runtime: ModelRuntime, batch: np.ndarray, rounds: int = 6) -> list[np.ndarray]:
    """Each photo's scores, computed by `runtime.instances` threads calling at once."""
    with ThreadPoolExecutor(runtime.instances) as pool:
        jobs = [pool.submit(runtime.predict_batch, batch[i : i + 1]) for _ in range(rounds) for i in range(3)]
        return [job.result() for job in jobs]


@pytest.mark.parametrize("backend", ["onnx", "torch"])
def test_two_instances_compute_at_once_with_the_same_answers(
    backend: str, onnx_runtime: ModelRuntime, real_entry: ModelEntry
) -> None:
    runtime: ModelRuntime = (
        OnnxRuntime(real_entry, threads=1, instances=2)
        if backend == "onnx"
        else TorchRuntime(real_entry, threads=1, instances=2, compile=False)
    )
    _loaded(runtime)
    try:
        if backend == "onnx":
            assert isinstance(runtime, OnnxRuntime) and runtime.sessions() == 2  # a session each
        _, batch = _photo_batch(real_entry)
        expected = [onnx_runtime.predict_batch(batch[i : i + 1]) for i in range(3)]
        for k, scores in enumerate(_concurrent_answers(runtime, batch)):
            np.testing.assert_allclose(scores, expected[k % 3], atol=1e-4)
    finally:
        runtime.close()


def _check_http(client: TestClient) -> None:
    cat = client.post(
        "/predict/file?topk=5", files={"file": ("chelsea.png", photo_bytes("chelsea.png"), "image/png")}
    )
    assert cat.status_code == 200, cat.text
    assert cat.json()["prediction"] in CATS
    coffee = client.post("/predict", json={"image": base64.b64encode(photo_bytes("coffee.png")).decode()})
    assert coffee.status_code == 200 and coffee.json()["prediction"] == "espresso"
    assert coffee.json()["probability"] > 0.9
    flower = client.post(
        "/predict/b64", json={"image_base64": base64.b64encode(photo_bytes("flower.jpg")).decode()}
    )
    assert flower.status_code == 200 and flower.json()["prediction"] == "daisy"


def test_http_on_onnx(onnx_app: TestClient) -> None:
    _check_http(onnx_app)
    assert onnx_app.get("/models").json()["models"][0]["runtime"] == "onnx"


@pytest.mark.slow
def test_http_on_compiled_torch(torch_app: TestClient) -> None:
    _check_http(torch_app)
    assert torch_app.get("/models").json()["models"][0]["runtime"] == "torch"


@pytest.mark.slow
def test_parity_onnx_vs_compiled_torch(
    onnx_runtime: ModelRuntime, torch_app: TestClient, real_entry: ModelEntry
) -> None:
    """Compiling (inductor, frozen weights) keeps the numbers: same top-5, probabilities within 1e-4."""
    compiled = torch_app.app.state.registry.default.runtime  # type: ignore[attr-defined]
    assert compiled.compile
    _, batch = _photo_batch(real_entry)
    _assert_parity(onnx_runtime.predict_batch(batch), compiled.predict_batch(batch))
    _assert_parity(onnx_runtime.predict_batch(batch[:1]), compiled.predict_batch(batch[:1]))
    # one compiled module serves every instance's thread: called from two threads at once
    with ThreadPoolExecutor(2) as pool:
        both = list(pool.map(compiled.predict_batch, [batch[:2], batch[1:3]] * 3))
    for k, scores in enumerate(both):
        _assert_parity(onnx_runtime.predict_batch(batch[:2] if k % 2 == 0 else batch[1:3]), scores)


def test_pickled_pt2_is_refused(real_entry: ModelEntry, tmp_path: Path) -> None:
    """A .pt2 whose weights are stored pickled (arbitrary code on load) is refused before loading."""
    import json
    import zipfile

    from visionserve.errors import ConfigurationError
    from visionserve.runtimes.torch import check_pickle_free

    source = real_entry.artefact_path("torch")
    check_pickle_free(source)  # the exported one passes
    tampered = tmp_path / "model.pt2"
    with zipfile.ZipFile(source) as src, zipfile.ZipFile(tampered, "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            if item.filename.endswith("model_weights_config.json"):
                config = json.loads(data)
                first = next(iter(config["config"]))
                config["config"][first]["use_pickle"] = True
                data = json.dumps(config).encode()
            dst.writestr(item, data)
    with pytest.raises(ConfigurationError, match="pickled"):
        check_pickle_free(tampered)


def test_an_adaptive_runtime_answers_as_a_fixed_one_on_every_kind_of_session(
    onnx_runtime: ModelRuntime, real_entry: ModelEntry
) -> None:
    """Issue 15: a wide (2-thread) and narrow (1-thread) sessions, sharing one CPU arena, give the
    fixed runtime's scores on the real photos, within 1e-5, called one by one and concurrently."""
    runtime = OnnxRuntime(real_entry, threads=2, instances=2, lanes=plan_adaptive(cores=2).lanes)
    _loaded(runtime)
    try:
        assert runtime.sessions(WIDE) == 1 and runtime.sessions(NARROW) == 2 and runtime.shared_arena
        _, batch = _photo_batch(real_entry)
        expected = onnx_runtime.predict_batch(batch)
        for kind in (WIDE, NARROW):
            with on_lane(kind):
                np.testing.assert_allclose(runtime.predict_batch(batch), expected, atol=1e-5, rtol=0)
                single = np.concatenate([runtime.predict_batch(batch[i : i + 1]) for i in range(len(batch))])
                np.testing.assert_allclose(single, expected, atol=1e-5, rtol=0)

        def on(kind: str, row: int) -> np.ndarray:
            with on_lane(kind):
                return runtime.predict_batch(batch[row : row + 1])

        with ThreadPoolExecutor(3) as pool:
            kinds = (WIDE, NARROW, NARROW)
            jobs = [(row, pool.submit(on, kind, row)) for row in range(len(batch)) for kind in kinds]
            for row, job in jobs:
                np.testing.assert_allclose(job.result(), expected[row : row + 1], atol=1e-5, rtol=0)
    finally:
        runtime.close()


def test_the_adaptive_default_serves_the_real_model_with_the_same_answers(real_entry: ModelEntry) -> None:
    """The registry as served by default (adaptive: lone requests on the wide session, a crowd on
    the narrow ones) answers every photo as the fixed 1 x 2 layout does."""
    import asyncio

    from visionserve.cpu import layout_summary
    from visionserve.serving.registry import ModelRegistry

    photos = [photo_bytes(name) for name in ("chelsea.png", "coffee.png", "astronaut.png")]

    async def answers(runtime: ModelRuntime) -> tuple[list[object], dict[str, int]]:
        registry = ModelRegistry([runtime], ServerSettings(preprocess_workers=2), cores=2)
        await registry.start()
        model = registry.default
        lone = [await model.predict(photo, {"topk": 3}) for photo in photos]  # type: ignore[union-attr]
        crowd = await asyncio.gather(*(model.predict(photos[i % 3], {"topk": 3}) for i in range(24)))  # type: ignore[union-attr]
        runs = dict(model.batcher.lane_runs)  # type: ignore[union-attr]
        await registry.stop()
        return [r.output for r in lone + list(crowd)], runs

    lanes = plan_adaptive(cores=2).lanes
    adaptive, runs = asyncio.run(answers(OnnxRuntime(real_entry, threads=2, instances=2, lanes=lanes)))
    fixed, _ = asyncio.run(answers(OnnxRuntime(real_entry, threads=2)))
    assert layout_summary(lanes) == "adaptive: 1x2 for a lone request, 2x1 under load"
    assert runs.get(WIDE, 0) >= 3 and runs.get(NARROW, 0) >= 1
    for got, want in zip(adaptive, fixed, strict=True):
        assert [p.index for p in got.predictions] == [p.index for p in want.predictions]  # type: ignore[attr-defined]
        np.testing.assert_allclose(got.scores, want.scores, atol=1e-5, rtol=0)  # type: ignore[attr-defined]

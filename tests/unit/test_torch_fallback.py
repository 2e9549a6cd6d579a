"""`VISION_TORCH_COMPILE` on a machine without a C++ compiler: the PyTorch runtime serves eager,
says so once and what to install, and `GET /models` tells compiled from eager."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image
from torch._inductor import config as inductor_config

from tests.conftest import wait_ready
from tests.fixtures import app_of
from tests.integration.tiny_models import TinyClassifier
from visionserve.repository import ModelEntry, ModelRepository
from visionserve.runtimes import torch as torch_runtime
from visionserve.runtimes.torch import TorchRuntime
from visionserve.settings import ServerSettings

SIZE = 32


def _tiny_torch_entry(repository: Path, name: str) -> ModelEntry:
    """A repository entry holding the tiny classifier as a `torch.export` program (no export step:
    parity and ONNX are not what this tests)."""
    folder = repository / name
    (folder / "1").mkdir(parents=True)
    batch = torch.export.Dim("batch", min=1, max=8)
    program = torch.export.export(
        TinyClassifier().eval(), (torch.zeros(2, 3, SIZE, SIZE),), dynamic_shapes=({0: batch},)
    )
    torch.export.save(program, folder / "1" / "model.pt2")
    classes = int(TinyClassifier()(torch.zeros(1, 3, SIZE, SIZE)).shape[1])
    config = {
        "name": name,
        "input": {"size": [SIZE, SIZE], "resize": SIZE + SIZE // 7},
        "output": {"classes": classes},
        "artefacts": {"torch": {"path": "1/model.pt2"}},
        "max_batch_size": 1,
    }
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "labels.txt").write_text("".join(f"class_{i}\n" for i in range(classes)))
    return ModelRepository(repository).get(name)


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (48, 40), (200, 30, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(autouse=True)
def fresh_check() -> Iterator[None]:
    """Each test checks for a compiler (and may warn) anew."""
    caches = (torch_runtime.cxx_compiler, torch_runtime._warn_eager_fallback)
    for cached in caches:
        cached.cache_clear()
    yield
    for cached in caches:
        cached.cache_clear()


@pytest.fixture
def no_compiler() -> Iterator[None]:
    """Inductor looks for a compiler that does not exist (as `CXX=/nonexistent` would at import).
    NOTE: inductor's config overrides are thread-local: this holds in the test's thread only."""
    with inductor_config.patch({"cpp.cxx": (None, "/nonexistent/g++")}):
        yield


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def test_without_a_compiler_the_runtime_loads_eager_and_says_what_to_install(
    no_compiler: None, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    assert torch_runtime.cxx_compiler() is None  # inductor's own search finds nothing
    runtime = TorchRuntime(_tiny_torch_entry(tmp_path, "tiny"), compile=True)
    runtime.load()
    runtime.warmup()  # compiled, this raises InductorError (InvalidCxxCompiler)
    assert runtime.compile is False and runtime.describe()["compiled"] is False
    batch = np.random.default_rng(0).random((2, 3, SIZE, SIZE), dtype=np.float32)
    with torch.inference_mode():
        expected = TinyClassifier().eval()(torch.from_numpy(batch)).numpy()
    np.testing.assert_allclose(runtime.predict_batch(batch), expected, atol=1e-5)
    (warning,) = _warnings(caplog)
    assert "apt-get install g++" in warning and "VISION_TORCH_COMPILE=false" in warning


def test_served_models_fall_back_with_one_warning_and_say_so(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Two models loading in their own threads: one warning, both eager, /models says so."""
    monkeypatch.setattr(torch_runtime, "cxx_compiler", lambda: None)
    runtimes = [TorchRuntime(_tiny_torch_entry(tmp_path, name), compile=True) for name in ("a", "b")]
    with TestClient(app_of(ServerSettings(), *runtimes)) as client:
        wait_ready(client, timeout_s=60)
        answer = client.post("/predict/file", files={"file": ("red.png", _png())})
        assert answer.status_code == 200, answer.text
        assert answer.json()["topk"][0]["label"].startswith("class_")
        models = client.get("/models").json()["models"]
    assert [(m["name"], m["runtime"], m["compiled"]) for m in models] == [
        ("a", "torch", False),
        ("b", "torch", False),
    ]
    assert len(_warnings(caplog)) == 1, _warnings(caplog)


def test_compile_off_is_silent_and_reported(
    no_compiler: None, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    runtime = TorchRuntime(_tiny_torch_entry(tmp_path, "tiny"), compile=False)
    runtime.load()
    assert runtime.describe()["compiled"] is False
    assert not _warnings(caplog)

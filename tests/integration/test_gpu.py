"""CUDA paths: run where a GPU is present, skip cleanly elsewhere (CI has none)."""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import photo_bytes
from visionserve.postprocessing import postprocess, softmax
from visionserve.preprocessing import ImagePreprocessor
from visionserve.repository import ModelEntry

pytestmark = [pytest.mark.gpu, pytest.mark.real_model]


def _torch_cuda() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def _onnx_cuda() -> bool:
    import onnxruntime

    return "CUDAExecutionProvider" in onnxruntime.get_available_providers()


def _batch(entry: ModelEntry) -> np.ndarray:
    preprocessor = ImagePreprocessor(entry.config.input, max_image_pixels=50_000_000)
    return np.stack([preprocessor(photo_bytes(n)) for n in ("chelsea.png", "coffee.png", "flower.jpg")])


@pytest.mark.skipif(not _torch_cuda(), reason="no CUDA device for torch")
def test_torch_cuda_matches_cpu(real_entry: ModelEntry) -> None:
    from visionserve.runtimes.onnx import OnnxRuntime
    from visionserve.runtimes.torch import TorchRuntime

    batch = _batch(real_entry)
    cuda = TorchRuntime(real_entry, device="cuda", threads=1, compile=False)
    cuda.load()
    cpu = OnnxRuntime(real_entry, threads=1)
    cpu.load()
    on_gpu, on_cpu = cuda.predict_batch(batch), cpu.predict_batch(batch)
    assert np.abs(softmax(on_gpu) - softmax(on_cpu)).max() < 1e-3  # TF32 convolutions allowed
    labels = [p[0].label for p in postprocess(on_gpu, 1, real_entry.labels)]
    assert labels[1] == "espresso" and labels[2] == "daisy"


@pytest.mark.skipif(not _onnx_cuda(), reason="onnxruntime has no CUDA execution provider")
def test_onnx_cuda_provider_is_used_and_matches_cpu(real_entry: ModelEntry) -> None:
    from visionserve.runtimes.onnx import OnnxRuntime

    batch = _batch(real_entry)
    cuda = OnnxRuntime(real_entry, device="cuda", threads=1)
    cuda.load()
    assert cuda.describe()["providers"][0] == "CUDAExecutionProvider"  # type: ignore[index]
    cpu = OnnxRuntime(real_entry, threads=1)
    cpu.load()
    assert np.abs(softmax(cuda.predict_batch(batch)) - softmax(cpu.predict_batch(batch))).max() < 1e-3

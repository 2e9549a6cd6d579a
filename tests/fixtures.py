"""Fakes for logic tests (MLServer-style): runtimes that answer, fail or dawdle on purpose.

The real exported model is used by the tests marked `real_model`; these fakes make the logic
tests fast and let them provoke failures that the real model never has.
"""

from __future__ import annotations

import json
import struct
import threading
import time
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from fastapi import FastAPI

from visionserve.http.app import create_app
from visionserve.repository import ModelEntry, ModelRepository, PipelineEntry
from visionserve.runtimes.base import ModelRuntime
from visionserve.serving.registry import ModelRegistry
from visionserve.settings import GrpcSettings, SecuritySettings, ServerSettings

if TYPE_CHECKING:
    from grpc_server.server import GrpcServer

FAKE_CLASSES = 10


def write_fake_entry(
    repository: Path, name: str = "fake", classes: int = FAKE_CLASSES, size: int = 32, **overrides: object
) -> ModelEntry:
    """A model repository entry with config and labels, and no artefact (fakes need none)."""
    folder = repository / name
    folder.mkdir(parents=True, exist_ok=True)
    config: dict[str, object] = {
        "name": name,
        "input": {"size": [size, size], "resize": size + size // 7},
        "output": {"classes": classes},
        "artefacts": {"onnx": {"path": "1/model.onnx"}},
        "max_batch_size": 8,
    }
    config.update(overrides)
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "labels.txt").write_text("\n".join(f"class_{i}" for i in range(classes)) + "\n")
    return ModelRepository(repository).get(name)


class FakeRuntime(ModelRuntime):
    """Answers at once. Class j scores j * mean(image) + j, so the top class is the last one and
    the probabilities depend on the input. Records every batch shape it ran."""

    backend = "fake"

    def __init__(self, model: ModelEntry, **kwargs: object):
        super().__init__(model, device="cpu", threads=1)
        self.loaded = False
        self.batches: list[tuple[int, ...]] = []
        self.threads_seen: set[str] = set()
        self.closed = False

    def load(self) -> None:
        self.loaded = True

    def predict_batch(self, batch: np.ndarray) -> np.ndarray:
        self.batches.append(batch.shape)
        self.threads_seen.add(threading.current_thread().name)
        classes = self.model.config.output.classes
        means = batch.reshape(len(batch), -1).mean(axis=1, keepdims=True)
        ramp = np.arange(classes, dtype=np.float32)[np.newaxis, :]
        scores: np.ndarray = (ramp * (1.0 + 0.1 * means)).astype(np.float32)
        return scores

    def close(self) -> None:
        self.closed = True


class FailingRuntime(FakeRuntime):
    """Raises in `predict_batch` (or in `load`, with `fail_on_load=True`)."""

    def __init__(self, model: ModelEntry, *, fail_on_load: bool = False, failures: int | None = None):
        super().__init__(model)
        self.fail_on_load = fail_on_load
        self.failures_left = failures  # None: fail forever

    def load(self) -> None:
        if self.fail_on_load:
            raise RuntimeError("secret internal detail: CUDA out of memory at 0xdeadbeef")
        super().load()

    def warmup(self, iterations: int = 3) -> None:
        """Warm-up succeeds (the failures are for real batches)."""
        for _ in range(iterations):
            super().predict_batch(np.zeros((1, 3, *self.model.config.input.size), dtype=np.float32))

    def predict_batch(self, batch: np.ndarray) -> np.ndarray:
        if self.failures_left is None or self.failures_left > 0:
            if self.failures_left is not None:
                self.failures_left -= 1
            raise RuntimeError("secret internal detail: kernel launch failed at 0xdeadbeef")
        return super().predict_batch(batch)


class SlowRuntime(FakeRuntime):
    """Takes `load_s` to load and `batch_s` per batch."""

    def __init__(self, model: ModelEntry, *, load_s: float = 0.0, batch_s: float = 0.0):
        super().__init__(model)
        self.load_s = load_s
        self.batch_s = batch_s

    def load(self) -> None:
        time.sleep(self.load_s)
        super().load()

    def predict_batch(self, batch: np.ndarray) -> np.ndarray:
        time.sleep(self.batch_s)
        return super().predict_batch(batch)


def png_chunk(kind: bytes, data: bytes) -> bytes:
    """One PNG chunk: length, type, data, CRC."""
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def crafted_png(width: int, height: int) -> bytes:
    """A PNG of ~70 bytes whose header declares `width` x `height` (8-bit gray): a pixel bomb."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + png_chunk(b"IEND", b"")
    )


def registry_of(
    *runtimes: ModelRuntime,
    settings: ServerSettings | None = None,
    pipelines: Sequence[PipelineEntry] = (),
    **overrides: object,
) -> ModelRegistry:
    """A registry serving `runtimes` (the first is the default) and `pipelines` over them, with
    `settings` (or ServerSettings built from `overrides`)."""
    server_settings = settings or ServerSettings(**overrides)  # type: ignore[arg-type]
    return ModelRegistry(list(runtimes), server_settings, pipelines=pipelines, default=runtimes[0].model.name)


def app_of(settings: ServerSettings, *runtimes: ModelRuntime, **kwargs: Any) -> FastAPI:
    """The HTTP app serving `runtimes` (the first is the default) with `settings` (and the
    `pipelines` keyword's pipelines over them)."""
    pipelines = kwargs.pop("pipelines", ())
    return create_app(settings, registry_of(*runtimes, settings=settings, pipelines=pipelines), **kwargs)


def grpc_server_of(
    settings: GrpcSettings,
    server_settings: ServerSettings,
    *runtimes: ModelRuntime,
    security: SecuritySettings | None = None,
    pipelines: Sequence[PipelineEntry] = (),
) -> GrpcServer:
    """The gRPC server serving `runtimes` (the first is the default)."""
    # NOTE: imported here: the gRPC stubs must not load with every test module (one test loads
    # tritonclient's, whose descriptors clash with them in one process)
    from grpc_server.server import GrpcServer

    registry = registry_of(*runtimes, settings=server_settings, pipelines=pipelines)
    return GrpcServer(settings, server_settings, registry, security)


DETECTOR_LABELS = ("cat", "dog", "bird")


def write_fake_detector(
    repository: Path, name: str = "fakedet", size: int = 64, max_detections: int = 5
) -> ModelEntry:
    """A detection entry (3 classes: cat, dog, bird; a `size` letterbox) without artefacts."""
    folder = repository / name
    folder.mkdir(parents=True, exist_ok=True)
    config: dict[str, object] = {
        "name": name,
        "task": "detection",
        "input": {
            "name": "images",
            "size": [size, size],
            "fit": "letterbox",
            "mean": [0, 0, 0],
            "std": [1, 1, 1],
        },
        "output": {"name": "predictions", "kind": "boxes", "classes": len(DETECTOR_LABELS)},
        "detection": {"max_detections": max_detections},
        "artefacts": {"onnx": {"path": "1/model.onnx"}},
        "max_batch_size": 8,
    }
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "labels.txt").write_text("\n".join(DETECTOR_LABELS) + "\n")
    return ModelRepository(repository).get(name)


class FakeDetectorRuntime(FakeRuntime):
    """Finds one object per image, in the middle of the input (half its width and height): its
    class scores are the input's mean red, green and blue (in [0, 1]), so a red photo is a cat, a
    green one a dog. Three more anchors score nothing."""

    def predict_batch(self, batch: np.ndarray) -> np.ndarray:
        self.batches.append(batch.shape)
        self.threads_seen.add(threading.current_thread().name)
        count, _, height, width = batch.shape
        outputs = np.zeros((count, 4, 4 + len(DETECTOR_LABELS)), dtype=np.float32)
        outputs[:, 0, :4] = (width / 2, height / 2, width / 2, height / 2)
        outputs[:, 0, 4:] = batch.mean(axis=(2, 3))
        return outputs

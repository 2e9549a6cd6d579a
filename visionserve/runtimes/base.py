"""The contract every runtime implements: arrays in, arrays out."""

from __future__ import annotations

import abc
import logging
import time

import numpy as np

from visionserve.repository import ModelEntry

logger = logging.getLogger(__name__)


class ModelRuntime(abc.ABC):
    """Runs one model on one device.

    Lifecycle: construct (cheap, no I/O) -> `load()` -> `warmup()` -> `predict_batch()` many times.
    `load` and `warmup` block and are called once, from a worker thread. `predict_batch` may be
    called from up to `instances` worker threads at once (the batcher runs one batch per
    instance), never on the event loop.
    """

    backend: str = "abstract"

    def __init__(self, model: ModelEntry, *, device: str = "cpu", threads: int = 1, instances: int = 1):
        self.model = model
        self.device = device
        self.threads = threads
        """Intra-op threads of each instance."""
        self.instances = instances
        """Calls of `predict_batch` that may run at once, each with `threads` threads."""

    @abc.abstractmethod
    def load(self) -> None:
        """Read the artefact and prepare the session/module on the device."""

    @abc.abstractmethod
    def predict_batch(self, batch: np.ndarray) -> np.ndarray:
        """float32 (N, 3, H, W) -> float32 (N, classes) scores (logits or probabilities)."""

    def warmup(self, iterations: int = 3) -> None:
        """Run a few batches of zeros so the first real request pays no one-off costs."""
        height, width = self.model.config.input.size
        batch = np.zeros((1, 3, height, width), dtype=np.float32)
        started = time.perf_counter()
        for _ in range(iterations):
            self.predict_batch(batch)
        logger.info(
            "%s runtime warmed up in %.2f s (%d iterations)",
            self.backend,
            time.perf_counter() - started,
            iterations,
        )

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release resources (sessions, device memory)."""

    def describe(self) -> dict[str, object]:
        """Facts about this runtime for /models and logs."""
        return {
            "runtime": self.backend,
            "device": self.device,
            "threads": self.threads,
            "instances": self.instances,
        }

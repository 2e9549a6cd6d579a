"""The contract every runtime implements: arrays in, arrays out."""

from __future__ import annotations

import abc
import logging
import time
from collections.abc import Sequence

import numpy as np

from visionserve.cpu import FIXED, Lane, layout_summary, on_lane
from visionserve.repository import ModelEntry

logger = logging.getLogger(__name__)


class ModelRuntime(abc.ABC):
    """Runs one model on one device.

    Lifecycle: construct (cheap, no I/O) -> `load()` -> `warmup()` -> `predict_batch()` many times.
    `load` and `warmup` block and are called once, from a worker thread. `predict_batch` may be
    called from up to `instances` worker threads at once (the batcher runs one batch per
    instance), never on the event loop.

    Sessions come in `lanes` (kinds): by default one, `fixed`, of `instances` x `threads`. A
    runtime with an adaptive layout has a `wide` and a `narrow` lane; the batcher picks one per
    batch and runs `predict_batch` under `cpu.on_lane(kind)`, which the runtime reads with
    `cpu.current_lane()` to take a session of that kind.
    """

    backend: str = "abstract"

    def __init__(
        self,
        model: ModelEntry,
        *,
        device: str = "cpu",
        threads: int = 1,
        instances: int = 1,
        lanes: Sequence[Lane] | None = None,
        layout_reason: str = "",
    ):
        self.model = model
        self.device = device
        self.threads = threads
        """Intra-op threads of each instance (adaptive layout: of the wide session, the most)."""
        self.instances = instances
        """Calls of `predict_batch` that may run at once, each with `threads` threads (adaptive
        layout: the narrow sessions, the most computing at once)."""
        self._lanes = tuple(lanes or ())
        self.layout_reason = layout_reason
        """Why this layout (for the start-up log and GET /models)."""

    @property
    def lanes(self) -> tuple[Lane, ...]:
        """The kinds of sessions, the one for a lone request first: those given, else one fixed
        lane of `instances` x `threads`."""
        return self._lanes or (Lane(FIXED, self.instances, self.threads),)

    @property
    def layout(self) -> str:
        """`fixed: 1x2` or `adaptive: 1x2 for a lone request, 2x1 under load`."""
        return layout_summary(self.lanes)

    @abc.abstractmethod
    def load(self) -> None:
        """Read the artefact and prepare the session/module on the device."""

    @abc.abstractmethod
    def predict_batch(self, batch: np.ndarray) -> np.ndarray:
        """float32 (N, 3, H, W) -> float32 (N, classes) scores (logits or probabilities)."""

    def warmup(self, iterations: int = 3) -> None:
        """Run a few batches of zeros so the first real request pays no one-off costs: `iterations`
        per session of each lane (sessions are taken in turn)."""
        height, width = self.model.config.input.size
        batch = np.zeros((1, 3, height, width), dtype=np.float32)
        started = time.perf_counter()
        lanes = self.lanes
        for lane in lanes:
            with on_lane(lane.kind):
                for _ in range(iterations * (lane.sessions if len(lanes) > 1 else 1)):
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
            "layout": self.layout,
            "layout_reason": self.layout_reason,
            "sessions": [
                {"kind": lane.kind, "count": lane.sessions, "threads": lane.threads} for lane in self.lanes
            ],
        }

"""ONNX Runtime backend (CPU, or CUDA through the CUDA execution provider)."""

from __future__ import annotations

import logging
import queue

import numpy as np
import onnxruntime as ort

from visionserve.errors import ConfigurationError
from visionserve.repository import ModelEntry
from visionserve.runtimes.base import ModelRuntime

logger = logging.getLogger(__name__)


class OnnxRuntime(ModelRuntime):
    """Runs `model.onnx` with one `InferenceSession` per instance, each with its own `threads`
    intra-op threads; a call takes a free session, so `instances` calls can run at once."""

    backend = "onnx"

    def __init__(
        self,
        model: ModelEntry,
        *,
        device: str = "cpu",
        threads: int = 1,
        instances: int = 1,
        allow_spinning: bool = False,
    ):
        super().__init__(model, device=device, threads=threads, instances=instances)
        self.allow_spinning = allow_spinning
        self._session: ort.InferenceSession | None = None
        # NOTE: sessions not in use; a caller takes one and puts it back. Concurrent runs on one
        # session would share its intra-op pool instead of each using `threads` of their own.
        self._free: queue.SimpleQueue[ort.InferenceSession] = queue.SimpleQueue()
        self._input_name = ""

    def _providers(self) -> list[str]:
        available = ort.get_available_providers()
        if self.device == "cpu":
            return ["CPUExecutionProvider"]
        if "CUDAExecutionProvider" not in available:
            raise ConfigurationError(
                f"VISION_DEVICE=cuda but this onnxruntime {ort.__version__} has no CUDA execution "
                f"provider (it has: {', '.join(available)}). Install onnxruntime-gpu instead of "
                "onnxruntime (and a CUDA driver), or set VISION_DEVICE=cpu"
            )
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]

    def load(self) -> None:
        """Create the sessions: all graph optimisations, `threads` intra-op threads, no spinning."""
        sessions = [self._new_session() for _ in range(self.instances)]
        for session in sessions:
            self._free.put(session)
        self._session = sessions[0]

    def _new_session(self) -> ort.InferenceSession:
        path = self.model.artefact_path("onnx")
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        # NOTE: idle spinning threads burn a core and steal it from preprocessing; see settings.
        spin = "1" if self.allow_spinning else "0"
        options.add_session_config_entry("session.intra_op.allow_spinning", spin)
        options.add_session_config_entry("session.inter_op.allow_spinning", spin)
        session = ort.InferenceSession(str(path), sess_options=options, providers=self._providers())
        if self.device == "cuda" and "CUDAExecutionProvider" not in session.get_providers():
            raise ConfigurationError(
                "VISION_DEVICE=cuda but ONNX Runtime could not start its CUDA execution provider "
                "(see the log above: usually missing CUDA/cuDNN libraries); fix the CUDA install "
                "or set VISION_DEVICE=cpu"
            )
        inputs = session.get_inputs()
        if len(inputs) != 1:
            raise ConfigurationError(f"{path} has {len(inputs)} inputs; an image model has exactly one")
        self._input_name = inputs[0].name
        logger.info(
            "onnx runtime loaded %s (providers %s, %d threads)", path, session.get_providers(), self.threads
        )
        return session

    def predict_batch(self, batch: np.ndarray) -> np.ndarray:
        """float32 (N, 3, H, W) -> float32 (N, classes)."""
        if self._session is None:
            raise RuntimeError("OnnxRuntime.predict_batch called before load()")
        session = self._free.get()  # blocks only if more than `instances` callers at once
        try:
            (outputs,) = session.run(None, {self._input_name: batch})[:1]
        finally:
            self._free.put(session)
        return np.asarray(outputs, dtype=np.float32)

    def close(self) -> None:
        """Drop the sessions."""
        self._session = None
        while not self._free.empty():
            self._free.get()

    def describe(self) -> dict[str, object]:
        """Runtime facts, with the execution providers in use."""
        facts = super().describe()
        if self._session is not None:
            facts["providers"] = self._session.get_providers()
        return facts

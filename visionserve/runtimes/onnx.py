"""ONNX Runtime backend (CPU, or CUDA through the CUDA execution provider)."""

from __future__ import annotations

import logging
import queue
import threading
from typing import Any

import numpy as np
import onnxruntime as ort

from visionserve.cpu import current_lane
from visionserve.errors import ConfigurationError
from visionserve.repository import ModelEntry
from visionserve.runtimes.base import ModelRuntime

logger = logging.getLogger(__name__)

_shared_arena_lock = threading.Lock()
_shared_arena: dict[str, bool] = {}  # "cpu": registered (True) or refused (False); empty: not tried


def shared_cpu_arena() -> bool:
    """Register, once per process, one CPU memory arena that sessions may share (ONNX Runtime's
    `create_and_register_allocator`, used by sessions with `session.use_env_allocators`); False
    when ONNX Runtime refuses it (then each session keeps its own arena).

    An adaptive layout's sessions never all compute at once (the compute budget sees to it), so
    one arena sized to what computes at once replaces one per session: measured here, a wide and
    two narrow sessions of EfficientNet-Lite0 took 276 MB RSS with an arena each, 194 MB sharing
    one (one session alone: 138-145 MB); of yolo11n 997 MB against 423 MB (alone: 393 MB). A
    process serving the five bundled models: 367 MB ready sharing one, 634 MB with an arena per
    session, 317 MB with the fixed layout (docs/benchmarks.md, "Adaptive layout")."""
    with _shared_arena_lock:
        if "cpu" not in _shared_arena:
            kind, memory = ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, ort.OrtMemType.DEFAULT
            try:
                ort.create_and_register_allocator(
                    ort.OrtMemoryInfo("Cpu", kind, 0, memory), ort.OrtArenaCfg(0, -1, -1, -1)
                )
                _shared_arena["cpu"] = True
            except Exception as exc:  # an ONNX Runtime without it: an arena per session
                logger.warning("ONNX Runtime refused a shared CPU arena (%s); an arena per session", exc)
                _shared_arena["cpu"] = False
        return _shared_arena["cpu"]


class OnnxRuntime(ModelRuntime):
    """Runs `model.onnx` with one `InferenceSession` per instance, each with its own `threads`
    intra-op threads; a call takes a free session, so `instances` calls can run at once.

    With an adaptive layout (lanes `wide` and `narrow`), the sessions of each lane have that
    lane's threads; a call takes a free session of the lane the batcher picked
    (`cpu.current_lane()`; a call from outside the batcher takes the first lane's), and the
    sessions share one CPU arena (`shared_cpu_arena`)."""

    backend = "onnx"

    def __init__(self, model: ModelEntry, *, allow_spinning: bool = False, **layout: Any):
        """`layout`: `ModelRuntime`'s device, threads, instances, lanes and layout_reason."""
        super().__init__(model, **layout)
        self.allow_spinning = allow_spinning
        self._session: ort.InferenceSession | None = None
        # NOTE: sessions not in use, per lane; a caller takes one and puts it back. Concurrent runs
        # on one session would share its intra-op pool instead of each using threads of their own.
        self._free: dict[str, queue.SimpleQueue[ort.InferenceSession]] = {}
        self._input_name = ""
        self.shared_arena = False
        """True when this runtime's sessions share the process's CPU arena (adaptive layouts)."""

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
        """Create the sessions: all graph optimisations, each lane's intra-op threads, no spinning."""
        lanes = self.lanes
        self.shared_arena = len(lanes) > 1 and self.device == "cpu" and shared_cpu_arena()
        first: ort.InferenceSession | None = None
        for lane in lanes:
            free: queue.SimpleQueue[ort.InferenceSession] = queue.SimpleQueue()
            for _ in range(lane.sessions):
                session = self._new_session(lane.threads)
                first = first or session
                free.put(session)
            self._free[lane.kind] = free
        self._session = first

    def _new_session(self, threads: int) -> ort.InferenceSession:
        path = self.model.artefact_path("onnx")
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        # NOTE: idle spinning threads burn a core and steal it from preprocessing; see settings.
        spin = "1" if self.allow_spinning else "0"
        options.add_session_config_entry("session.intra_op.allow_spinning", spin)
        options.add_session_config_entry("session.inter_op.allow_spinning", spin)
        if self.shared_arena:
            options.add_session_config_entry("session.use_env_allocators", "1")
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
            "onnx runtime loaded %s (providers %s, %d threads%s)",
            path,
            session.get_providers(),
            threads,
            ", shared CPU arena" if self.shared_arena else "",
        )
        return session

    def predict_batch(self, batch: np.ndarray) -> np.ndarray:
        """float32 (N, 3, H, W) -> float32 (N, classes), on a session of the lane the batcher
        picked (`cpu.current_lane()`), else of the first lane."""
        if self._session is None:
            raise RuntimeError("OnnxRuntime.predict_batch called before load()")
        kind = current_lane()
        free = self._free.get(kind) if kind is not None else None
        if free is None:
            free = self._free[self.lanes[0].kind]
        session = free.get()  # blocks only if more callers than the lane's sessions at once
        try:
            (outputs,) = session.run(None, {self._input_name: batch})[:1]
        finally:
            free.put(session)
        return np.asarray(outputs, dtype=np.float32)

    def sessions(self, kind: str | None = None) -> int:
        """Sessions not in use now, of lane `kind` (None: of every lane)."""
        if kind is not None:
            return self._free[kind].qsize() if kind in self._free else 0
        return sum(free.qsize() for free in self._free.values())

    def close(self) -> None:
        """Drop the sessions."""
        self._session = None
        for free in self._free.values():
            while not free.empty():
                free.get()
        self._free.clear()

    def describe(self) -> dict[str, object]:
        """Runtime facts, with the execution providers in use."""
        facts = super().describe()
        if self._session is not None:
            facts["providers"] = self._session.get_providers()
        return facts

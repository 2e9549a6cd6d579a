"""ONNX Runtime backend (CPU, or CUDA through the CUDA execution provider)."""

from __future__ import annotations

import contextlib
import logging
import math
import queue
import shutil
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
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


# ONNX TensorProto data types a shared initializer may have (raw little-endian data).
_TENSOR_TYPES: dict[int, type[np.generic]] = {
    1: np.float32,
    2: np.uint8,
    3: np.int8,
    4: np.uint16,
    5: np.int16,
    6: np.int32,
    7: np.int64,
    9: np.bool_,
    10: np.float16,
    11: np.float64,
    12: np.uint32,
    13: np.uint64,
}
PREPACKING_OPS = frozenset(
    {
        "Attention",
        "ConvTranspose",
        "DynamicQuantizeLSTM",
        "DynamicQuantizeMatMul",
        "FusedGemm",
        "FusedMatMul",
        "GRU",
        "Gemm",
        "LSTM",
        "MatMul",
        "MatMulBnb4",
        "MatMulInteger",
        "MatMulIntegerToFloat",
        "MatMulNBits",
        "QAttention",
        "QGemm",
        "QLinearConv",
        "QLinearMatMul",
    }
)
"""Operators whose CPU kernels pre-pack a constant weight into a layout of their own: their
weights are not shared. A session pre-packs a weight it owns and drops the original, but keeps a
shared one beside its packed copy: EfficientNet-Lite0's classifier Gemm (5.1 MB) cost 5 MB per
session shared, nothing more unshared (measured). Left to each session, it costs what it did
before; `session.disable_prepacking` would save those 5 MB per session at the price of repacking
on every call, not taken. An operator missing here that pre-packs costs one extra copy of its
weights per process, never per session."""
SHARED_MIN_BYTES = 1024
"""Initializers smaller than this (shapes, axes, scalars) stay in each session."""
_ALIGNMENT = 64
"""Byte alignment of the shared weights, as ONNX Runtime's own allocator gives. Measured (1
thread, 9 alternating rounds, against a plain session): on numpy's 16-byte aligned arrays
yolo11n took 1.06x and EfficientNet-Lite0 1.05x the time, on 64-byte aligned ones 1.02x and 0.99x."""


def _varint(data: memoryview, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _fields(data: memoryview) -> Iterator[tuple[int, int | memoryview]]:
    """(field number, value) of one protobuf message: an int for varints and fixed-size fields, a
    view for length-delimited ones (messages, strings, bytes, packed repeated fields)."""
    pos, end = 0, len(data)
    while pos < end:
        key, pos = _varint(data, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(data, pos)
            yield number, value
        elif wire == 2:
            size, pos = _varint(data, pos)
            if pos + size > end:
                raise ValueError("truncated protobuf message")
            yield number, data[pos : pos + size]
            pos += size
        elif wire in (1, 5):
            width = 8 if wire == 1 else 4
            yield number, int.from_bytes(data[pos : pos + width], "little")
            pos += width
        else:
            raise ValueError(f"protobuf wire type {wire} (groups) is not expected in an ONNX model")


def _text(value: int | memoryview) -> str:
    return bytes(value).decode() if isinstance(value, memoryview) else ""


def graph_initializers(model: bytes, *, min_bytes: int = SHARED_MIN_BYTES) -> dict[str, np.ndarray]:
    """The main graph's initializers of serialized ONNX model `model` held as raw data of at least
    `min_bytes` bytes, as 64-byte aligned arrays by name, but for the inputs of `PREPACKING_OPS`.

    A reader of the few protobuf fields this needs (ModelProto.graph; GraphProto.node and
    .initializer; NodeProto.input and .op_type; TensorProto.dims, .data_type, .name, .raw_data,
    .data_location), so that serving needs neither the `onnx` package nor its schema. Initializers
    stored otherwise (typed fields, external data, sparse, in subgraphs) are left out: their
    sessions keep their own copies. Raises ValueError on a malformed model."""
    graphs = [value for number, value in _fields(memoryview(model)) if number == 7]
    if not graphs or not isinstance(graphs[-1], memoryview):
        return {}
    prepacked: set[str] = set()
    tensors: list[memoryview] = []
    for number, value in _fields(graphs[-1]):
        if number == 5 and isinstance(value, memoryview):
            tensors.append(value)
        elif number == 1 and isinstance(value, memoryview):
            node = list(_fields(value))
            if any(field == 4 and _text(item) in PREPACKING_OPS for field, item in node):
                prepacked.update(_text(item) for field, item in node if field == 1)
    found: list[tuple[str, type[np.generic], list[int], memoryview]] = []
    for tensor in tensors:
        dims: list[int] = []
        data_type, name, raw, elsewhere = 0, "", None, False
        for field, item in _fields(tensor):
            if field == 1 and isinstance(item, int):
                dims.append(item)
            elif field == 1 and isinstance(item, memoryview):  # packed dims
                pos = 0
                while pos < len(item):
                    dim, pos = _varint(item, pos)
                    dims.append(dim)
            elif field == 2 and isinstance(item, int):
                data_type = item
            elif field == 8:
                name = _text(item)
            elif field == 9 and isinstance(item, memoryview):
                raw = item
            elif field in (3, 13) or (field == 14 and item):
                elsewhere = True  # a segment, or external data
        dtype = _TENSOR_TYPES.get(data_type)
        if dtype is None or raw is None or elsewhere or not name or name in prepacked:
            continue
        if len(raw) < min_bytes or len(raw) != math.prod(dims) * np.dtype(dtype).itemsize:
            continue
        found.append((name, dtype, dims, raw))
    return _aligned_copies(found)


def _aligned_copies(
    tensors: list[tuple[str, type[np.generic], list[int], memoryview]],
) -> dict[str, np.ndarray]:
    """Copies of `tensors` (name, dtype, dims, raw data) as arrays by name, each at an
    `_ALIGNMENT`-byte address. (One buffer for them all, tried: yolo11n's process held 8 MB more
    RSS after load, the same once malloc_trim'd: heap left behind, not weights.)"""
    arrays: dict[str, np.ndarray] = {}
    for name, dtype, dims, raw in tensors:
        buffer = np.empty(len(raw) + _ALIGNMENT, dtype=np.uint8)
        start = -buffer.ctypes.data % _ALIGNMENT
        flat = buffer[start : start + len(raw)]
        flat[:] = np.frombuffer(raw, dtype=np.uint8)
        arrays[name] = flat.view(dtype).reshape(dims)
    return arrays


class SharedWeights:
    """One copy of a model's weights, after ONNX Runtime's graph optimisations, for every session
    of it in this process: the initializers of its optimised model as OrtValues (`values`) over
    `arrays` (caller-owned memory, given to each session with `SessionOptions.add_initializer`;
    they must outlive the sessions: each session refers to its SharedWeights).

    Why the optimised model: with ORT_ENABLE_ALL, ONNX Runtime rewrites the convolutions' weights
    into its NCHWc layout, new initializers of each session's own, so sharing `model.onnx`'s
    weights saved nothing (EfficientNet-Lite0: 19.0 MB per extra session either way; with the
    optimisations below ORT_ENABLE_ALL it would save 12.7 of 18.8 MB, but NCHWc is where the CNNs'
    speed is). The sessions load the optimised model instead, its graph optimisations off (they
    ran once) and its weights these: the same outputs bit for bit, as fast (2-thread session
    against a plain one, time per call, alternating rounds: EfficientNet-Lite0 0.994-1.003x and
    RetinaFace 0.992-1.006x in 3 runs of 31 rounds, yolo11n 0.991-0.997x in 2 of 15,
    mini_xception 0.985-1.012x in 5 of 21-31).

    Measured, RSS after malloc_trim, per session beyond the first: with its own weights
    EfficientNet-Lite0 19.0 MB, yolo11n 13.5, RetinaFace 5.0, mini_xception 1.0; sharing 5.8 (of
    which 5.1 its pre-packed Gemm, `PREPACKING_OPS`), 2.4, 1.2 and 0.5."""

    def __init__(self, arrays: dict[str, np.ndarray]):
        self.arrays = arrays
        self.values = {name: ort.OrtValue.ortvalue_from_numpy(array) for name, array in arrays.items()}

    @property
    def nbytes(self) -> int:
        """Bytes of the shared weights."""
        return sum(array.nbytes for array in self.arrays.values())

    def add_to(self, options: ort.SessionOptions) -> None:
        """Have a session made with `options` use these weights instead of copies of its own."""
        for name, value in self.values.items():
            options.add_initializer(name, value)


class OnnxRuntime(ModelRuntime):
    """Runs `model.onnx` with one `InferenceSession` per instance, each with its own `threads`
    intra-op threads; a call takes a free session, so `instances` calls can run at once.

    With an adaptive layout (lanes `wide` and `narrow`), the sessions of each lane have that
    lane's threads; a call takes a free session of the lane the batcher picked
    (`cpu.current_lane()`; a call from outside the batcher takes the first lane's), and the
    sessions share one CPU arena (`shared_cpu_arena`).

    On CPU the model's weights are held once per process: a lane of 1-thread sessions is one
    session taken by up to `sessions` callers at once, and when more than one session remains
    they share one copy of the optimised weights (`SharedWeights`); see `load` for what it saves."""

    backend = "onnx"

    def __init__(self, model: ModelEntry, *, allow_spinning: bool = False, **layout: Any):
        """`layout`: `ModelRuntime`'s device, threads, instances, lanes and layout_reason."""
        super().__init__(model, **layout)
        self.allow_spinning = allow_spinning
        self._session: ort.InferenceSession | None = None
        # NOTE: sessions not in use, per lane; a caller takes one and puts it back. A session with an
        # intra-op pool (threads > 1) is in its lane's queue once: concurrent runs on it would share
        # its pool instead of each using threads of their own. A 1-thread session has no pool (it
        # computes on the calling thread) and `run` is thread-safe, so a lane of 1-thread sessions
        # holds ONE session `sessions` times: `sessions(kind)` and the batcher see no difference.
        self._free: dict[str, queue.SimpleQueue[ort.InferenceSession]] = {}
        self._input_name = ""
        self.shared_arena = False
        """True when this runtime's sessions share the process's CPU arena (adaptive layouts)."""
        self.shared_weights: SharedWeights | None = None
        """The one copy of the weights this runtime's sessions share (None: one session, CUDA, or
        ONNX Runtime could not write its optimised model: each session has its own)."""

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
        """Create the sessions: all graph optimisations, each lane's intra-op threads, no spinning.

        On CPU, a lane of 1-thread sessions gets one session for all its slots, and when more than
        one session remains (the adaptive layout's wide and narrow ones), ONNX Runtime optimises
        the model once and every session uses one copy of its optimised weights
        (`SharedWeights`).

        Two callers at once on one 1-thread session compute as fast as on two (plain sessions,
        batch 1, 9 alternating rounds, img/s one/two: EfficientNet-Lite0 1.03x, yolo11n 1.01x,
        RetinaFace 1.00x, mini_xception 0.98x; batch 4, 7 rounds: EfficientNet-Lite0 and
        mini_xception 1.01x), and save a session: its weights, or with `SharedWeights` 0.5-5.8 MB.

        Measured on 2 cores, the adaptive layout (1x2 + 2x1), one model per process, RSS after
        load and 3 warm-up runs a session (medians of 3; before this / one narrow session only /
        shared weights only / both, as here / the fixed 1x2 for reference): EfficientNet-Lite0
        173 / 155 / 133 / 129 / 126 MB, yolo11n 197 / 184 / 177 / 175 / 171, RetinaFace 128 / 123
        / 123 / 122 / 116, mini_xception 81 / 80 / 80 / 79 / 79. A process serving the five
        bundled models (`VISION_GRPC_SERVE_HTTP=true python -m grpc_server`), ready: 357-373 MB
        before, 278-286 MB now, 317-319 MB with the fixed layout; after 232 requests, 862-903,
        820-869 and 825-861 MB (3 runs each, alternating). Loading takes as long as before
        (1.8-2.0 s ready, 1.0 s for the fixed layout): one session fewer, one more to optimise."""
        lanes = self.lanes
        cpu = self.device == "cpu"
        self.shared_arena = len(lanes) > 1 and cpu and shared_cpu_arena()
        distinct = sum(1 if cpu and lane.threads == 1 else lane.sessions for lane in lanes)
        with self._optimized_model(cpu and distinct > 1) as optimized:
            self.shared_weights = optimized[1] if optimized else None
            first: ort.InferenceSession | None = None
            for lane in lanes:
                free: queue.SimpleQueue[ort.InferenceSession] = queue.SimpleQueue()
                if cpu and lane.threads == 1:
                    session = self._new_session(1, optimized)
                    for _ in range(lane.sessions):
                        free.put(session)
                    first = first or session
                else:
                    for _ in range(lane.sessions):
                        session = self._new_session(lane.threads, optimized)
                        first = first or session
                        free.put(session)
                self._free[lane.kind] = free
        self._session = first

    def _options(self, threads: int) -> ort.SessionOptions:
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
        return options

    @contextlib.contextmanager
    def _optimized_model(self, share: bool) -> Iterator[tuple[str, SharedWeights] | None]:
        """When `share`: within this block, ONNX Runtime's optimised model (a file, written by a
        session made for that and dropped) and its weights to share. None when not `share`, or
        (each session with its own weights) when it cannot be written or read."""
        if not share:
            yield None
            return
        path = self.model.artefact_path("onnx")
        folder = ""
        optimized: tuple[str, SharedWeights] | None = None
        try:
            folder = tempfile.mkdtemp(prefix="visionserve-onnx-")
            target = Path(folder) / "optimized.onnx"
            options = self._options(1)
            options.optimized_model_filepath = str(target)
            options.log_severity_level = 3  # not its warning that the model suits this CPU only
            ort.InferenceSession(str(path), sess_options=options, providers=self._providers())
            weights = SharedWeights(graph_initializers(target.read_bytes()))
            if weights.arrays:
                optimized = str(target), weights
                logger.info(
                    "onnx runtime: %s's sessions share one copy of its optimised weights "
                    "(%d initializers, %.1f MB)",
                    path,
                    len(weights.arrays),
                    weights.nbytes / 1e6,
                )
        except Exception as exc:  # a read-only temp folder, a model over 2 GB, ...: copies each
            logger.warning("onnx runtime: %s's sessions keep a copy of the weights each (%s)", path, exc)
        try:
            yield optimized
        finally:
            if folder:
                shutil.rmtree(folder, ignore_errors=True)

    def _new_session(
        self, threads: int, optimized: tuple[str, SharedWeights] | None = None
    ) -> ort.InferenceSession:
        """A session of `threads` intra-op threads: of `model.onnx`, or of the `optimized` model
        (its path) with its shared weights."""
        path = self.model.artefact_path("onnx")
        options = self._options(threads)
        model = str(path)
        weights: SharedWeights | None = None
        if optimized is not None:
            model, weights = optimized
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # done once
            # NOTE: the reloaded graph's nodes are numbered otherwise, and its default topological
            # order is not the one the optimising session ran: mini_xception's 2-thread session
            # computed 1.06x slower in it (3 runs, 21 alternating rounds), as fast in the
            # priority-based order (0.996-1.012x); the other bundled models alike in both.
            options.execution_order = ort.ExecutionOrder.PRIORITY_BASED
            weights.add_to(options)
        session = ort.InferenceSession(model, sess_options=options, providers=self._providers())
        if weights is not None:
            session._visionserve_weights = weights  # the OrtValues it uses live as long as it does
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
            "onnx runtime loaded %s (providers %s, %d threads%s%s)",
            path,
            session.get_providers(),
            threads,
            ", shared CPU arena" if self.shared_arena else "",
            ", shared weights" if weights is not None else "",
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
        """Drop the sessions (then the weights they shared)."""
        self._session = None
        for free in self._free.values():
            while not free.empty():
                free.get()
        self._free.clear()
        self.shared_weights = None

    def describe(self) -> dict[str, object]:
        """Runtime facts, with the execution providers in use."""
        facts = super().describe()
        if self._session is not None:
            facts["providers"] = self._session.get_providers()
        return facts

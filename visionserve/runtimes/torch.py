"""PyTorch backend: a `torch.export` program (`model.pt2`), optionally compiled with inductor."""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import threading
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from visionserve.errors import ConfigurationError
from visionserve.repository import ModelEntry
from visionserve.runtimes.base import ModelRuntime

logger = logging.getLogger(__name__)

# Entries of a .pt2 archive whose loading would run pickle (arbitrary code). torch.export.save
# writes none of them for a plain model; a file that has them was not made by our export step.
_PICKLED_CONSTANT_PREFIXES = ("custom_obj_", "opaque_obj_")

# Models load in parallel threads: the compiler check and its warning happen once per process.
_compiler_check = threading.Lock()


def check_pickle_free(path: Path) -> None:
    """Refuse a .pt2 archive that would unpickle objects when loaded.

    `torch.export.load` unpickles tensor subclasses, custom objects and opaque constants. The
    programs our export step writes contain plain tensors only, so anything else is refused before
    `torch.export.load` sees it.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            for name in archive.namelist():
                base = name.rsplit("/", 1)[-1]
                if base.startswith(_PICKLED_CONSTANT_PREFIXES):
                    raise ConfigurationError(f"{path} holds a pickled object ({name}); refusing to load it")
                if base.endswith("_config.json") and ("/weights/" in name or "/constants/" in name):
                    config = json.loads(archive.read(name))
                    for fqn, meta in config.get("config", {}).items():
                        if meta.get("use_pickle"):
                            raise ConfigurationError(
                                f"{path}: tensor {fqn!r} is stored pickled; refusing to load it "
                                "(re-export the model with plain tensors)"
                            )
    except zipfile.BadZipFile as exc:
        raise ConfigurationError(f"{path} is not a torch.export archive: {exc}") from exc


@functools.cache
def cxx_compiler() -> str | None:
    """The C++ compiler `torch.compile` (inductor) would use, or None when none works.

    Asks inductor itself (`torch._inductor.config.cpp.cxx`: `$CXX`, else `g++`; each candidate
    must answer `--version`), so that the answer is the one compiling would meet. Cached: checked
    once per process.
    """
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler
        from torch._inductor.exc import InvalidCxxCompiler
    except ImportError:  # pragma: no cover - a torch without these private helpers
        return shutil.which(os.environ.get("CXX", "g++"))
    try:
        return get_cpp_compiler()
    except InvalidCxxCompiler:
        return None


@functools.cache
def _warn_eager_fallback() -> None:
    """Say once per process why the models run eager and how to change that."""
    logger.warning(
        "VISION_TORCH_COMPILE is on but no working C++ compiler was found (torch.compile needs "
        "one: $CXX, else g++); serving the PyTorch models eager (slower per batch, ready "
        "sooner). Install one (Debian/Ubuntu: apt-get install g++) to compile, or set "
        "VISION_TORCH_COMPILE=false to run eager without this warning"
    )


def _canonical_strides(array: np.ndarray) -> tuple[int, ...]:
    strides = [array.itemsize]
    for size in reversed(array.shape[1:]):
        strides.insert(0, strides[0] * size)
    return tuple(strides)


class TorchRuntime(ModelRuntime):
    """Runs the exported program's module under `torch.inference_mode`.

    With `compile=True` the module is compiled by inductor with frozen weights during warm-up:
    measured here about 1.35x faster than eager on CPU, for tens of seconds more warm-up. Where no
    C++ compiler works, `load` falls back to eager (one warning per process) and `compile` turns
    False. Batch 1 and
    batch >= 2 compile separately (torch specialises size 1), so warm-up runs both. With several
    instances, one module (compiled once) is called from each instance's thread.
    """

    backend = "torch"

    def __init__(self, model: ModelEntry, *, compile: bool = False, **layout: Any):
        """`layout`: `ModelRuntime`'s device, threads, instances, lanes and layout_reason."""
        super().__init__(model, **layout)
        if len(self.lanes) > 1:
            raise ConfigurationError(
                "the PyTorch runtime runs one module with process-wide threads: its layout is "
                "fixed (VISION_LAYOUT=adaptive is for ONNX Runtime on CPU)"
            )
        self.compile = compile
        self._module: Callable[[torch.Tensor], torch.Tensor] | None = None
        self._torch_device = torch.device("cpu")

    def load(self) -> None:
        """Load the program (refusing pickled payloads), move it to the device, compile it."""
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ConfigurationError(
                f"VISION_DEVICE=cuda but this torch {torch.__version__} sees no CUDA device "
                f"(built with CUDA {torch.version.cuda or 'none'}). Install a CUDA build of torch "
                "and the driver, or set VISION_DEVICE=cpu"
            )
        self._torch_device = torch.device(self.device)
        path = self.model.artefact_path("torch")
        check_pickle_free(path)
        # NOTE: set_num_threads is process-wide; one runtime per process is the design.
        torch.set_num_threads(self.threads)
        program = torch.export.load(str(path))
        module = program.module().to(self._torch_device)
        if self.compile:
            # NOTE: checked before compiling: torch.compile is lazy, and without a compiler the
            # first call (warm-up) fails with InvalidCxxCompiler, every start again (a restart
            # loop under Docker). On CUDA, inductor's Triton kernels need a C compiler too.
            with _compiler_check:
                if cxx_compiler() is None:
                    _warn_eager_fallback()
                    self.compile = False
        self._module = (
            torch.compile(module, dynamic=True, options={"freezing": True}) if self.compile else module
        )
        logger.info(
            "torch runtime loaded %s (device %s, %d threads, compile=%s)",
            path,
            self.device,
            self.threads,
            self.compile,
        )

    def warmup(self, iterations: int = 3) -> None:
        """Warm up at batch 1 and, when batching is possible, batch 2 (compiled separately)."""
        super().warmup(iterations)
        if self.compile and self.model.config.max_batch_size > 1:
            height, width = self.model.config.input.size
            self.predict_batch(np.zeros((2, 3, height, width), dtype=np.float32))

    def predict_batch(self, batch: np.ndarray) -> np.ndarray:
        """float32 (N, 3, H, W) -> float32 (N, classes)."""
        if self._module is None:
            raise RuntimeError("TorchRuntime.predict_batch called before load()")
        if batch.strides != _canonical_strides(batch):
            # NOTE: `x[np.newaxis]` has stride 0 on the batch axis; the compiled graph guards on
            # strides and would recompile (seconds) for such an input.
            batch = np.ascontiguousarray(batch).copy()
        with torch.inference_mode():
            inputs = torch.from_numpy(batch).to(self._torch_device, non_blocking=True)
            outputs = self._module(inputs)
            result: np.ndarray = outputs.float().cpu().numpy()
        return result

    def close(self) -> None:
        """Drop the module (and cached device memory)."""
        self._module = None
        if self.device == "cuda":
            torch.cuda.empty_cache()

    def describe(self) -> dict[str, object]:
        """Runtime facts, with whether the module is compiled (False once `load` fell back to eager)."""
        facts = super().describe()
        facts["compiled"] = self.compile
        return facts

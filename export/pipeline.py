"""nn.Module -> model repository entry: torch.export program, ONNX graph, labels, config.json.

Every entry is verified before it is published: both artefacts are loaded by the same runtime
classes the services use and run on real photos through the serving pre- and postprocessing, and
must agree (`export.parity`). The entry is written to a temporary folder and renamed into place only
when it passes, so a failed export leaves the repository as it was.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from export.errors import ExportError
from export.parity import check_parity
from export.parity import describe as describe_parity
from export.sources import ModelSource
from visionserve import __version__
from visionserve.repository import CONFIG_FILE, ModelConfig, file_sha256

logger = logging.getLogger(__name__)

DEFAULT_OPSET = 18


@dataclass
class ExportOptions:
    """What to write and where."""

    name: str
    repository: Path
    photos: list[Path]
    max_batch_size: int = 32
    opset: int = DEFAULT_OPSET
    force: bool = False


class Progress:
    """Prints `[i/n] step ... done (1.2 s)` lines, so a long export shows where it is."""

    def __init__(self, total: int, out: Callable[[str], None] = print):
        self.total = total
        self.step = 0
        self.out = out

    @contextmanager
    def __call__(self, what: str) -> Iterator[None]:
        self.step += 1
        started = time.perf_counter()
        self.out(f"[{self.step}/{self.total}] {what} ...")
        yield
        self.out(f"[{self.step}/{self.total}] {what}: done ({time.perf_counter() - started:.1f} s)")


def _export_program(
    module: torch.nn.Module, example: torch.Tensor, max_batch: int
) -> torch.export.ExportedProgram:
    batch = torch.export.Dim("batch", min=1, max=max(2, max_batch))
    (arg_name,) = _single_input_name(module)
    try:
        return torch.export.export(module, (example,), dynamic_shapes={arg_name: {0: batch}})
    except Exception as exc:
        raise ExportError(f"torch.export could not trace the model: {exc}") from exc


def _single_input_name(module: torch.nn.Module) -> tuple[str]:
    import inspect

    params = [
        p
        for p in inspect.signature(module.forward).parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    if not params:
        raise ExportError("the model's forward() takes no tensor argument")
    return (params[0].name,)


def _export_onnx(program: torch.export.ExportedProgram, path: Path, opset: int, source: ModelSource) -> None:
    import onnx

    # the exporter logs a warning per torchvision op it cannot register; torchvision is not needed
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's deprecation chatter
        try:
            onnx_program = torch.onnx.export(
                program,
                input_names=[source.input.name],
                output_names=[source.output_name],
                opset_version=opset,
                dynamo=True,
                verbose=False,
            )
        except Exception as exc:
            raise ExportError(f"ONNX export failed: {exc}") from exc
    assert onnx_program is not None
    onnx_program.save(str(path), external_data=False)
    onnx.checker.check_model(str(path), full_check=True)


def _classes(module: torch.nn.Module, example: torch.Tensor, task: str, landmarks: int = 0) -> int:
    """The classes the model outputs: a classifier's (batch, classes) scores, a detector's (batch,
    anchors, 4 + classes + 2 x landmarks) boxes, class scores and landmark points."""
    with torch.inference_mode():
        out = module(example)
    rank = 3 if task == "detection" else 2
    if not isinstance(out, torch.Tensor) or out.ndim != rank:
        got = getattr(out, "shape", type(out).__name__)
        expected = "(batch, anchors, 4 + classes)" if rank == 3 else "(batch, classes)"
        raise ExportError(f"the {task} model must return one {expected} tensor; it returned {got}")
    classes = int(out.shape[-1]) - (4 + 2 * landmarks if task == "detection" else 0)
    if classes < 1:
        raise ExportError(f"the model's output rows of {out.shape[-1]} columns hold no class scores")
    return classes


def export_model(source: ModelSource, options: ExportOptions, out: Callable[[str], None] = print) -> Path:
    """Write `source` into the repository as `options.name`; return the entry's folder."""
    repository = options.repository
    final = repository / options.name
    if final.exists() and not options.force:
        raise ExportError(f"{final} already exists; pass --force to replace it")
    if not options.photos:
        raise ExportError("no photos for the parity check: install scikit-image or pass --photos DIR")
    repository.mkdir(parents=True, exist_ok=True)
    progress = Progress(6, out)
    module = source.module.eval()
    height, width = source.input.size
    example = torch.randn(2, 3, height, width)
    staging = Path(tempfile.mkdtemp(prefix=f".{options.name}.", dir=repository))
    staging.chmod(0o755)  # mkdtemp makes it private; services (another user in a container) read it
    try:
        with progress("checking the model's output"):
            classes = _classes(module, example, source.task, source.landmarks)
            labels = source.labels
            if labels is None:
                raise ExportError("this source has no class names: pass --labels FILE (one name per line)")
            if len(labels) != classes:
                raise ExportError(f"the model outputs {classes} classes but there are {len(labels)} labels")
        (staging / "1").mkdir()
        with progress("torch.export (dynamic batch axis) -> 1/model.pt2"):
            program = _export_program(module, example, options.max_batch_size)
            torch.export.save(program, str(staging / "1" / "model.pt2"))
        with progress(f"ONNX export (opset {options.opset}) -> 1/model.onnx"):
            _export_onnx(program, staging / "1" / "model.onnx", options.opset, source)
        with progress("writing labels.txt and config.json"):
            (staging / "labels.txt").write_text("\n".join(labels) + "\n")
            onnx_path, torch_path = staging / "1" / "model.onnx", staging / "1" / "model.pt2"
            config = ModelConfig.model_validate(
                {
                    "name": options.name,
                    "task": source.task,
                    "input": source.input.model_dump(),
                    "output": {
                        "name": source.output_name,
                        "kind": source.output_kind,
                        "classes": classes,
                        **({"landmarks": source.landmarks} if source.landmarks else {}),
                    },
                    **({"detection": source.detection.model_dump()} if source.detection else {}),
                    "max_batch_size": options.max_batch_size,
                    "artefacts": {
                        "onnx": {
                            "path": "1/model.onnx",
                            "sha256": file_sha256(onnx_path),
                            "opset": options.opset,
                        },
                        "torch": {
                            "path": "1/model.pt2",
                            "sha256": file_sha256(torch_path),
                            "format": "torch.export",
                        },
                    },
                    "provenance": {
                        **source.provenance,
                        "exported_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                        "exporter": f"visionserve {__version__}",
                        "torch": torch.__version__,
                    },
                }
            )
            _write_config(staging, config)
        with progress(f"parity check on {len(options.photos)} real photos (ONNX Runtime vs PyTorch)"):
            parity = check_parity(staging, options.photos)
            config.parity = parity
            _write_config(staging, config)
            line = describe_parity(parity)
            out(line)
            if not parity["passed"]:
                raise ExportError(
                    "parity check failed: ONNX Runtime and PyTorch disagree on real photos "
                    f"({line.strip()}); nothing was written"
                )
        with progress(f"publishing {final}"):
            if final.exists():
                shutil.rmtree(final)
            staging.rename(final)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return final


def _write_config(folder: Path, config: ModelConfig) -> None:
    data = config.model_dump(mode="json")
    (folder / CONFIG_FILE).write_text(json.dumps(data, indent=2) + "\n")

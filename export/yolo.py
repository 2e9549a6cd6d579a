"""YOLO11n detection in plain torch (visionserve's own rebuild), loaded from the pinned checkpoint."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from typing import cast

import torch
from torch import nn

from export.checkpoint import load_ultralytics_checkpoint
from export.errors import ExportError
from export.weights import WEIGHTS, fetch

logger = logging.getLogger(__name__)

STRIDES = (8, 16, 32)
REG_MAX = 16
# NOTE: Ultralytics trains with BatchNorm eps=1e-3 (torch's default is 1e-5); the checkpoint
# records eps=0.001 on every BatchNorm2d, and the running variances are small enough to care.
BN_EPS = 1e-3
# Keys of the checkpoint's last layer that only the segmentation head uses.
SEGMENTATION_ONLY = ("model.23.proto.", "model.23.cv4.")


class Conv(nn.Module):
    """Conv2d (no bias) -> BatchNorm2d -> SiLU (or no activation)."""

    def __init__(
        self, c_in: int, c_out: int, k: int = 1, s: int = 1, *, g: int = 1, act: bool = True
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, k, s, padding=k // 2, groups=g, bias=False)
        self.bn = nn.BatchNorm2d(c_out, eps=BN_EPS)
        self.act: nn.Module = nn.SiLU() if act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Convolve, normalise, activate."""
        return cast(torch.Tensor, self.act(self.bn(self.conv(x))))


def dw_conv(c_in: int, c_out: int, k: int) -> Conv:
    """Depthwise Conv: one group per input channel (c_in == c_out here)."""
    return Conv(c_in, c_out, k, g=c_in)


class Bottleneck(nn.Module):
    """Two 3x3 Convs with an optional residual connection."""

    def __init__(self, c_in: int, c_out: int, shortcut: bool = True, k: int = 3, e: float = 0.5) -> None:
        super().__init__()
        hidden = int(c_out * e)
        self.cv1 = Conv(c_in, hidden, k)
        self.cv2 = Conv(hidden, c_out, k)
        self.add = shortcut and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x + cv2(cv1(x)) (or without x)."""
        y = cast(torch.Tensor, self.cv2(self.cv1(x)))
        return x + y if self.add else y


class C3k(nn.Module):
    """CSP block: two 1x1 branches, one through `n` Bottlenecks, joined by a 1x1 Conv."""

    def __init__(self, c_in: int, c_out: int, n: int = 2, shortcut: bool = True, e: float = 0.5) -> None:
        super().__init__()
        hidden = int(c_out * e)
        self.cv1 = Conv(c_in, hidden)
        self.cv2 = Conv(c_in, hidden)
        self.cv3 = Conv(2 * hidden, c_out)
        self.m = nn.Sequential(*(Bottleneck(hidden, hidden, shortcut, e=1.0) for _ in range(n)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """cv3([m(cv1(x)), cv2(x)])."""
        return cast(torch.Tensor, self.cv3(torch.cat((self.m(self.cv1(x)), self.cv2(x)), dim=1)))


class C3k2(nn.Module):
    """C2f-style block: split a 1x1 Conv in two, chain `n` inner blocks, concatenate every stage."""

    def __init__(self, c_in: int, c_out: int, n: int = 1, c3k: bool = False, e: float = 0.5) -> None:
        super().__init__()
        self.c = int(c_out * e)
        self.cv1 = Conv(c_in, 2 * self.c)
        self.cv2 = Conv((2 + n) * self.c, c_out)
        inner: list[nn.Module] = [
            C3k(self.c, self.c) if c3k else Bottleneck(self.c, self.c) for _ in range(n)
        ]
        self.m = nn.ModuleList(inner)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """cv2([a, b, m1(b), m2(m1(b)), ...]) where a, b = cv1(x) split in halves."""
        parts = list(self.cv1(x).split((self.c, self.c), dim=1))
        for block in self.m:
            parts.append(block(parts[-1]))
        return cast(torch.Tensor, self.cv2(torch.cat(parts, dim=1)))


class SPPF(nn.Module):
    """Spatial pyramid pooling: one 5x5 max-pool applied three times in a row, all stages joined."""

    def __init__(self, c_in: int, c_out: int, k: int = 5) -> None:
        super().__init__()
        hidden = c_in // 2
        self.cv1 = Conv(c_in, hidden)
        self.cv2 = Conv(hidden * 4, c_out)
        self.m = nn.MaxPool2d(kernel_size=k, stride=1, padding=k // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """cv2([x', pool(x'), pool^2(x'), pool^3(x')]) with x' = cv1(x)."""
        stages = [self.cv1(x)]
        for _ in range(3):
            stages.append(self.m(stages[-1]))
        return cast(torch.Tensor, self.cv2(torch.cat(stages, dim=1)))


class Attention(nn.Module):
    """Multi-head self-attention over the pixels, with a depthwise 3x3 positional term on v."""

    def __init__(self, dim: int, num_heads: int, attn_ratio: float = 0.5) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.key_dim = int(self.head_dim * attn_ratio)
        self.scale = self.key_dim**-0.5
        self.qkv = Conv(dim, dim + 2 * self.key_dim * num_heads, act=False)
        self.proj = Conv(dim, dim, act=False)
        self.pe = Conv(dim, dim, 3, g=dim, act=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """proj(attention(q, k, v) + pe(v)), per head; channels of qkv are [q, k, v] per head."""
        _, channels, height, width = x.shape
        # NOTE: -1 for the batch keeps the batch axis symbolic under torch.export.
        qkv = self.qkv(x).view(-1, self.num_heads, 2 * self.key_dim + self.head_dim, height * width)
        q, k, v = qkv.split((self.key_dim, self.key_dim, self.head_dim), dim=2)
        weights = ((q.transpose(-2, -1) @ k) * self.scale).softmax(dim=-1)
        attended = (v @ weights.transpose(-2, -1)).view(-1, channels, height, width)
        return cast(torch.Tensor, self.proj(attended + self.pe(v.reshape(-1, channels, height, width))))


class PSABlock(nn.Module):
    """Attention then a 1x1 feed-forward pair, each with a residual connection."""

    def __init__(self, c: int, num_heads: int) -> None:
        super().__init__()
        self.attn = Attention(c, num_heads=num_heads)
        self.ffn = nn.Sequential(Conv(c, 2 * c), Conv(2 * c, c, act=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x + attn(x), then + ffn(.)."""
        x = x + self.attn(x)
        return x + cast(torch.Tensor, self.ffn(x))


class C2PSA(nn.Module):
    """Split a 1x1 Conv in two halves, run PSABlocks on the second, join with a 1x1 Conv."""

    def __init__(self, c: int, n: int = 1, e: float = 0.5) -> None:
        super().__init__()
        self.c = int(c * e)
        self.cv1 = Conv(c, 2 * self.c)
        self.cv2 = Conv(2 * self.c, c)
        self.m = nn.Sequential(*(PSABlock(self.c, num_heads=self.c // 64) for _ in range(n)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """cv2([a, m(b)]) where a, b = cv1(x) split in halves."""
        a, b = self.cv1(x).split((self.c, self.c), dim=1)
        return cast(torch.Tensor, self.cv2(torch.cat((a, self.m(b)), dim=1)))


class DFL(nn.Module):
    """Distribution focal loss decoding: the expected bin of a softmax over `reg_max` bins."""

    def __init__(self, reg_max: int = REG_MAX) -> None:
        super().__init__()
        self.reg_max = reg_max
        self.conv = nn.Conv2d(reg_max, 1, 1, bias=False).requires_grad_(False)
        with torch.no_grad():
            self.conv.weight.copy_(torch.arange(reg_max, dtype=torch.float32).view(1, reg_max, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 4*reg_max, A) logits -> (N, 4, A) distances in grid cells."""
        anchors = x.shape[-1]
        bins = x.view(-1, 4, self.reg_max, anchors).transpose(2, 1).softmax(dim=1)
        return cast(torch.Tensor, self.conv(bins).view(-1, 4, anchors))


class Detect(nn.Module):
    """YOLO11 detection head: per level, a box branch (DFL bins) and a class branch (depthwise)."""

    def __init__(self, nc: int, channels: Sequence[int], strides: Sequence[int] = STRIDES) -> None:
        super().__init__()
        self.nc = nc
        self.strides = tuple(strides)
        box_c = max(16, channels[0] // 4, 4 * REG_MAX)
        cls_c = max(channels[0], min(nc, 100))
        self.cv2 = nn.ModuleList(
            nn.Sequential(Conv(c, box_c, 3), Conv(box_c, box_c, 3), nn.Conv2d(box_c, 4 * REG_MAX, 1))
            for c in channels
        )
        # NOTE: YOLO11's class branch (unlike YOLOv8's) is two depthwise-3x3 + pointwise pairs.
        self.cv3 = nn.ModuleList(
            nn.Sequential(
                nn.Sequential(dw_conv(c, c, 3), Conv(c, cls_c)),
                nn.Sequential(dw_conv(cls_c, cls_c, 3), Conv(cls_c, cls_c)),
                nn.Conv2d(cls_c, nc, 1),
            )
            for c in channels
        )
        self.dfl = DFL(REG_MAX)

    def _anchors(self, features: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        # NOTE: computed from the (static) feature sizes, so torch.export folds them into
        # constants; they cost microseconds in eager mode, so no per-size buffer is kept.
        points, strides = [], []
        for feature, stride in zip(features, self.strides, strict=True):
            height, width = feature.shape[-2:]
            xs = torch.arange(width, dtype=torch.float32, device=feature.device) + 0.5
            ys = torch.arange(height, dtype=torch.float32, device=feature.device) + 0.5
            grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
            points.append(torch.stack((grid_x.reshape(-1), grid_y.reshape(-1))))
            strides.append(torch.full((1, height * width), float(stride), device=feature.device))
        return torch.cat(points, dim=1), torch.cat(strides, dim=1)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        """Three feature maps -> (N, A, 4 + nc): cx, cy, w, h in input pixels, class probabilities."""
        box_logits = torch.cat([self.cv2[i](f).flatten(2) for i, f in enumerate(features)], dim=2)
        cls_logits = torch.cat([self.cv3[i](f).flatten(2) for i, f in enumerate(features)], dim=2)
        points, strides = self._anchors(features)
        left_top, right_bottom = self.dfl(box_logits).chunk(2, dim=1)
        x1y1 = points - left_top
        x2y2 = points + right_bottom
        boxes = torch.cat(((x1y1 + x2y2) / 2, x2y2 - x1y1), dim=1) * strides
        return torch.cat((boxes, cls_logits.sigmoid()), dim=1).transpose(1, 2)


class YOLO11(nn.Module):
    """YOLO11 detector (backbone, PAN neck, Detect head) at a given width and depth."""

    def __init__(
        self, nc: int = 80, width: float = 0.25, depth: float = 0.5, max_channels: int = 1024
    ) -> None:
        super().__init__()

        def ch(c: int) -> int:
            return max(8, math.ceil(min(c, max_channels) * width / 8) * 8)

        def rep(n: int) -> int:
            return max(round(n * depth), 1)

        layers: list[nn.Module] = [
            Conv(3, ch(64), 3, 2),  # 0  P1/2
            Conv(ch(64), ch(128), 3, 2),  # 1  P2/4
            C3k2(ch(128), ch(256), rep(2), c3k=False, e=0.25),  # 2
            Conv(ch(256), ch(256), 3, 2),  # 3  P3/8
            C3k2(ch(256), ch(512), rep(2), c3k=False, e=0.25),  # 4
            Conv(ch(512), ch(512), 3, 2),  # 5  P4/16
            C3k2(ch(512), ch(512), rep(2), c3k=True),  # 6
            Conv(ch(512), ch(1024), 3, 2),  # 7  P5/32
            C3k2(ch(1024), ch(1024), rep(2), c3k=True),  # 8
            SPPF(ch(1024), ch(1024), 5),  # 9
            C2PSA(ch(1024), rep(2)),  # 10
            nn.Upsample(scale_factor=2.0, mode="nearest"),  # 11
            nn.Identity(),  # 12 concat [11, 6]
            C3k2(ch(1024) + ch(512), ch(512), rep(2), c3k=False),  # 13
            nn.Upsample(scale_factor=2.0, mode="nearest"),  # 14
            nn.Identity(),  # 15 concat [14, 4]
            C3k2(ch(512) + ch(512), ch(256), rep(2), c3k=False),  # 16 P3 out
            Conv(ch(256), ch(256), 3, 2),  # 17
            nn.Identity(),  # 18 concat [17, 13]
            C3k2(ch(256) + ch(512), ch(512), rep(2), c3k=False),  # 19 P4 out
            Conv(ch(512), ch(512), 3, 2),  # 20
            nn.Identity(),  # 21 concat [20, 10]
            C3k2(ch(512) + ch(1024), ch(1024), rep(2), c3k=True),  # 22 P5 out
            Detect(nc, (ch(256), ch(512), ch(1024))),  # 23
        ]
        # NOTE: kept as `model.<i>` so the checkpoint's state_dict keys load unchanged.
        self.model = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) RGB in [0, 1], H and W multiples of 32 -> (N, A, 4 + nc)."""
        height, width = x.shape[-2:]
        if height % 32 or width % 32:
            raise ValueError(f"input height and width must be multiples of 32, got {height}x{width}")
        m = self.model
        p3_in = m[4](m[3](m[2](m[1](m[0](x)))))
        p4_in = m[6](m[5](p3_in))
        p5_in = m[10](m[9](m[8](m[7](p4_in))))
        n13 = m[13](torch.cat((m[11](p5_in), p4_in), dim=1))
        p3 = m[16](torch.cat((m[14](n13), p3_in), dim=1))
        p4 = m[19](torch.cat((m[17](p3), n13), dim=1))
        p5 = m[22](torch.cat((m[20](p4), p5_in), dim=1))
        return cast(torch.Tensor, m[23]([p3, p4, p5]))


def detection_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The checkpoint's state_dict without the segmentation-only keys of the head."""
    return {k: v for k, v in state_dict.items() if not k.startswith(SEGMENTATION_ONLY)}


def build_yolo11n(input_size: int = 640) -> tuple[nn.Module, list[str], dict[str, object]]:
    """YOLO11n (eval mode, COCO weights), its 80 class names and provenance for `input_size`."""
    if input_size <= 0 or input_size % 32:
        raise ExportError(f"input_size must be a positive multiple of 32, got {input_size}")
    started = time.perf_counter()
    weights = WEIGHTS["yolo11n"]
    checkpoint = load_ultralytics_checkpoint(fetch(weights))
    module = YOLO11(nc=len(checkpoint.names))
    try:
        module.load_state_dict(detection_state_dict(checkpoint.state_dict), strict=True)
    except RuntimeError as exc:
        raise ExportError(f"{weights.member} does not fit the YOLO11n rebuild: {exc}") from exc
    module.eval().requires_grad_(False)
    provenance: dict[str, object] = {
        "source": "embedded:yolo11n",
        "package": weights.package,
        "version": weights.version,
        "member": weights.member,
        "sha256": weights.sha256,
        "license": weights.license,
        "upstream": weights.url_note,
        "architecture": "YOLO11n (visionserve's own torch rebuild)",
        "input_size": input_size,
        "ultralytics_version": checkpoint.meta.get("version"),
    }
    logger.info("built YOLO11n in %.2f s", time.perf_counter() - started)
    return module, checkpoint.names, provenance

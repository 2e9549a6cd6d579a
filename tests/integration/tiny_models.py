"""Small models for export tests (importable as `--factory tests.integration.tiny_models:NAME`)."""

from __future__ import annotations

import torch
from torch import nn


class TinyClassifier(nn.Module):
    """A 4-class conv net: small enough to export in seconds."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1)
        )
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.features(x), 1))


class NoisyClassifier(TinyClassifier):
    """Adds fresh random noise on every call: ONNX Runtime and PyTorch can never agree on it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = super().forward(x)
        return logits + 10.0 * torch.rand_like(logits)


class TinyDetector(nn.Module):
    """A 4-class "detector": an 8x8 grid of cells, each with a box (centre, size in input pixels)
    and 4 class probabilities computed from the image; the contract of a served detector."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(8))
        self.head = nn.Conv2d(8, 4 + 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cells = self.head(self.features(x)).flatten(2).transpose(1, 2)  # (N, 64, 8)
        size = float(x.shape[-1])
        boxes = torch.sigmoid(cells[..., :4]) * size
        return torch.cat((boxes, torch.sigmoid(cells[..., 4:] * 4.0)), dim=-1)


def tiny() -> nn.Module:
    """Factory for TinyClassifier."""
    return TinyClassifier()


def tiny_detector() -> nn.Module:
    """Factory for TinyDetector."""
    return TinyDetector()


def noisy() -> nn.Module:
    """Factory for NoisyClassifier."""
    return NoisyClassifier()


def not_a_module() -> object:
    """A factory that returns the wrong thing."""
    return {"weights": [1, 2, 3]}

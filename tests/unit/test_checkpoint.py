"""Ultralytics checkpoints load through inert stand-ins; anything that would run code is refused."""

from __future__ import annotations

import builtins
import os
import sys
import types
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from export.checkpoint import load_ultralytics_checkpoint
from export.errors import ExportError


def _fake_module(monkeypatch: pytest.MonkeyPatch, qualified: str, *classes: type) -> None:
    """Register `classes` under the module `qualified` (and its parents) so pickle names them."""
    parts = qualified.split(".")
    for i in range(1, len(parts) + 1):
        name = ".".join(parts[:i])
        if name not in sys.modules:
            monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    for cls in classes:
        cls.__module__ = qualified
        setattr(sys.modules[qualified], cls.__name__, cls)


class Conv(nn.Module):
    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c_out, eps=1e-3)
        self.act = nn.SiLU()
        self.register_buffer("scratch", torch.zeros(1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class DetectionModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.model = nn.Sequential(Conv(3, 4), Conv(4, 2))
        self.names = {0: "person", 1: "bicycle"}
        self.stride = torch.tensor([8.0, 16.0, 32.0])
        self.yaml = {"nc": 2, "scale": "n"}
        # Pickles as builtins.getattr(Conv, "forward"), as ultralytics' Segment head does.
        self.detect = Conv.forward


class EvilBlock(nn.Module):
    """A class the loader has never heard of."""


@pytest.fixture
def fake_ultralytics(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_module(monkeypatch, "ultralytics.nn.modules.conv", Conv)
    _fake_module(monkeypatch, "ultralytics.nn.tasks", DetectionModel)
    _fake_module(monkeypatch, "ultralytics.nn.modules.block", EvilBlock)


def _save(obj: object, path: Path) -> Path:
    torch.save(obj, path)
    return path


def test_synthetic_checkpoint_loads_as_float32_state_dict_names_and_meta(
    fake_ultralytics: None, tmp_path: Path
) -> None:
    model = DetectionModel().half()
    with torch.no_grad():
        model.model[0].conv.weight.normal_()
    path = _save(
        {"model": model, "ema": None, "version": "8.2.100", "train_args": {"imgsz": 640}}, tmp_path / "m.pt"
    )

    checkpoint = load_ultralytics_checkpoint(path)

    expected = model.state_dict()
    assert list(checkpoint.state_dict) == list(expected)  # the non-persistent buffer is not there
    assert "model.0.scratch" not in checkpoint.state_dict
    for key, value in expected.items():
        got = checkpoint.state_dict[key]
        assert got.dtype == (torch.float32 if value.is_floating_point() else value.dtype), key
        torch.testing.assert_close(got, value.to(got.dtype), rtol=0, atol=0)
    assert checkpoint.names == ["person", "bicycle"]
    assert checkpoint.meta["model_class"] == "ultralytics.nn.tasks.DetectionModel"
    assert checkpoint.meta["stride"] == [8.0, 16.0, 32.0]
    assert checkpoint.meta["yaml"] == {"nc": 2, "scale": "n"}
    assert checkpoint.meta["version"] == "8.2.100"
    kind, attributes = checkpoint.modules["model.0.conv"]
    assert kind == "torch.nn.modules.conv.Conv2d" and attributes["padding"] == [1, 1]
    assert checkpoint.modules["model.0.bn"][1]["eps"] == 1e-3


class _Payload:
    """Pickles as a call to `function(*args)`: what a booby-trapped checkpoint carries."""

    def __init__(self, function: Callable[..., object], *args: object) -> None:
        self.function, self.args = function, args

    def __reduce__(self) -> tuple[object, tuple[object, ...]]:
        return self.function, self.args

    def __call__(self, *args: object) -> None:
        raise AssertionError("never called while pickling")


@pytest.mark.parametrize(
    ("make_payload", "refused"),
    [
        (lambda marker: _Payload(os.system, f"touch {marker}"), "posix"),
        (lambda marker: _Payload(builtins.exec, f"open({str(marker)!r}, 'w').close()"), "exec"),
        (lambda marker: _Payload(builtins.eval, f"open({str(marker)!r}, 'w')"), "eval"),
        # getattr is answered by an inert stand-in: its result can never be called.
        (
            lambda marker: _Payload(_Payload(builtins.getattr, Conv, "__init__"), str(marker)),
            "unrecognized function",
        ),
    ],
    ids=["os.system", "builtins.exec", "builtins.eval", "getattr-then-call"],
)
def test_a_checkpoint_carrying_a_payload_is_refused_and_nothing_runs(
    fake_ultralytics: None,
    tmp_path: Path,
    make_payload: Callable[[Path], object],
    refused: str,
) -> None:
    marker = tmp_path / "MARKER"
    model = DetectionModel()
    model.trap = make_payload(marker)  # hidden deep inside an otherwise valid checkpoint
    path = _save({"model": model}, tmp_path / "evil.pt")

    with pytest.raises(ExportError, match="refused by the weights-only unpickler") as caught:
        load_ultralytics_checkpoint(path)

    assert not marker.exists()
    assert refused in str(caught.value)
    assert "weights_only=False" not in str(caught.value)  # never advise turning the guard off


def test_an_unknown_class_is_refused(fake_ultralytics: None, tmp_path: Path) -> None:
    model = DetectionModel()
    model.model.append(EvilBlock())
    with pytest.raises(ExportError, match=r"ultralytics\.nn\.modules\.block\.EvilBlock"):
        load_ultralytics_checkpoint(_save({"model": model}, tmp_path / "unknown.pt"))


def test_checkpoints_without_a_model_or_names_are_explained(fake_ultralytics: None, tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="no pickled model"):
        load_ultralytics_checkpoint(_save({"model": {"weight": torch.zeros(1)}}, tmp_path / "sd.pt"))
    nameless = DetectionModel()
    del nameless.names
    with pytest.raises(ExportError, match="no class names"):
        load_ultralytics_checkpoint(_save({"model": nameless}, tmp_path / "nameless.pt"))
    with pytest.raises(ExportError, match="does not exist"):
        load_ultralytics_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a zip")
    with pytest.raises(ExportError, match=r"junk\.pt"):
        load_ultralytics_checkpoint(tmp_path / "junk.pt")


@pytest.mark.real_model
def test_the_pinned_yolo11n_checkpoint_loads() -> None:
    from export.weights import WEIGHTS, fetch

    checkpoint = load_ultralytics_checkpoint(fetch(WEIGHTS["yolo11n"]))

    assert len(checkpoint.names) == 80
    assert checkpoint.names[0] == "person" and checkpoint.names[-1] == "toothbrush"
    assert len(checkpoint.state_dict) == 561  # detection keys + the segmentation head's proto/cv4
    assert sum(k.startswith(("model.23.proto.", "model.23.cv4.")) for k in checkpoint.state_dict) == 62
    assert all(v.dtype == torch.float32 for v in checkpoint.state_dict.values() if v.is_floating_point())
    assert checkpoint.meta["model_class"] == "ultralytics.nn.tasks.SegmentationModel"
    assert checkpoint.meta["stride"] == [8.0, 16.0, 32.0]
    assert checkpoint.meta["version"] == "8.2.100"

"""The export step: a model becomes a verified repository entry, or nothing is written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from export.cli import main as export_main
from tests.integration.tiny_models import TinyClassifier
from visionserve.photos import packaged_photo
from visionserve.preprocessing import ImagePreprocessor
from visionserve.repository import ModelRepository, file_sha256
from visionserve.runtimes.onnx import OnnxRuntime
from visionserve.runtimes.torch import TorchRuntime

LABELS = ["red", "green", "blue", "other"]


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ("chelsea.png", "coffee.png", "rocket.jpg"):
        shutil.copy(packaged_photo(name), folder / name)
    return folder


@pytest.fixture
def labels(tmp_path: Path) -> Path:
    path = tmp_path / "labels.txt"
    path.write_text("\n".join(LABELS) + "\n")
    return path


def _export(repo: Path, photos: Path, labels: Path, *extra: str, factory: str = "tiny") -> int:
    return export_main(
        [
            "--factory",
            f"tests.integration.tiny_models:{factory}",
            "--labels",
            str(labels),
            "--repository",
            str(repo),
            "--photos",
            str(photos),
            "--input-size",
            "64",
            "--max-batch-size",
            "4",
            *extra,
        ]
    )


def test_factory_export_writes_a_servable_verified_entry(
    tmp_path: Path, photos: Path, labels: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    repo = tmp_path / "repo"
    assert _export(repo, photos, labels, "--name", "tiny") == 0
    out = capsys.readouterr().out
    assert "[1/6]" in out and "[6/6]" in out and "parity check on 3 real photos" in out

    entry = ModelRepository(repo).get("tiny")
    config = entry.config
    assert entry.labels == tuple(LABELS)
    assert config.input.size == (64, 64) and config.input.resize == 73
    assert config.max_batch_size == 4
    assert config.provenance["source"] == "factory:tests.integration.tiny_models:tiny"
    assert config.parity["passed"] is True and config.parity["max_abs_prob_diff"] < 1e-4
    assert [p["photo"] for p in config.parity["photos"]] == ["chelsea.png", "coffee.png", "rocket.jpg"]
    for backend in ("onnx", "torch"):
        path = entry.artefact_path(backend)
        assert config.artefacts[backend].sha256 == file_sha256(path)
    assert config.artefacts["onnx"].model_extra == {"opset": 18}
    assert not [p for p in repo.iterdir() if p.name.startswith(".")], "staging folder left behind"

    # what was written is what the model computes, through both serving runtimes, at batch 1 and 3
    preprocessor = ImagePreprocessor(config.input, max_image_pixels=10**8)
    batch = np.stack([preprocessor(p.read_bytes()) for p in sorted(photos.iterdir())])
    with torch.inference_mode():
        expected = TinyClassifier().eval()(torch.from_numpy(batch)).numpy()
    for runtime in (OnnxRuntime(entry, threads=1), TorchRuntime(entry, threads=1)):
        runtime.load()
        np.testing.assert_allclose(runtime.predict_batch(batch), expected, atol=1e-4)
        np.testing.assert_allclose(runtime.predict_batch(batch[:1]), expected[:1], atol=1e-4)


def test_a_factory_detector_exports_to_a_servable_verified_detection_entry(
    tmp_path: Path, photos: Path, labels: Path
) -> None:
    """`--task detection`: letterbox input, boxes out, detection parity (same objects, boxes within
    a pixel), and the entry serves through the detection task."""
    repo = tmp_path / "repo"
    assert (
        _export(repo, photos, labels, "--task", "detection", "--name", "tinydet", factory="tiny_detector")
        == 0
    )
    entry = ModelRepository(repo).get("tinydet")
    config = entry.config
    assert config.task == "detection" and config.input.fit == "letterbox" and config.output.kind == "boxes"
    assert config.input.size == (64, 64) and config.detection is not None
    assert config.parity["passed"] and config.parity["same_objects"]
    from visionserve.tasks import create_task

    task = create_task(entry, max_image_pixels=10**8)
    runtime = OnnxRuntime(entry, threads=1)
    runtime.load()
    prepared = task.preprocess((photos / "chelsea.png").read_bytes())
    found = task.postprocess(
        runtime.predict_batch(prepared.tensor[np.newaxis])[0], prepared.meta, task.parameters({})
    )
    assert found.width == 451 and found.height == 300  # type: ignore[attr-defined]
    assert (
        _export(repo, photos, labels, "--task", "detection", "--resize", "80", factory="tiny_detector") == 1
    )


def test_failed_parity_fails_loudly_and_writes_nothing(
    tmp_path: Path, photos: Path, labels: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    repo = tmp_path / "repo"
    assert _export(repo, photos, labels, factory="noisy") == 1
    err = capsys.readouterr().err
    assert "parity check failed" in err and "nothing was written" in err
    assert list(repo.iterdir()) == []


def test_existing_entry_needs_force(
    tmp_path: Path, photos: Path, labels: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    repo = tmp_path / "repo"
    assert _export(repo, photos, labels) == 0
    before = json.loads((repo / "tiny" / "config.json").read_text())["provenance"]["exported_at"]
    capsys.readouterr()
    assert _export(repo, photos, labels) == 1
    assert "--force" in capsys.readouterr().err
    assert _export(repo, photos, labels, "--force") == 0
    assert json.loads((repo / "tiny" / "config.json").read_text())["provenance"]["exported_at"] >= before


def test_factory_errors_are_clear(
    tmp_path: Path, photos: Path, labels: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _export(tmp_path / "r", photos, labels, factory="not_a_module") == 1
    assert "not a torch.nn.Module" in capsys.readouterr().err
    assert export_main(["--factory", "no_such_module_xyz:make", "--repository", str(tmp_path / "r")]) == 1
    assert "cannot import" in capsys.readouterr().err
    assert (
        export_main(
            [
                "--factory",
                "tests.integration.tiny_models:tiny",
                "--repository",
                str(tmp_path / "r"),
                "--photos",
                str(photos),
            ]
        )
        == 1
    )
    assert "--labels" in capsys.readouterr().err
    wrong = tmp_path / "three.txt"
    wrong.write_text("a\nb\nc\n")
    assert _export(tmp_path / "r", photos, wrong) == 1
    assert "4 classes but there are 3 labels" in capsys.readouterr().err


def test_factory_with_weights_file(tmp_path: Path, photos: Path, labels: Path) -> None:
    model = TinyClassifier()
    with torch.no_grad():
        model.head.bias.fill_(0.5)
    weights = tmp_path / "tiny.pth"
    torch.save(model.state_dict(), weights)
    assert _export(tmp_path / "repo", photos, labels, "--weights", str(weights)) == 0
    entry = ModelRepository(tmp_path / "repo").get("tiny")
    assert entry.config.provenance["weights_sha256"] == file_sha256(weights)


def test_pickled_whole_model_is_refused(
    tmp_path: Path, photos: Path, labels: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pickled = tmp_path / "whole.pth"
    torch.save(TinyClassifier(), pickled)  # a pickled module, not a state_dict
    assert _export(tmp_path / "repo", photos, labels, "--weights", str(pickled)) == 1
    assert "weights_only=True" in capsys.readouterr().err


def test_torchvision_arch_says_what_to_do_when_torchvision_is_unusable(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The CPU torch build here has no working torchvision: the error says so and offers --factory."""
    pytest.importorskip("torch")
    try:
        import torchvision  # noqa: F401
    except Exception:
        pass
    else:
        pytest.skip("torchvision imports here; the error path cannot be reached")
    weights = tmp_path / "resnet18.pth"
    weights.write_bytes(b"unused")
    assert export_main(["--arch", "resnet18", "--weights", str(weights), "--repository", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "torchvision" in err and "--factory" in err


def test_arch_needs_weights(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert export_main(["--arch", "resnet18", "--repository", str(tmp_path)]) == 1
    assert "--weights" in capsys.readouterr().err

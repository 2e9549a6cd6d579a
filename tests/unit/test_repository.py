"""The model repository: config.json, labels and artefacts (visionserve/repository.py)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from tests.fixtures import FAKE_CLASSES, write_fake_entry
from visionserve.errors import ConfigurationError
from visionserve.repository import CONFIG_FILE, InputSpec, ModelRepository, file_sha256


def _write_artefact(repository: Path, name: str = "fake", content: bytes = b"onnx bytes") -> str:
    """Write `<name>/1/model.onnx`; returns its sha256."""
    path = repository / name / "1" / "model.onnx"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return hashlib.sha256(content).hexdigest()


def test_valid_entry(tmp_path: Path) -> None:
    entry = write_fake_entry(tmp_path, size=48)
    assert entry.name == "fake"
    assert entry.root == tmp_path / "fake"
    assert len(entry.labels) == FAKE_CLASSES
    assert entry.labels[0] == "class_0"
    assert entry.config.output.classes == FAKE_CLASSES
    assert entry.config.output.kind == "logits"
    assert entry.config.input.size == (48, 48)
    assert entry.config.input.resize == 48 + 48 // 7
    assert ModelRepository(tmp_path).names() == ["fake"]


def test_names_lists_only_folders_with_a_config(tmp_path: Path) -> None:
    write_fake_entry(tmp_path, name="b")
    write_fake_entry(tmp_path, name="a")
    (tmp_path / "not_a_model").mkdir()
    assert ModelRepository(tmp_path).names() == ["a", "b"]
    assert ModelRepository(tmp_path / "missing").names() == []


def test_missing_model_lists_present_models(tmp_path: Path) -> None:
    write_fake_entry(tmp_path, name="alpha")
    write_fake_entry(tmp_path, name="beta")
    with pytest.raises(ConfigurationError) as info:
        ModelRepository(tmp_path).get("gamma")
    message = str(info.value)
    assert "'gamma'" in message
    assert "alpha, beta" in message
    assert str(tmp_path) in message
    assert "VISION_MODEL_REPOSITORY" in message


def test_missing_repository_says_none_present(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match=r"models present: none"):
        ModelRepository(tmp_path / "nowhere").get("fake")


def test_config_that_is_not_json(tmp_path: Path) -> None:
    write_fake_entry(tmp_path)
    config_path = tmp_path / "fake" / CONFIG_FILE
    config_path.write_text("{not json")
    with pytest.raises(ConfigurationError) as info:
        ModelRepository(tmp_path).get("fake")
    assert str(config_path) in str(info.value)
    assert "not valid" in str(info.value)


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"output": {"classes": 0}}, "classes"),
        ({"input": {"size": [224, 224], "resize": 200}}, "resize"),
        ({"input": {"size": [32, 32], "resize": 36, "std": [0.2, 0.0, 0.2]}}, "std"),
        ({"input": {"size": [32, 32], "resize": 36, "colour": "BGR"}}, "colour"),  # extra="forbid"
        ({"task": "detection"}, "task"),
        ({"artefacts": {"tensorflow": {"path": "x"}}}, "tensorflow"),
    ],
)
def test_config_that_breaks_the_schema(tmp_path: Path, change: dict[str, object], fragment: str) -> None:
    write_fake_entry(tmp_path)
    config_path = tmp_path / "fake" / CONFIG_FILE
    config = json.loads(config_path.read_text())
    config.update(change)
    config_path.write_text(json.dumps(config))
    with pytest.raises(ConfigurationError) as info:
        ModelRepository(tmp_path).get("fake")
    assert str(config_path) in str(info.value)
    assert fragment in str(info.value)


def test_input_spec_defaults_are_imagenet() -> None:
    spec = InputSpec()
    assert spec.size == (224, 224)
    assert spec.resize == 256
    assert spec.mean == (0.485, 0.456, 0.406)
    assert spec.std == (0.229, 0.224, 0.225)


def test_missing_labels_file(tmp_path: Path) -> None:
    write_fake_entry(tmp_path)
    (tmp_path / "fake" / "labels.txt").unlink()
    with pytest.raises(ConfigurationError, match=r"labels\.txt is missing"):
        ModelRepository(tmp_path).get("fake")


def test_labels_count_mismatch(tmp_path: Path) -> None:
    write_fake_entry(tmp_path)
    labels = tmp_path / "fake" / "labels.txt"
    labels.write_text("\n".join(f"c{i}" for i in range(FAKE_CLASSES - 1)) + "\n\n\n")  # blank lines ignored
    with pytest.raises(ConfigurationError) as info:
        ModelRepository(tmp_path).get("fake")
    message = str(info.value)
    assert f"has {FAKE_CLASSES - 1} labels" in message
    assert f"declares {FAKE_CLASSES} classes" in message


def test_artefact_with_matching_sha256(tmp_path: Path) -> None:
    digest = _write_artefact(tmp_path)
    entry = write_fake_entry(tmp_path, artefacts={"onnx": {"path": "1/model.onnx", "sha256": digest}})
    path = entry.artefact_path("onnx")
    assert path == (tmp_path / "fake" / "1" / "model.onnx").resolve()
    assert file_sha256(path) == digest


def test_artefact_sha256_mismatch(tmp_path: Path) -> None:
    digest = _write_artefact(tmp_path, content=b"what was exported")
    entry = write_fake_entry(tmp_path, artefacts={"onnx": {"path": "1/model.onnx", "sha256": digest}})
    _write_artefact(tmp_path, content=b"what is there now")
    with pytest.raises(ConfigurationError) as info:
        entry.artefact_path("onnx")
    assert "sha256" in str(info.value)
    assert "re-run the export step" in str(info.value)


def test_artefact_missing_file(tmp_path: Path) -> None:
    entry = write_fake_entry(tmp_path)  # names 1/model.onnx, which is not written
    with pytest.raises(ConfigurationError, match=r"model\.onnx is missing"):
        entry.artefact_path("onnx")


def test_artefact_for_another_backend(tmp_path: Path) -> None:
    entry = write_fake_entry(tmp_path)
    with pytest.raises(ConfigurationError) as info:
        entry.artefact_path("torch")
    assert "no torch artefact" in str(info.value)
    assert "onnx" in str(info.value)


@pytest.mark.parametrize("artefact", ["../outside.onnx", "../../outside.onnx", "1/../../outside.onnx"])
def test_artefact_path_escaping_the_folder(tmp_path: Path, artefact: str) -> None:
    repository = tmp_path / "deep" / "repo"
    for outside in (tmp_path / "deep" / "outside.onnx", repository / "outside.onnx"):
        outside.parent.mkdir(parents=True, exist_ok=True)
        outside.write_bytes(b"not yours")
    entry = write_fake_entry(repository, artefacts={"onnx": {"path": artefact}})
    with pytest.raises(ConfigurationError, match="leaves the model folder"):
        entry.artefact_path("onnx")


def test_absolute_artefact_path(tmp_path: Path) -> None:
    outside = tmp_path / "outside.onnx"
    outside.write_bytes(b"not yours")
    entry = write_fake_entry(tmp_path / "repo", artefacts={"onnx": {"path": str(outside)}})
    with pytest.raises(ConfigurationError, match="leaves the model folder"):
        entry.artefact_path("onnx")


def test_artefact_symlink_escaping_the_folder(tmp_path: Path) -> None:
    outside = tmp_path / "outside.onnx"
    outside.write_bytes(b"not yours")
    entry = write_fake_entry(tmp_path / "repo")
    link = entry.root / "1" / "model.onnx"
    link.parent.mkdir()
    link.symlink_to(outside)
    with pytest.raises(ConfigurationError, match="leaves the model folder"):
        entry.artefact_path("onnx")

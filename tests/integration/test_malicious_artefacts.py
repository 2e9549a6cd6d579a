"""Model files that would run code when unpickled are refused before anything unpickles them.

Each payload, if unpickled, runs `touch MARKER`. The tests first show the payload is live (plain
`torch.export.load` / `torch.load(weights_only=False)` in a child process does create the
marker), then that visionserve's loading paths refuse the same file and the marker never
appears. The artefact's sha256 in config.json is updated as an attacker who can write the model
folder would do, so the hash check alone does not stop it.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from tests.conftest import DEFAULT_MODEL
from tests.integration.test_export import LABELS, _export
from visionserve.errors import ConfigurationError
from visionserve.photos import packaged_photo
from visionserve.repository import ModelRepository, file_sha256
from visionserve.runtimes import runtime_from_settings
from visionserve.settings import ModelSettings

pytestmark = [pytest.mark.real_model, pytest.mark.slow]


class _Payload:
    """Unpickling this runs `touch <marker>`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


def _live(marker: Path, code: str) -> None:
    """Run `code` in a child process and check it created `marker` (the payload is real)."""
    subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, timeout=120)
    assert marker.exists(), "the payload did not run: the test would prove nothing"
    marker.unlink()


def _tampered_repository(real_repository: Path, tmp_path: Path, marker: Path) -> Path:
    """A copy of the real model whose .pt2 stores its first weight pickled: the payload."""
    repository = tmp_path / "repo"
    shutil.copytree(real_repository / DEFAULT_MODEL, repository / DEFAULT_MODEL)
    entry = repository / DEFAULT_MODEL
    config = json.loads((entry / "config.json").read_text())
    artefact = entry / config["artefacts"]["torch"]["path"]
    original = artefact.read_bytes()
    with zipfile.ZipFile(io.BytesIO(original)) as src, zipfile.ZipFile(artefact, "w") as dst:
        [weights_config] = [n for n in src.namelist() if n.endswith("/weights/model_weights_config.json")]
        weights = json.loads(src.read(weights_config))
        first = next(iter(weights["config"]))
        weights["config"][first]["use_pickle"] = True
        payload_name = weights_config.rsplit("/", 1)[0] + "/" + weights["config"][first]["path_name"]
        for item in src.infolist():
            data = src.read(item)
            if item.filename == weights_config:
                data = json.dumps(weights).encode()
            elif item.filename == payload_name:
                data = pickle.dumps(_Payload(marker))
            dst.writestr(item, data)
    config["artefacts"]["torch"]["sha256"] = file_sha256(artefact)
    (entry / "config.json").write_text(json.dumps(config))
    return repository


def test_a_pt2_with_a_pickled_payload_is_refused_before_loading(
    real_repository: Path, tmp_path: Path
) -> None:
    marker = tmp_path / "payload-ran"
    repository = _tampered_repository(real_repository, tmp_path, marker)
    artefact = repository / DEFAULT_MODEL / "1" / "model.pt2"
    _live(marker, f"import torch; torch.export.load({str(artefact)!r})")

    runtime = runtime_from_settings(
        ModelSettings(model_repository=repository, backend="torch", torch_compile=False)
    )
    with pytest.raises(ConfigurationError, match="pickled"):
        runtime.load()
    assert not marker.exists()
    # and the repository's own validation accepted the (re-hashed) entry: the refusal is the pickle check's
    assert ModelRepository(repository).get(DEFAULT_MODEL).artefact_path("torch") == artefact


def test_a_pickled_weights_file_is_refused_by_export(tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    shutil.copy(packaged_photo("coffee.png"), photos / "coffee.png")
    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join(LABELS) + "\n")
    marker = tmp_path / "payload-ran"
    weights = tmp_path / "weights.pth"
    torch.save(_Payload(marker), weights)
    _live(marker, f"import torch; torch.load({str(weights)!r}, weights_only=False)")

    assert _export(tmp_path / "repo", photos, labels, "--weights", str(weights)) == 1
    assert not marker.exists() and not (tmp_path / "repo").exists()

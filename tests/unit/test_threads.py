"""The thread budget: instances x intra-op threads + the preprocessing pool, from settings, the
model's config.json and the usable cores."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.fixtures import write_fake_entry
from visionserve import cpu
from visionserve.cpu import plan_threads
from visionserve.errors import ConfigurationError
from visionserve.runtimes import create_runtime, thread_layout
from visionserve.settings import ModelSettings


@pytest.mark.parametrize(
    ("cores", "options", "expected"),
    [
        # the runtime shares every core among its instances; the pool is sized to the cores
        (2, {}, (1, 2, 2)),
        (8, {}, (1, 8, 8)),
        (8, {"instances": 2}, (2, 4, 8)),
        (8, {"instances": 3}, (3, 2, 8)),
        (8, {"threads": 2}, (1, 2, 8)),
        (8, {"instances": 2, "threads": 1, "preprocess_workers": 3}, (2, 1, 3)),
        (1, {}, (1, 1, 1)),
        # on CUDA the GPU computes: one intra-op thread per instance
        (8, {"device": "cuda"}, (1, 1, 8)),
        (8, {"device": "cuda", "instances": 2}, (2, 1, 8)),
    ],
)
def test_default_layout(cores: int, options: dict[str, object], expected: tuple[int, int, int]) -> None:
    layout = plan_threads(cores=cores, **options)  # type: ignore[arg-type]
    assert (layout.instances, layout.threads, layout.preprocess_workers) == expected
    assert layout.cores == cores
    assert str(cores) in layout.describe()


def test_more_runtime_threads_than_cores_is_refused() -> None:
    with pytest.raises(ValueError, match=r"2 instance\(s\) x 2 intra-op thread\(s\) = 4 .* 2 core"):
        plan_threads(cores=2, instances=2, threads=2)
    with pytest.raises(ValueError, match="3 runtime threads"):
        plan_threads(cores=2, instances=3)  # even one thread each is too many


def test_layout_reads_config_json_and_the_environment_overrides_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cpu, "available_cpus", lambda: 4)
    entry = write_fake_entry(tmp_path, instances=2, threads=1)
    assert thread_layout(entry, ModelSettings(model_repository=tmp_path)).runtime_threads == 2
    layout = thread_layout(entry, ModelSettings(model_repository=tmp_path, threads=2))
    assert (layout.instances, layout.threads) == (2, 2)
    monkeypatch.setenv("VISION_INSTANCES", "1")
    layout = thread_layout(entry, ModelSettings(model_repository=tmp_path))
    assert (layout.instances, layout.threads) == (1, 1)  # threads still from config.json


def test_a_layout_too_big_for_the_cores_names_the_settings_and_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cpu, "available_cpus", lambda: 2)
    entry = write_fake_entry(tmp_path, instances=2)
    settings = ModelSettings(model_repository=tmp_path, threads=2)
    with pytest.raises(ConfigurationError) as caught:
        create_runtime(entry, settings)
    message = str(caught.value)
    assert "VISION_THREADS" in message and "VISION_INSTANCES" in message
    assert str(entry.root / "config.json") in message


def test_bad_instances_in_config_json_are_refused_at_load(tmp_path: Path) -> None:
    from visionserve.repository import ModelRepository

    write_fake_entry(tmp_path)
    path = tmp_path / "fake" / "config.json"
    config = json.loads(path.read_text())
    config["instances"] = 0
    path.write_text(json.dumps(config))
    with pytest.raises(ConfigurationError, match="instances"):
        ModelRepository(tmp_path).get("fake")


def test_runtime_gets_the_layout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu, "available_cpus", lambda: 4)
    entry = write_fake_entry(tmp_path)
    runtime = create_runtime(entry, ModelSettings(model_repository=tmp_path, instances=2))
    assert (runtime.instances, runtime.threads) == (2, 2)
    assert runtime.describe()["instances"] == 2

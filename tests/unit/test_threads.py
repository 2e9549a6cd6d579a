"""The thread budget: instances x intra-op threads + the preprocessing pool, from settings, the
model's config.json and the usable cores."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from tests.fixtures import write_fake_entry
from visionserve import cpu
from visionserve.cpu import FIXED, NARROW, WIDE, Lane, narrow_sessions, plan_adaptive, plan_threads
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


# --- the adaptive layout (issue 15) --------------------------------------------------------------

ADAPTIVE_2 = "adaptive: 1x2 for a lone request, 2x1 under load"


@pytest.mark.parametrize(
    ("cores", "expected"),
    [(1, (1, 1)), (2, (2, 1)), (3, (3, 1)), (4, (4, 1)), (5, (4, 1)), (6, (3, 2)), (8, (4, 2)), (16, (4, 4))],
)
def test_narrow_sessions_use_every_core_then_as_many_sessions_as_possible_up_to_4(
    cores: int, expected: tuple[int, int]
) -> None:
    assert narrow_sessions(cores) == expected


def test_an_adaptive_layout_has_a_wide_session_and_narrow_ones() -> None:
    layout = plan_adaptive(cores=2, reason="why")
    assert layout.adaptive and layout.reason == "why"
    assert layout.lanes == (Lane(WIDE, 1, 2), Lane(NARROW, 2, 1))
    assert (layout.instances, layout.threads, layout.runtime_threads) == (2, 2, 2)
    assert layout.summary == "adaptive: 1x2 for a lone request, 2x1 under load"
    assert "adaptive: 1x2 for a lone request, 2x1 under load" in layout.describe()
    big = plan_adaptive(cores=16)
    assert big.summary == "adaptive: 1x16 for a lone request, 4x4 under load" and big.runtime_threads == 16
    assert plan_adaptive(cores=8, threads=4, instances=2).lanes == (Lane(WIDE, 1, 4), Lane(NARROW, 2, 2))
    one = plan_adaptive(cores=1)
    assert not one.adaptive and (one.instances, one.threads) == (1, 1) and "one core" in one.reason
    with pytest.raises(ValueError, match="wide session of 4"):
        plan_adaptive(cores=2, threads=4)
    with pytest.raises(ValueError, match="at least 2 narrow"):
        plan_adaptive(cores=2, instances=1)
    with pytest.raises(ValueError, match="3 narrow session"):
        plan_adaptive(cores=2, instances=3)


def _layout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, config: dict[str, object], **settings: object):  # type: ignore[no-untyped-def]
    monkeypatch.setattr(cpu, "available_cpus", lambda: 2)
    entry = write_fake_entry(tmp_path, **config)
    return thread_layout(entry, ModelSettings(model_repository=tmp_path, **settings))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("config", "settings", "expected"),
    [
        # the default: adaptive where nothing sets a layout (the exporter's instances 1 sets none)
        ({}, {}, (ADAPTIVE_2, "the default")),
        ({"instances": 1, "threads": None}, {}, (ADAPTIVE_2, "the default")),
        # any explicit setting: the fixed layout it gives, as before
        ({}, {"threads": 2}, ("fixed: 1x2", "set by VISION_THREADS=2")),
        ({}, {"threads": 1}, ("fixed: 1x1", "VISION_THREADS=1")),
        ({}, {"instances": 2}, ("fixed: 2x1", "set by VISION_INSTANCES=2")),
        ({"threads": 1}, {}, ("fixed: 1x1", "threads 1 in config.json")),
        ({"instances": 2}, {}, ("fixed: 2x1", "instances 2 in config.json")),
        # the old default, forced
        ({}, {"layout": "fixed"}, ("fixed: 1x2", "VISION_LAYOUT=fixed")),
        ({}, {"layout": "fixed", "instances": 2}, ("fixed: 2x1", "VISION_LAYOUT=fixed")),
        # adaptive forced, sized by the settings
        ({}, {"layout": "adaptive", "threads": 2}, (ADAPTIVE_2, "VISION_LAYOUT=adaptive")),
        ({"instances": 2}, {"layout": "adaptive"}, (ADAPTIVE_2, "VISION_LAYOUT=adaptive")),
        # where it does not apply: as before, saying why
        ({}, {"backend": "torch"}, ("fixed: 1x2", "PyTorch")),
        ({}, {"device": "cuda"}, ("fixed: 1x1", "CUDA")),
        ({}, {"layout": "adaptive", "backend": "torch"}, ("fixed: 1x2", "does not apply: PyTorch")),
        # as the containers set it (VISION_THREADS at the CPU limit): the reason the layout is fixed
        # comes first, then what sized it
        (
            {},
            {"layout": "adaptive", "backend": "torch", "threads": 2},
            ("fixed: 1x2", "VISION_LAYOUT=adaptive does not apply: PyTorch"),
        ),
        (
            {},
            {"layout": "adaptive", "backend": "torch", "threads": 2},
            ("fixed: 1x2", "; sized by VISION_THREADS=2"),
        ),
        (
            {},
            {"layout": "adaptive", "device": "cuda", "threads": 1},
            ("fixed: 1x1", "does not apply: on CUDA"),
        ),
    ],
)
def test_which_layout_the_settings_give(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    config: dict[str, object],
    settings: dict[str, object],
    expected: tuple[str, str],
) -> None:
    summary, why = expected
    layout = _layout(tmp_path, monkeypatch, config, **settings)
    assert layout.summary == summary
    assert why in layout.reason


def test_the_layout_setting_reads_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VISION_LAYOUT", "fixed")
    assert _layout(tmp_path, monkeypatch, {}).summary == "fixed: 1x2"
    monkeypatch.setenv("VISION_LAYOUT", "sometimes")
    with pytest.raises(ValidationError, match="layout"):
        ModelSettings()


def test_an_adaptive_layout_too_big_for_the_cores_names_the_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(ConfigurationError, match="VISION_THREADS"):
        _layout(tmp_path, monkeypatch, {}, layout="adaptive", threads=3)


def test_runtimes_get_the_adaptive_layout_and_its_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cpu, "available_cpus", lambda: 2)
    entry = write_fake_entry(tmp_path)
    runtime = create_runtime(entry, ModelSettings(model_repository=tmp_path))
    assert runtime.lanes == (Lane(WIDE, 1, 2), Lane(NARROW, 2, 1))
    assert (runtime.instances, runtime.threads) == (2, 2)
    facts = runtime.describe()
    assert facts["layout"] == "adaptive: 1x2 for a lone request, 2x1 under load"
    assert "the default" in str(facts["layout_reason"])
    assert facts["sessions"] == [
        {"kind": "wide", "count": 1, "threads": 2},
        {"kind": "narrow", "count": 2, "threads": 1},
    ]
    fixed = create_runtime(entry, ModelSettings(model_repository=tmp_path, layout="fixed"))
    assert fixed.lanes == (Lane(FIXED, 1, 2),) and fixed.layout == "fixed: 1x2"


def test_the_torch_runtime_refuses_an_adaptive_layout(tmp_path: Path) -> None:
    from visionserve.runtimes.torch import TorchRuntime

    with pytest.raises(ConfigurationError, match="ONNX Runtime on CPU"):
        TorchRuntime(write_fake_entry(tmp_path), threads=2, instances=2, lanes=plan_adaptive(cores=2).lanes)

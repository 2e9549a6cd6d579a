"""Settings from the environment (visionserve/settings.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image
from pydantic import ValidationError

from visionserve import settings as settings_module
from visionserve.settings import GrpcSettings, MiB, ModelSettings, ServerSettings


def test_server_defaults() -> None:
    settings = ServerSettings()
    assert settings.host == "127.0.0.1"
    assert settings.port == 8000
    assert settings.log_level == "info"
    assert settings.max_request_bytes == 20 * MiB
    assert settings.max_image_pixels == 40_000_000
    assert settings.default_topk == 5
    assert settings.preprocess_workers is None
    assert settings.access_log is False
    assert settings.graceful_shutdown_s == 30.0
    assert (settings.header_timeout_s, settings.body_timeout_s, settings.max_connections) == (
        10.0,
        60.0,
        None,
    )
    import resource

    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    expected = 0 if soft == resource.RLIM_INFINITY else max(64, soft - 256)
    assert settings.resolved_max_connections() == expected
    assert ServerSettings(max_connections=0).resolved_max_connections() == 0


def test_model_defaults() -> None:
    settings = ModelSettings()
    assert settings.model_repository == Path("model_repository")
    assert settings.model_name == "efficientnet_lite0"
    assert settings.backend == "onnx"
    assert settings.device == "cpu"
    assert settings.threads is None
    assert settings.torch_compile is True
    assert settings.onnx_allow_spinning is False


def test_server_reads_vision_prefixed_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VISION_PORT", "9123")
    monkeypatch.setenv("VISION_MAX_REQUEST_BYTES", "4096")
    monkeypatch.setenv("VISION_MAX_IMAGE_PIXELS", "1000")
    monkeypatch.setenv("VISION_LOG_LEVEL", "DEBUG")
    monkeypatch.setenv("VISION_ACCESS_LOG", "true")
    monkeypatch.setenv("PORT", "1")  # unprefixed variables are not read
    settings = ServerSettings()
    assert settings.port == 9123
    assert settings.max_request_bytes == 4096
    assert settings.max_image_pixels == 1000
    assert settings.log_level == "debug"  # case-insensitive, stored lower-case
    assert settings.access_log is True


def test_model_reads_vision_prefixed_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("VISION_MODEL_REPOSITORY", str(tmp_path))
    monkeypatch.setenv("VISION_MODEL_NAME", "resnet50")
    monkeypatch.setenv("VISION_BACKEND", "torch")
    monkeypatch.setenv("VISION_DEVICE", "cuda")
    monkeypatch.setenv("VISION_THREADS", "3")
    monkeypatch.setenv("VISION_TORCH_COMPILE", "0")
    settings = ModelSettings()
    assert settings.model_repository == tmp_path
    assert settings.model_name == "resnet50"
    assert settings.backend == "torch"
    assert settings.device == "cuda"
    assert settings.threads == 3
    assert settings.torch_compile is False


def test_unrelated_env_is_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VISION_SOMETHING_ELSE", "x")  # extra="ignore": another component's setting
    assert ServerSettings().port == 8000
    assert ModelSettings().model_name == "efficientnet_lite0"


@pytest.mark.parametrize(
    ("field", "value", "fragment"),
    [
        ("port", 70000, "port"),
        ("port", -1, "port"),
        ("max_request_bytes", 100, "max_request_bytes"),
        ("max_image_pixels", 0, "max_image_pixels"),
        ("default_topk", 0, "default_topk"),
        ("preprocess_workers", 0, "preprocess_workers"),
        ("log_level", "verbose", "log_level"),
        ("graceful_shutdown_s", -1.0, "graceful_shutdown_s"),
        ("header_timeout_s", 0, "header_timeout_s"),
        ("body_timeout_s", -1.0, "body_timeout_s"),
        ("max_connections", -1, "max_connections"),
    ],
)
def test_server_validation_names_the_field(field: str, value: object, fragment: str) -> None:
    with pytest.raises(ValidationError) as info:
        ServerSettings(**{field: value})  # type: ignore[arg-type]
    assert fragment in str(info.value)


def test_bad_env_value_names_the_field(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VISION_PORT", "eighty")
    with pytest.raises(ValidationError) as info:
        ServerSettings()
    assert "port" in str(info.value)
    assert "eighty" in str(info.value)


@pytest.mark.parametrize(
    ("field", "value"),
    [("backend", "tensorflow"), ("device", "tpu"), ("threads", 0)],
)
def test_model_validation_names_the_field(field: str, value: object) -> None:
    with pytest.raises(ValidationError) as info:
        ModelSettings(**{field: value})  # type: ignore[arg-type]
    assert field in str(info.value)


def test_max_image_pixels_is_capped_at_pillows_limit() -> None:
    # Pillow's own bomb check fires above this; ours must be the one that answers.
    assert Image.MAX_IMAGE_PIXELS is not None
    assert ServerSettings(max_image_pixels=Image.MAX_IMAGE_PIXELS).max_image_pixels == Image.MAX_IMAGE_PIXELS
    with pytest.raises(ValidationError) as info:
        ServerSettings(max_image_pixels=Image.MAX_IMAGE_PIXELS + 1)
    assert "max_image_pixels" in str(info.value)


def test_max_image_pixels_cap_applies_to_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VISION_MAX_IMAGE_PIXELS", str(10**9))
    with pytest.raises(ValidationError):
        ServerSettings()


@pytest.mark.parametrize("name", ["../other", "a/b", "a\\b", "/etc", ".hidden", "..", ""])
def test_model_name_rejects_paths(name: str) -> None:
    with pytest.raises(ValidationError) as info:
        ModelSettings(model_name=name)
    message = str(info.value)
    assert "plain folder name" in message
    assert "VISION_MODEL_NAME" in message


def test_model_name_rejects_path_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VISION_MODEL_NAME", "../../etc")
    with pytest.raises(ValidationError, match="VISION_MODEL_NAME"):
        ModelSettings()


@pytest.mark.parametrize("name", ["efficientnet_lite0", "resnet-50", "model.v2"])
def test_model_name_accepts_plain_names(name: str) -> None:
    assert ModelSettings(model_name=name).model_name == name


def test_resolved_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(settings_module, "available_cpus", lambda: 7)
    assert ModelSettings().resolved_threads() == 7
    assert ModelSettings(threads=3).resolved_threads() == 3
    assert ModelSettings(instances=2).resolved_threads() == 3  # 7 cores shared by 2 instances
    assert ModelSettings(device="cuda").resolved_threads() == 1


def test_resolved_preprocess_workers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(settings_module, "available_cpus", lambda: 5)
    assert ServerSettings().resolved_preprocess_workers() == 5
    assert ServerSettings(preprocess_workers=2).resolved_preprocess_workers() == 2


def test_resolved_threads_default_is_usable_cores() -> None:
    threads = ModelSettings().resolved_threads()
    assert isinstance(threads, int)
    assert threads >= 1


def test_slow_client_settings_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VISION_HEADER_TIMEOUT_S", "2.5")
    monkeypatch.setenv("VISION_BODY_TIMEOUT_S", "120")
    monkeypatch.setenv("VISION_MAX_CONNECTIONS", "0")
    monkeypatch.setenv("VISION_GRPC_MAX_CONNECTION_IDLE_S", "0")
    monkeypatch.setenv("VISION_GRPC_MAX_CONNECTION_AGE_S", "600")
    monkeypatch.setenv("VISION_GRPC_MAX_CONCURRENT_STREAMS", "50")
    server = ServerSettings()
    assert (server.header_timeout_s, server.body_timeout_s, server.max_connections) == (2.5, 120.0, 0)
    from grpc_server.server import connection_options

    options = dict(connection_options(GrpcSettings()))
    assert options["grpc.max_connection_age_ms"] == 600_000
    assert options["grpc.max_connection_age_grace_ms"] == 30_000
    assert options["grpc.max_concurrent_streams"] == 50
    assert "grpc.max_connection_idle_ms" not in options  # 0: never
    assert options["grpc.max_allowed_incoming_connections"] == 1000
    assert options["grpc.keepalive_time_ms"] == 60_000


def test_grpc_durations_fit_core_s_c_ints() -> None:
    from grpc_server.server import connection_options

    settings = GrpcSettings(max_connection_age_s=7 * 86400, max_connection_idle_s=86400)
    assert all(value < 2**31 for _, value in connection_options(settings))
    with pytest.raises(ValidationError, match="max_connection_age_s"):
        GrpcSettings(max_connection_age_s=30 * 86400)

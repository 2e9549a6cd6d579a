"""The `VISION_*` settings of the served processes, as the harness passes them: `--server-env
KEY=VALUE` checked and parsed; the settings a served process will read (its environment, then
`--server-env`), built here too so that the in-process measurement uses the same; and the
environment each process the harness starts is given (`model_env`, `inherited_env`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from pydantic_settings import BaseSettings

from visionserve.errors import ConfigurationError
from visionserve.settings import ModelSettings, from_env

SettingsT = TypeVar("SettingsT", bound=BaseSettings)

_ENV_KEY = re.compile(r"^VISION_[A-Z0-9_]+$")
RESERVED_ENV = {
    "VISION_HOST": "the harness makes every server listen on a free port of 127.0.0.1",
    "VISION_PORT": "the harness makes every server listen on a free port of 127.0.0.1",
    "VISION_GRPC_HOST": "the harness makes every server listen on a free port of 127.0.0.1",
    "VISION_GRPC_PORT": "the harness makes every server listen on a free port of 127.0.0.1",
    "VISION_GRPC_METRICS_PORT": "the harness reads the gRPC metrics from a free port it is told",
    "VISION_GRPC_METRICS": "the harness reads the server figures from the gRPC metrics endpoint",
    "VISION_BACKEND": "use --backends",
    "VISION_MODEL_NAME": "use --model (the first model named is the default)",
    "VISION_MODELS": "use --model",
    "VISION_MODEL_REPOSITORY": "use --model-repository",
    "VISION_DEVICE": "use --device",
    "VISION_THREADS": "use --threads",
    "VISION_GRPC_SERVE_HTTP": "the harness starts its HTTP and gRPC processes apart (python -m "
    "bench.processes measures one process serving both)",
}
"""Variables `--server-env` may not set, and what to use instead: the harness sets them itself,
the same for the served processes and the in-process measurement."""


def check_server_env_key(key: str) -> None:
    """Raise ValueError (saying how to fix it) unless `key` may be passed with `--server-env`."""
    if not _ENV_KEY.match(key):
        raise ValueError(
            f"{key!r} is not a server setting: server settings are VISION_ variables in capitals, "
            "e.g. VISION_MAX_QUEUE_DELAY_US=500"
        )
    if key in RESERVED_ENV:
        raise ValueError(f"{key} cannot be set with --server-env: {RESERVED_ENV[key]}")


def parse_server_env(text: str) -> tuple[str, str]:
    """`KEY=VALUE` -> (KEY, VALUE), the key checked by `check_server_env_key`."""
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep:
        raise ValueError(f"{text!r}: write KEY=VALUE, e.g. VISION_MAX_QUEUE_DELAY_US=500")
    check_server_env_key(key)
    return key, value


def overrides(cls: type[BaseSettings], env: Mapping[str, str]) -> dict[str, Any]:
    """The entries of `env` that are fields of `cls` (by its env prefix), as keyword arguments."""
    prefix = str(cls.model_config.get("env_prefix") or "")
    found = {}
    for key, value in env.items():
        name = key[len(prefix) :].lower() if key.startswith(prefix) else ""
        if name in cls.model_fields:
            found[name] = value
    return found


def settings_from(cls: type[SettingsT], env: Mapping[str, str], **given: Any) -> SettingsT:
    """`cls` from the environment, then `env` (`--server-env`), then `given`; ValueError naming
    the variable when a value is bad."""
    try:
        return from_env(cls, **{**overrides(cls, env), **given})
    except ConfigurationError as exc:
        raise ValueError(f"{exc} (from --server-env or the environment)") from None


ACCESS_VARIABLES = ("VISION_API_KEY", "VISION_API_KEY_FILE", "VISION_TLS_CERT_FILE", "VISION_TLS_KEY_FILE")
"""Left out of the environment the harness's own servers inherit: it measures them without a key
or TLS (a shell that exports the key for an external deployment must not lock them)."""


def inherited_env() -> dict[str, str]:
    """This process's environment without `ACCESS_VARIABLES`."""
    return {name: value for name, value in os.environ.items() if name not in ACCESS_VARIABLES}


def model_env(settings: ModelSettings, models: Sequence[str] = ()) -> dict[str, str]:
    """`VISION_*` variables that make a served process use exactly `settings` and serve `models`
    (empty: every model of the repository), `settings.model_name` the default. `VISION_BACKEND`
    picks the gRPC server's runtime; the HTTP deployables fix their own.

    NOTE: `VISION_THREADS` only when `settings` set it (`--threads`, or the environment): unset,
    the served process picks its default thread layout (adaptive on ONNX Runtime's CPU), as the
    in-process measurement does from the same settings (`create_runtime`). Passing the resolved
    count instead fixed the layout, so `make bench` never measured the default."""
    return {
        **({"VISION_MODELS": ",".join(models)} if models else {}),
        **({"VISION_INSTANCES": str(settings.instances)} if settings.instances else {}),
        "VISION_BACKEND": settings.backend,
        "VISION_MODEL_REPOSITORY": str(Path(settings.model_repository).resolve()),
        "VISION_MODEL_NAME": settings.model_name,
        "VISION_DEVICE": settings.device,
        **({"VISION_THREADS": str(settings.threads)} if settings.threads else {}),
        "VISION_TORCH_COMPILE": str(settings.torch_compile).lower(),
        "VISION_ONNX_ALLOW_SPINNING": str(settings.onnx_allow_spinning).lower(),
    }

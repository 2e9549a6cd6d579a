"""Static checks of the Kubernetes and KServe manifests (no cluster runs here).

Every manifest of deploy/kubernetes validates against the Kubernetes API's schemas, offline (the
copies kubernetes-validate ships); the CRDs those schemas lack (KServe's InferenceService, KEDA's
ScaledObject) are checked by shape. Against the code: the probes and the scrape annotations name
routes and ports the services really serve, every environment variable is one a settings class
reads and accepts, the images and the export command are the compose file's, the kill timeout
outlasts the drain delay plus the grace, and the threads follow the CPU limit.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes_validate import utils as kubernetes_validate

from flask_ui.settings import UISettings
from tests.fixtures import FakeRuntime, app_of
from tests.unit.test_docker import (
    THIRD_PARTY_VARIABLES,
    TMPFS,
    _secret_problems,
    dockerfile_stages,
    effective,
    resolved,
    unknown_variables,
)
from visionserve.cpu import plan_adaptive, plan_threads
from visionserve.http.auth import OPEN_PATHS
from visionserve.metrics import Metrics
from visionserve.repository import ModelEntry
from visionserve.settings import GrpcSettings, ModelSettings, SecuritySettings, ServerSettings, from_env

ROOT = Path(__file__).resolve().parents[2]
KUBERNETES = ROOT / "deploy" / "kubernetes"
KSERVE = ROOT / "deploy" / "kserve" / "inferenceservice.yaml"
DOCS = ROOT / "docs" / "deploy.md"
# The oldest Kubernetes release these manifests are written for (native gRPC probes: 1.27 GA;
# Pod Security admission labels: 1.25) and the newest whose schemas the package ships.
SCHEMA_VERSIONS = ("1.32.0", kubernetes_validate.latest_version())
# Variables of KServe, not of a settings class: STORAGE_URI makes KServe fetch the model repository.
KSERVE_VARIABLES = {"STORAGE_URI"}
# The compose service each workload of deploy/kubernetes stands for.
COMPOSE_SERVICE = {"api": "api", "grpc": "grpc", "ui": "ui", "export": "export"}


# --- reading the manifests --------------------------------------------------------------------


def documents(path: Path) -> list[dict[str, Any]]:
    """The YAML documents of `path` (empty ones dropped)."""
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def kustomization() -> dict[str, Any]:
    data = documents(KUBERNETES / "kustomization.yaml")[0]
    assert isinstance(data, dict)
    return data


def base_manifests() -> list[Path]:
    """The files the kustomization applies, in its order."""
    return [KUBERNETES / name for name in kustomization()["resources"]]


def base_objects() -> list[dict[str, Any]]:
    return [doc for path in base_manifests() for doc in documents(path)]


def find(kind: str, name: str, objects: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    matches = [o for o in (objects or base_objects()) if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(matches) == 1, f"{kind}/{name}: {len(matches)} found"
    return matches[0]


def pod_spec(workload: dict[str, Any]) -> dict[str, Any]:
    """The pod spec of a Deployment or Job, or the pod-level part of a KServe predictor."""
    if workload["kind"] == "InferenceService":
        return dict(workload["spec"]["predictor"])
    spec: dict[str, Any] = workload["spec"]["template"]["spec"]
    return spec


def all_containers(spec: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield from spec.get("initContainers", [])
    yield from spec["containers"]


def env_of(container: dict[str, Any]) -> dict[str, str]:
    """The container's environment as the process sees it: a value, or a limit read through a
    resourceFieldRef (whole cores, rounded up, as the kubelet does with divisor 1), or "<secret>"."""
    limits = container["resources"]["limits"]
    env: dict[str, str] = {}
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = str(item["value"])
            continue
        source = item["valueFrom"]
        if "resourceFieldRef" in source:
            ref = source["resourceFieldRef"]
            assert ref["containerName"] == container["name"], item
            assert ref["resource"] == "limits.cpu" and str(ref["divisor"]) == "1", item
            env[item["name"]] = str(math.ceil(cores(limits["cpu"])))
        else:
            assert "secretKeyRef" in source, item
            env[item["name"]] = "<secret>"
    return env


def cores(quantity: str | int | float) -> float:
    text = str(quantity)
    return int(text[:-1]) / 1000 if text.endswith("m") else float(text)


def workloads() -> list[dict[str, Any]]:
    """The Deployments and the Job of deploy/kubernetes, and the KServe InferenceService."""
    found = [o for o in base_objects() if o["kind"] in ("Deployment", "Job")]
    return [*found, *documents(KSERVE)]


def _workload_id(workload: dict[str, Any]) -> str:
    return f"{workload['kind']}/{workload['metadata']['name']}"


# --- the Kubernetes schemas ------------------------------------------------------------------------


def validation_errors(doc: dict[str, Any], version: str) -> list[str]:
    try:
        kubernetes_validate.validate(doc, version, strict=True)
    except kubernetes_validate.ValidationError as error:
        return [f"{list(error.path)}: {error.message}"]
    return []


def schema_checked_files() -> list[Path]:
    """Every manifest under deploy/kubernetes that is a whole object of the core API (not the
    kustomizations, not the component's partial patches, not the KEDA CRD)."""
    return [
        p
        for p in sorted(KUBERNETES.rglob("*.yaml"))
        if p.name != "kustomization.yaml"
        and "components" not in p.relative_to(KUBERNETES).parts
        and all(not d["apiVersion"].startswith("keda.sh/") for d in documents(p))
    ]


@pytest.mark.parametrize("version", SCHEMA_VERSIONS)
@pytest.mark.parametrize("path", schema_checked_files(), ids=lambda p: str(p.relative_to(KUBERNETES)))
def test_manifest_validates_against_the_kubernetes_schemas(path: Path, version: str) -> None:
    docs = documents(path)
    assert docs, path
    for doc in docs:
        assert not validation_errors(doc, version), (doc["kind"], validation_errors(doc, version))


def test_schema_validation_catches_a_mistake() -> None:
    """Strict validation is not vacuous: a misspelt field and a wrong type are refused."""
    deployment = find("Deployment", "api")
    broken = yaml.safe_load(yaml.safe_dump(deployment))
    broken["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGett"] = {"path": "/"}
    assert validation_errors(broken, SCHEMA_VERSIONS[0])
    broken = yaml.safe_load(yaml.safe_dump(deployment))
    broken["spec"]["replicas"] = "two"
    assert validation_errors(broken, SCHEMA_VERSIONS[0])


def test_kustomization_lists_every_manifest() -> None:
    """Every YAML file of deploy/kubernetes is applied by `kubectl apply -k` (the kustomization's
    resources) or is an optional variant that docs/deploy.md explains (optional/, components/)."""
    listed = set(kustomization()["resources"])
    present = {p.name for p in KUBERNETES.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == present
    assert kustomization()["namespace"] == find("Namespace", "visionserve")["metadata"]["name"]
    docs = DOCS.read_text()
    for path in sorted(KUBERNETES.glob("optional/*.yaml")):
        assert f"optional/{path.name}" in docs, path
    for component in sorted(p for p in KUBERNETES.glob("components/*") if p.is_dir()):
        data = documents(component / "kustomization.yaml")[0]
        assert data["kind"] == "Component"
        patched = {patch["path"] for patch in data["patches"]}
        assert patched == {p.name for p in component.glob("*.yaml")} - {"kustomization.yaml"}
        assert f"components/{component.name}" in docs, component


def kubectl() -> str:
    found = shutil.which("kubectl")
    if found is None:
        pytest.skip("no kubectl here: the kustomization is checked file by file above")
    return found


def render(folder: Path) -> list[dict[str, Any]]:
    done = subprocess.run(
        [kubectl(), "kustomize", str(folder)], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


@pytest.mark.parametrize("components", [[], ["components/tls"]], ids=["base", "tls"])
def test_kustomize_renders_valid_objects(
    components: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where kubectl is installed, its Kustomize renders the base (and with the TLS component),
    and every rendered object validates; with TLS the gRPC probes are HTTPS readiness on the
    metrics port and an exec liveness probe (the kubelet's gRPC probe speaks plaintext only),
    and the settings accept the TLS variables."""
    kubectl()
    folder = tmp_path / "kubernetes"
    shutil.copytree(KUBERNETES, folder)
    if components:
        data = kustomization()
        data["components"] = components
        (folder / "kustomization.yaml").write_text(yaml.safe_dump(data))
    objects = render(folder)
    assert {(o["kind"], o["metadata"]["name"]) for o in objects} == {
        (o["kind"], o["metadata"]["name"]) for o in base_objects()
    }
    for doc in objects:
        assert doc["kind"] == "Namespace" or doc["metadata"]["namespace"] == "visionserve"
        assert not validation_errors(doc, SCHEMA_VERSIONS[0]), validation_errors(doc, SCHEMA_VERSIONS[0])
    if components:
        grpc = find("Deployment", "grpc", objects)["spec"]["template"]["spec"]["containers"][0]
        for probe in ("startupProbe", "readinessProbe"):  # the metrics port's HTTPS readiness
            assert "grpc" not in grpc[probe] and grpc[probe]["httpGet"] == {
                "path": "/health/ready",
                "port": "metrics",
                "scheme": "HTTPS",
            }
        assert "grpc" not in grpc["livenessProbe"]  # the gRPC health check itself, over TLS
        assert "health_pb2" in " ".join(grpc["livenessProbe"]["exec"]["command"])
        for name in ("api", "grpc"):
            container = find("Deployment", name, objects)["spec"]["template"]["spec"]["containers"][0]
            env = env_of(container)
            assert env["VISION_TLS_CERT_FILE"].startswith("/run/secrets/visionserve-tls/")
            for key, value in env.items():
                if key.endswith("_FILE"):  # the mounted secrets, played by files here
                    file = tmp_path / Path(value).name
                    file.write_text("k" * 32)
                    monkeypatch.setenv(key, str(file))
                else:
                    monkeypatch.setenv(key, value)
            assert from_env(SecuritySettings).tls


# --- the workloads against the code ----------------------------------------------------------


def compose_services() -> dict[str, Any]:
    services: dict[str, Any] = resolved("onnx", gpu=False)["services"]
    return services


def test_images_and_the_export_command_are_the_compose_files() -> None:
    services = compose_services()
    for name, service_name in COMPOSE_SERVICE.items():
        kind = "Job" if name == "export" else "Deployment"
        spec = pod_spec(find(kind, name))
        image = services[service_name]["image"]
        # the init containers (waiting for the models) run the same image: nothing else to pull
        assert {c["image"] for c in all_containers(spec)} == {image}, name
    export = pod_spec(find("Job", "export"))["containers"][0]
    assert export["command"] == services["export"]["command"]
    # the KServe predictor runs the gRPC image, which serves HTTP too (VISION_GRPC_SERVE_HTTP)
    predictor = pod_spec(documents(KSERVE)[0])["containers"][0]
    assert predictor["image"] == services["grpc"]["image"]


def test_the_export_job_fills_the_volume_the_apis_mount_read_only() -> None:
    claim = find("PersistentVolumeClaim", "models")
    assert "ReadWriteMany" in claim["spec"]["accessModes"]
    job = pod_spec(find("Job", "export"))
    volumes = {v["name"]: v for v in job["volumes"]}
    mount = next(m for m in job["containers"][0]["volumeMounts"] if m["mountPath"] == "/models")
    assert volumes[mount["name"]]["persistentVolumeClaim"]["claimName"] == "models"
    assert not mount.get("readOnly")
    for name in ("api", "grpc"):
        spec = pod_spec(find("Deployment", name))
        volumes = {v["name"]: v for v in spec["volumes"]}
        for container in all_containers(spec):
            mount = next(m for m in container["volumeMounts"] if m["mountPath"] == "/models")
            assert mount["readOnly"] is True, (name, container["name"])
            assert volumes[mount["name"]]["persistentVolumeClaim"] == {
                "claimName": "models",
                "readOnly": True,
            }
            assert env_of(container)["VISION_MODEL_REPOSITORY"] == "/models"


def fake_app_routes(tmp_path: Path, method: str = "get") -> set[str]:
    """The paths the HTTP app answers `method` on (built over a fake model; its OpenAPI document
    lists them, and each health and metrics path is asked for real: anything but 404/405)."""
    from fastapi.testclient import TestClient

    from tests.fixtures import write_fake_entry

    entry: ModelEntry = write_fake_entry(tmp_path / "repo")
    app = app_of(ServerSettings(), FakeRuntime(entry))
    paths = {path for path, operations in app.openapi()["paths"].items() if method in operations}
    client = TestClient(app)  # no lifespan: the models are not loaded, readiness answers 503
    for path in [p for p in paths if method == "get" and ("health" in p or p == "/metrics")]:
        assert client.get(path).status_code not in (404, 405), path
    return paths


def ui_routes() -> set[str]:
    from flask_ui.app import create_app

    return {rule.rule for rule in create_app(UISettings()).url_map.iter_rules()}


def port_number(container: dict[str, Any], port: int | str) -> int:
    """A probe's port: a number, or the name of one of the container's ports."""
    if isinstance(port, int):
        return port
    return int(next(p["containerPort"] for p in container["ports"] if p.get("name") == port))


def listening_ports(container: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Where the container's process listens, from its settings as built from its environment."""
    for key, value in env_of(container).items():
        monkeypatch.setenv(key, value)
    ports = {"http": from_env(ServerSettings).port}
    grpc = from_env(GrpcSettings)
    ports["grpc"] = grpc.port
    if grpc.metrics:
        ports["grpc-metrics"] = grpc.metrics_port
    ports["ui"] = from_env(UISettings).port
    return ports


def served_paths(container: dict[str, Any], tmp_path: Path) -> dict[int, set[str]]:
    """HTTP port -> the paths served there, for the container's own process."""
    env = env_of(container)
    image = container["image"]
    if "/ui:" in image:
        return {int(env["VISION_UI_PORT"]): ui_routes()}
    paths: dict[int, set[str]] = {}
    if "/fastapi-" in image or env.get("VISION_GRPC_SERVE_HTTP") == "true":
        paths[int(env["VISION_PORT"])] = fake_app_routes(tmp_path)
    if "/grpc-" in image and env.get("VISION_GRPC_METRICS", "true") == "true":
        paths[int(env["VISION_GRPC_METRICS_PORT"])] = {"/metrics"}
    return paths


PROBES = ("startupProbe", "readinessProbe", "livenessProbe")


@pytest.mark.parametrize("workload", [w for w in workloads() if w["kind"] != "Job"], ids=_workload_id)
def test_probes_and_scrape_annotations_name_served_routes_and_ports(
    workload: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = pod_spec(workload)
    container = spec["containers"][0]
    served = served_paths(container, tmp_path)
    listening = listening_ports(container, monkeypatch)
    declared = {p["containerPort"] for p in container["ports"]}
    assert set(served) <= declared, (served.keys(), declared)
    probes = [container[p] for p in PROBES if p in container]
    assert {"readinessProbe", "livenessProbe"} <= container.keys()
    for probe in probes:
        if "httpGet" in probe:
            port = port_number(container, probe["httpGet"]["port"])
            assert probe["httpGet"]["path"] in served[port], (port, probe)
            # the kubelet sends no credentials: a probe must not need the API key
            if "/ui:" not in container["image"]:
                assert probe["httpGet"]["path"] in OPEN_PATHS
        else:
            # the kubelet's gRPC probe: grpc.health.v1 on the gRPC port, overall health ("")
            assert probe["grpc"]["port"] == listening["grpc"] and not probe["grpc"].get("service")
            assert "/grpc-" in container["image"]
    http_probes = [p["httpGet"]["path"] for p in probes if "httpGet" in p]
    if "/ui:" not in container["image"]:
        ready = [container["readinessProbe"]["httpGet"]["path"]] if http_probes else []
        assert all(path.endswith("/health/ready") for path in ready)
        live = container["livenessProbe"]
        assert "grpc" in live or live["httpGet"]["path"].endswith("/health/live")
    annotations = workload["spec"].get("template", {}).get("metadata", {}).get("annotations", {})
    if annotations.get("prometheus.io/scrape") == "true":
        port = int(annotations["prometheus.io/port"])
        assert annotations["prometheus.io/path"] in served[port]
        assert port in listening.values()


def test_grpc_probes_reach_a_server_that_serves_the_health_and_v2_services() -> None:
    """What the kubelet's gRPC probe and KServe's gRPC clients rely on, from the server's code."""
    from grpc_server import server

    assert server.V2_SERVICE_NAME == "inference.GRPCInferenceService"
    text = Path(server.__file__).read_text()
    assert "health_pb2_grpc.add_HealthServicer_to_server" in text and "health.OVERALL_HEALTH" in text


def secret_files(spec: dict[str, Any], container: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """Path of each file mounted from a Secret -> (secret name, key)."""
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    files = {}
    for mount in container.get("volumeMounts", []):
        secret = volumes[mount["name"]].get("secret")
        if secret is None:
            continue
        for item in secret.get("items", []):
            files[f"{mount['mountPath']}/{item['path']}"] = (secret["secretName"], item["key"])
    return files


@pytest.mark.parametrize("workload", workloads(), ids=_workload_id)
def test_every_variable_is_known_and_accepted(
    workload: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As tests/unit/test_docker.py does for the compose files: each variable is read by a settings
    class (or is KServe's), and every settings class builds from each container's environment
    (with the image's ENV under it), the mounted secrets played by files here."""
    stages = dockerfile_stages()
    name = workload["metadata"]["name"]
    spec = pod_spec(workload)
    for container in all_containers(spec):
        image_target = container["image"].split("/")[-1].split(":")[0]
        env = {**effective(stages, image_target).env, **env_of(container)}
        known = {k: v for k, v in env.items() if k not in KSERVE_VARIABLES}
        compose_name = "export" if workload["kind"] == "Job" else COMPOSE_SERVICE.get(name, "grpc")
        assert not unknown_variables(compose_name, known)
        assert not _secret_problems(name, {k: v for k, v in env.items() if v != "<secret>"})
        files = secret_files(spec, container)
        for key in [k for k in os.environ if k.startswith("VISION_")]:
            monkeypatch.delenv(key)
        for key, value in env.items():
            if key in THIRD_PARTY_VARIABLES:
                continue
            if value == "<secret>":
                monkeypatch.setenv(key, "s" * 32)
            elif key.endswith("_FILE"):
                assert value in files, f"{name}: {key}={value} is not a mounted Secret's file"
                assert files[value] == ("visionserve-api-key", "api-key")
                local = tmp_path / Path(value).name
                local.write_text("k" * 32 + "\n")
                monkeypatch.setenv(key, str(local))
            else:
                monkeypatch.setenv(key, value)
        from_env(ServerSettings)
        model = from_env(ModelSettings)
        from_env(GrpcSettings)
        security = from_env(SecuritySettings)
        from_env(UISettings)
        if container in spec["containers"] and workload["kind"] != "Job" and compose_name != "ui":
            assert security.resolved_api_key() == "k" * 32, "the API key is on, from the Secret"
            assert model.device == "cpu"


def test_the_ui_uses_the_apis_services_and_key() -> None:
    ui = pod_spec(find("Deployment", "ui"))["containers"][0]
    env = env_of(ui)
    services = {s["metadata"]["name"]: s for s in base_objects() if s["kind"] == "Service"}
    api_port = services["api"]["spec"]["ports"][0]["port"]
    grpc_port = next(p["port"] for p in services["grpc"]["spec"]["ports"] if p["name"] == "grpc")
    assert env["VISION_UI_API_URL"] == f"http://api:{api_port}"
    assert env["VISION_UI_GRPC_TARGET"] == f"grpc:{grpc_port}"
    key = next(e for e in ui["env"] if e["name"] == "VISION_UI_API_KEY")
    assert key["valueFrom"]["secretKeyRef"] == {"name": "visionserve-api-key", "key": "api-key"}


def test_services_select_their_pods_and_target_named_ports() -> None:
    for service in [o for o in base_objects() if o["kind"] == "Service"]:
        component = service["spec"]["selector"]["app.kubernetes.io/component"]
        deployment = find("Deployment", component)
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert service["spec"]["selector"].items() <= labels.items()
        assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
        names = {p["name"] for p in deployment["spec"]["template"]["spec"]["containers"][0]["ports"]}
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in names, (service["metadata"]["name"], port)


def shutdown_budget(env: dict[str, str]) -> float:
    """Seconds from SIGTERM to exit at most: the drain delay, then the grace of each protocol the
    process serves (both at once when one process serves both)."""
    server = ServerSettings.model_fields
    grpc = GrpcSettings.model_fields
    delay = float(env.get("VISION_SHUTDOWN_DELAY_S", server["shutdown_delay_s"].default))
    http_grace = float(env.get("VISION_GRACEFUL_SHUTDOWN_S", server["graceful_shutdown_s"].default))
    grpc_grace = float(env.get("VISION_GRPC_GRACE_S", grpc["grace_s"].default))
    if "VISION_GRPC_PORT" in env and env.get("VISION_GRPC_SERVE_HTTP") == "true":
        return delay + max(http_grace, grpc_grace)
    return delay + (grpc_grace if "VISION_GRPC_PORT" in env else http_grace)


@pytest.mark.parametrize(
    "workload",
    [w for w in workloads() if w["metadata"]["name"] != "ui" and w["kind"] != "Job"],
    ids=_workload_id,
)
def test_kill_timeout_outlasts_delay_plus_grace(workload: dict[str, Any]) -> None:
    spec = pod_spec(workload)
    container = spec["containers"][0]
    env = env_of(container)
    # behind a Service, the drain delay covers the seconds before endpoints stop routing here
    assert float(env["VISION_SHUTDOWN_DELAY_S"]) >= 5
    pre_stop = container.get("lifecycle", {}).get("preStop", {})
    sleep = float(pre_stop.get("sleep", {}).get("seconds", 0))
    budget = sleep + shutdown_budget(env)
    assert spec["terminationGracePeriodSeconds"] > budget
    # a liveness probe that fails while the server drains must not restart it first
    live = container["livenessProbe"]
    assert live["periodSeconds"] * live["failureThreshold"] >= budget


def test_the_shutdown_budget_reads_the_settings() -> None:
    """The figures above are the servers' own defaults where a manifest sets none."""
    assert shutdown_budget({}) == 30.0
    assert shutdown_budget({"VISION_GRPC_PORT": "1"}) == 10.0
    assert shutdown_budget({"VISION_GRPC_PORT": "1", "VISION_GRPC_SERVE_HTTP": "true"}) == 30.0


@pytest.mark.parametrize("workload", [w for w in workloads() if w["kind"] != "Job"], ids=_workload_id)
def test_resources_match_the_thread_layout(workload: dict[str, Any]) -> None:
    """Whole cores, requests = limits (Guaranteed QoS), and the runtime's threads and the
    preprocessing pool follow the CPU limit, as visionserve.cpu lays them out."""
    container = pod_spec(workload)["containers"][0]
    resources = container["resources"]
    if workload["metadata"]["name"] == "ui":
        assert cores(resources["limits"]["cpu"]) >= cores(resources["requests"]["cpu"])
        return
    assert resources["requests"] == resources["limits"]
    limit = cores(resources["limits"]["cpu"])
    assert limit == int(limit) >= 1
    for name in ("VISION_THREADS", "VISION_PREPROCESS_WORKERS"):
        source = next(e for e in container["env"] if e["name"] == name)["valueFrom"]["resourceFieldRef"]
        assert source["resource"] == "limits.cpu"
    env = env_of(container)
    layout = plan_threads(
        threads=int(env["VISION_THREADS"]),
        preprocess_workers=int(env["VISION_PREPROCESS_WORKERS"]),
        cores=int(limit),
    )
    assert layout.runtime_threads == layout.preprocess_workers == int(limit)
    # and the adaptive layout, as the project runs by default: its wide session is the limit
    assert env["VISION_LAYOUT"] == "adaptive"
    adaptive = plan_adaptive(threads=int(env["VISION_THREADS"]), cores=int(limit))
    assert adaptive.adaptive and adaptive.threads == int(limit)


@pytest.mark.parametrize("workload", workloads(), ids=_workload_id)
def test_pods_run_restricted(workload: dict[str, Any]) -> None:
    """Non-root as the images' user, read-only root with /tmp writable, no privilege escalation,
    no capabilities, the default seccomp profile, no service-account token."""
    stages = dockerfile_stages()
    spec = pod_spec(workload)
    pod = spec["securityContext"]
    assert pod["runAsNonRoot"] is True and pod["seccompProfile"] == {"type": "RuntimeDefault"}
    assert spec["automountServiceAccountToken"] is False
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    for container in all_containers(spec):
        image_user = effective(stages, container["image"].split("/")[-1].split(":")[0]).user
        assert image_user is not None
        assert str(pod["runAsUser"]) == image_user.split(":")[0], container["name"]
        context = container["securityContext"]
        assert context["allowPrivilegeEscalation"] is False
        assert context["readOnlyRootFilesystem"] is True
        assert context["capabilities"] == {"drop": ["ALL"]}
        if container in spec["containers"]:
            tmp = next(m for m in container["volumeMounts"] if m["mountPath"] == "/tmp")
            assert volumes[tmp["name"]] == {"name": tmp["name"], "emptyDir": {}}


def test_writable_folders_match_the_compose_files() -> None:
    """Each container writes, besides its volumes and Secrets, only to the emptyDir folders, the
    same ones the compose file gives it as tmpfs (measured there with a read-only root)."""
    service_of = {"fastapi-onnx": "api", "grpc-onnx": "grpc", "ui": "ui", "export": "export"}
    for workload in workloads():
        spec = pod_spec(workload)
        scratch = {v["name"] for v in spec.get("volumes", []) if "emptyDir" in v}
        for container in spec["containers"]:
            image = container["image"].split("/")[-1].split(":")[0]
            mounts = sorted(m["mountPath"] for m in container["volumeMounts"] if m["name"] in scratch)
            assert mounts == TMPFS[service_of[image]], (_workload_id(workload), container["name"])


def test_autoscalers_and_disruption_budgets_cover_both_apis() -> None:
    for name in ("api", "grpc"):
        deployment = find("Deployment", name)
        hpa = find("HorizontalPodAutoscaler", name)
        assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": name}
        assert hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu"
        assert hpa["spec"]["minReplicas"] == deployment["spec"]["replicas"] >= 2
        pdb = find("PodDisruptionBudget", name)
        assert pdb["spec"]["selector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]
        assert pdb["spec"]["minAvailable"] < hpa["spec"]["minReplicas"]
        strategy = deployment["spec"]["strategy"]["rollingUpdate"]
        assert strategy["maxUnavailable"] == 0  # roll out without losing capacity


def metric_names() -> set[str]:
    return {metric.name for metric in Metrics().registry.collect()}


def test_queue_depth_variants_scale_on_a_metric_the_servers_export() -> None:
    assert "visionserve_queue_depth" in metric_names()
    adapter = documents(KUBERNETES / "optional" / "hpa-queue-depth.yaml")[0]
    assert adapter["metadata"]["name"] == "api"  # takes the CPU autoscaler's place
    assert adapter["spec"]["metrics"][0]["pods"]["metric"]["name"] in metric_names()
    keda = documents(KUBERNETES / "optional" / "keda-queue-depth.yaml")[0]
    assert keda["apiVersion"] == "keda.sh/v1alpha1" and keda["kind"] == "ScaledObject"
    assert keda["spec"]["scaleTargetRef"]["name"] == "api"
    trigger = keda["spec"]["triggers"][0]
    assert trigger["type"] == "prometheus"
    assert "visionserve_queue_depth{" in trigger["metadata"]["query"]
    assert float(trigger["metadata"]["threshold"]) > 0


# --- KServe ------------------------------------------------------------------------------------


def test_kserve_inference_service_shape() -> None:
    """The CRD is not in the Kubernetes schemas: its shape is checked here, and its pod-level part
    validates as a Pod's spec."""
    (service,) = documents(KSERVE)
    assert service["apiVersion"] == "serving.kserve.io/v1beta1" and service["kind"] == "InferenceService"
    assert service["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "RawDeployment"
    predictor = service["spec"]["predictor"]
    assert set(predictor) <= {
        "minReplicas",
        "maxReplicas",
        "containers",
        "volumes",
        "securityContext",
        "terminationGracePeriodSeconds",
        "automountServiceAccountToken",
    }
    (container,) = predictor["containers"]
    assert container["name"] == "kserve-container"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http1": 8080, "h2c": 8081}
    env = env_of(container)
    assert env["VISION_GRPC_SERVE_HTTP"] == "true"
    assert int(env["VISION_PORT"]) == ports["http1"] and int(env["VISION_GRPC_PORT"]) == ports["h2c"]
    assert env["VISION_HOST"] == env["VISION_GRPC_HOST"] == "0.0.0.0"
    # the model repository: KServe's storage initializer mounts STORAGE_URI at /mnt/models
    assert env["VISION_MODEL_REPOSITORY"] == "/mnt/models"
    assert env["STORAGE_URI"] == f"pvc://{find('PersistentVolumeClaim', 'models')['metadata']['name']}/"
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "predictor"},
        "spec": {k: v for k, v in predictor.items() if k not in ("minReplicas", "maxReplicas")},
    }
    for version in SCHEMA_VERSIONS:
        assert not validation_errors(pod, version), validation_errors(pod, version)


def test_kserve_probes_use_the_open_inference_protocols_health(tmp_path: Path) -> None:
    container = documents(KSERVE)[0]["spec"]["predictor"]["containers"][0]
    routes = fake_app_routes(tmp_path)
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready" in routes
    assert container["livenessProbe"]["httpGet"]["path"] == "/v2/health/live" in routes
    assert "/v2/models/{model_name}/infer" in fake_app_routes(tmp_path / "post", "post")

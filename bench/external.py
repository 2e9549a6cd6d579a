"""A run against a deployment the harness did not start (`--url`, `--grpc-target`).

The served rows are the deployment's, at every concurrency level, in the same rounds as a local
run, labelled with the runtime it serves and batching `as deployed`. The in-process rows (stages
and limit) need the served model on this machine: they run only where `--model-repository` holds
it, with the runtime, device and threads the deployment reports (`GET {url}/models`); otherwise
the report says they were not measured and the ratio-to-limit column stays empty. The baseline is
local by nature: it is started from the model repository, or refused.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

from bench.config import BenchConfig
from bench.deployment import DeployedModel, Deployment, DeploymentError, connect
from bench.facts import client_facts, images_fact, limit_fact, load_facts
from bench.groups import ServedGroup, baseline_process
from bench.images import BenchImage
from bench.machine import describe_machine
from bench.measure import measure_runtime
from bench.progress import ProgressBar
from bench.report import BenchReport
from bench.rows import DEPLOYED
from bench.servers import DEPLOYABLES
from bench.steps import TaskSteps
from bench.subjects import BenchModel, ImageSets, InProcess, check_images
from visionserve.cpu import available_cpus
from visionserve.errors import ConfigurationError
from visionserve.repository import Backend, ModelEntry, ModelRepository

UNKNOWN = "unknown"
"""The runtime label of a deployment that does not say which runtime it serves."""
NO_LOCAL_MODEL = "not measured (no local model repository)"
_LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def local_entry(repository: Path, name: str, runtime: Backend) -> ModelEntry:
    """The model entry `name` of `repository`, with an artefact for `runtime`; ConfigurationError
    saying what is missing otherwise (a pipeline: its in-process rows need the servers the harness
    starts, `pipeline_rows`)."""
    local = ModelRepository(repository)
    if local.is_pipeline(name):
        raise ConfigurationError(
            f"{name} is a pipeline: its in-process rows (a registry of its stages) are measured only "
            "when the harness starts its own servers (leave out --url / --grpc-target)"
        )
    entry = local.get(name)
    entry.artefact_path(runtime)
    return entry


def _served_model(config: BenchConfig, model: DeployedModel | None) -> tuple[str | None, Backend | None, str]:
    """(model name, runtime, label): what the deployment says, checked against `--model` and
    `--backends`; where it says nothing (gRPC only), what those options say."""
    name = config.model_name
    backend = config.backends[0] if config.backends else None
    if model is None:
        return name, backend, backend or UNKNOWN
    if name is not None and name != model.name:
        raise DeploymentError(
            f"--model {name}, but {config.url} serves {', '.join(model.served) or model.name} "
            f"(GET {config.url}/models)"
        )
    if backend is not None and backend != model.runtime:
        raise DeploymentError(
            f"--backends {backend}, but {config.url} serves {model.name} on {model.runtime} "
            f"(GET {config.url}/models)"
        )
    return model.name, _backend(model.runtime), model.runtime


def _backend(runtime: str) -> Backend | None:
    """`runtime` as a backend this harness can run in-process, or None (e.g. a fake)."""
    if runtime == "onnx":
        return "onnx"
    if runtime == "torch":
        return "torch"
    return None


def _hosts(config: BenchConfig) -> list[str]:
    hosts = []
    if config.url is not None:
        hosts.append(urlsplit(config.url).hostname or "")
    if config.grpc_target is not None:
        hosts.append(config.grpc_target.rpartition(":")[0].strip("[]"))
    return hosts


def run_external(config: BenchConfig, sets: ImageSets, bar: ProgressBar) -> BenchReport:
    """Check the deployment, measure it (and the in-process rows and the baseline where this
    machine has the model), and return the report."""
    targets = ", ".join(
        part
        for part in (
            f"HTTP {config.url}" if config.url else "",
            f"gRPC {config.grpc_target}" if config.grpc_target else "",
        )
        if part
    )
    bar.note(f"measuring the deployment at {targets} (no servers started); checking that it is ready")
    deployment = connect(
        url=config.url,
        grpc_target=config.grpc_target,
        grpc_metrics_url=config.grpc_metrics_url,
        ready_timeout_s=config.ready_timeout_s,
        bar=bar,
        access=config.access,
        model_name=config.model_name,
    )
    model = deployment.model
    name, runtime, label = _served_model(config, model)
    notes = list(deployment.notes)
    if config.unmeasured_endpoints:
        missing = "--url" if config.url is None else "--grpc-target"
        notes.append(f"not measured: {', '.join(config.unmeasured_endpoints)} (no {missing})")

    in_process: InProcess | None = None
    task = model.task if model is not None else _local_task(config, name)
    images = sets.for_task(task)
    if name is None:
        why = "the served model is unknown: give --url, or --model with --grpc-target"
        limit = f"not measured ({why})"
    elif runtime is None:
        why = (
            "the deployment's runtime is unknown: give --url, or --backends with --grpc-target"
            if label == UNKNOWN
            else f"the deployment's runtime {label!r} is none of {', '.join(DEPLOYABLES)}"
        )
        limit = f"not measured ({why})"
    else:
        try:
            entry = local_entry(config.model_repository, name, runtime)
        except ConfigurationError as exc:
            limit, why = NO_LOCAL_MODEL, f"not in --model-repository: {exc}"
        else:
            in_process = _in_process(config, entry, runtime, model, images)
            limit = limit_fact(config, in_process.layouts)
            why = f"{entry.root} ({runtime}), " + (
                "with the deployment's device and threads (GET /models)"
                if model is not None
                else "with this machine's device and threads (the gRPC API does not say the deployment's)"
            )
    if in_process is None or not in_process.layouts:
        notes.append(f"in-process limit: {limit}")
    if in_process is not None and any(host not in _LOOPBACK for host in _hosts(config)):
        notes.append(
            "the in-process rows ran on this machine; the deployment may run on other hardware, so "
            "× limit compares two machines"
        )

    baseline = None
    if config.baseline:
        try:
            if name is None:
                raise ConfigurationError(
                    "the served model is unknown: give --url, or --model with --grpc-target"
                )
            local_entry(config.model_repository, name, "onnx")
        except ConfigurationError as exc:
            raise ValueError(
                f"--baseline starts seed 004's plain endpoint on this machine from the model repository, "
                f"and cannot: {exc}"
            ) from None
        assert name is not None
        baseline = baseline_process(
            config, repository=Path(config.model_repository), model_name=name, threads=available_cpus()
        )

    report = BenchReport(
        machine=describe_machine(device=model.device if model else "cpu"),
        settings=_facts(
            config,
            deployment=deployment,
            name=name,
            label=label,
            limit=limit,
            local=why,
            in_process=in_process,
        ),
        images=[image.describe() for image in images[:10]]
        + ([f"... {len(images) - 10} more"] if len(images) > 10 else []),
        notes=notes,
        tasks={name or "": task},
        stream_fps=config.clip_fps if {"pacedstream", "livestream"} & set(config.stream_endpoints) else None,
    )
    measured = BenchModel.of(name or "", task, images, in_process)
    group = ServedGroup(DEPLOYED, None, deployment.http, deployment.grpc, deployment.access)
    rows, layout_rows, stages = measure_runtime(
        config,
        label=label,
        groups=[group],
        models=[measured],
        bar=bar,
        baseline=baseline,
        baseline_model=(name or "") if task == "classification" else "",
    )
    report.rows += rows
    report.layouts += layout_rows
    report.face_stages += stages
    return report


def _local_task(config: BenchConfig, name: str | None) -> str:
    """The task of `name` in the local repository (a deployment reached over gRPC only does not
    say); classification when it is not there."""
    if not name:
        return "classification"
    local = ModelRepository(config.model_repository)
    try:
        return (
            local.get_pipeline(name).config.task if local.is_pipeline(name) else local.get(name).config.task
        )
    except ConfigurationError:
        return "classification"


def _in_process(
    config: BenchConfig,
    entry: ModelEntry,
    runtime: Backend,
    model: DeployedModel | None,
    images: list[BenchImage],
) -> InProcess:
    """The in-process rows of the served model, with the deployment's device and threads where
    it reports them (the local defaults where it does not: gRPC only)."""
    settings = config.model_settings(runtime)
    update: dict[str, object] = {"model_name": entry.name}
    if model is not None:
        update["device"] = model.device
        if model.threads:
            update["threads"] = model.threads
    settings = settings.model_copy(update=update)
    steps = TaskSteps.of(entry, max_image_pixels=config.server_settings().max_image_pixels)
    steps = check_images(images, steps)
    max_batch = (
        model.max_batch_size if model is not None and model.max_batch_size else entry.config.max_batch_size
    )
    return InProcess(
        entry=entry,
        steps=steps,
        settings=settings,
        layouts=config.resolved_layouts(),
        max_batch=max_batch,
        torch_eager=config.torch_eager,
    )


def _facts(
    config: BenchConfig,
    *,
    deployment: Deployment,
    name: str | None,
    label: str,
    limit: str,
    local: str,
    in_process: InProcess | None,
) -> dict[str, object]:
    """The header of a run against a deployment: what it reported about itself, and how it was
    loaded."""
    model = deployment.model
    ends = []
    if deployment.http is not None:
        ends.append(f"HTTP API {deployment.http.base_url}")
    if deployment.grpc is not None:
        ends.append(f"gRPC API {deployment.grpc.target}")
    source = "GET /models" if model is not None else "--model / --backends"
    figures = []
    if deployment.http is not None:
        figures.append(f"HTTP rows: {deployment.http.metrics_url or 'none'}")
    if deployment.grpc is not None:
        figures.append(f"gRPC rows: {deployment.grpc.metrics_url or 'none (no --grpc-metrics-url)'}")

    def reported(value: object) -> object:
        return UNKNOWN if value is None else value

    facts: dict[str, object] = {
        "deployment": f"{', '.join(ends)} (not started by the harness: measured as deployed)",
        "model": f"{name or UNKNOWN} ({source})",
        "runtime": f"{label} ({source})",
        "images": images_fact(config),
        "device": reported(model.device if model else None),
        "runtime_threads": reported(model.threads if model else None),
        "runtime_instances": reported(model.instances if model else None),
        "server_preprocess_workers": reported(model.preprocess_workers if model else None),
        "batching": DEPLOYED
        + (
            f" (max batch {model.max_batch_size} in the model's config.json, per GET /models)"
            if model is not None and model.max_batch_size
            else ""
        ),
        "server_figures": "; ".join(figures)
        + (
            " (a row's figures count every request the deployment answered meanwhile, other clients' too)"
            if any(end is not None and end.metrics_url for end in (deployment.http, deployment.grpc))
            else ""
        ),
        "credentials": deployment.access.described(),
        **load_facts(config),
        "in_process_limit": limit,
        "in_process_stages": "batch 1, one image after another" if in_process is not None else limit,
        "local_model": local,
    }
    if in_process is not None and in_process.settings.backend == "torch":
        compiled = "on" if in_process.settings.torch_compile else "off"
        facts["torch_compile"] = f"{compiled} in-process (served: as deployed)"
    facts.update(client_facts(config, where="to the deployment's address", read_ahead="as deployed"))
    if not config.http_endpoints and not config.baseline:
        del facts["http_client"]  # no HTTP rows
    return facts

"""The served processes of one backend, in groups: which to start, with which `VISION_*`.

A group is one server configuration: an HTTP and a gRPC process (either may be left out when no
row needs it) for a batching mode (`on`: the batcher as configured; `off`:
`VISION_MAX_BATCH_SIZE=1`), serving every model of the run. With `--overload` the same again with
a small `VISION_MAX_QUEUE_SIZE`; with two or more models (and `coserving`), one more group serving
the first model alone, for what the others cost it while idle. A group's ends are anything with
an address and a metrics URL (`HttpEndpoint`, `GrpcEndpoint`): a process the harness started, or
a deployment it did not (`deployment`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from bench.access import OPEN, Access
from bench.config import BenchConfig
from bench.servers import BaselineServerProcess, GrpcServerProcess, ServerProcess

CLOSED_LOOP_MODEL_WORK = {"http": ("json", "file", "v2"), "grpc": ("grpc", "v2grpc")}
"""The endpoints whose closed-loop rows run the model, by protocol (a group serving one model
alone measures only these)."""


class HttpEndpoint(Protocol):
    """Where an HTTP API listens (`http://host:port`) and its Prometheus endpoint, if any."""

    @property
    def base_url(self) -> str: ...

    @property
    def metrics_url(self) -> str | None: ...


class GrpcEndpoint(Protocol):
    """Where a gRPC API listens (`host:port`) and its Prometheus endpoint, if any."""

    @property
    def target(self) -> str: ...

    @property
    def metrics_url(self) -> str | None: ...


@dataclass(frozen=True)
class ServedGroup:
    """The served ends of one configuration: a batching mode, whether it is the overload
    configuration (small queue), which models its processes serve. Ends the harness starts are
    `ServerProcess`es; a deployment's are only addresses."""

    batching: str
    overload_queue_size: int | None
    http: HttpEndpoint | None
    grpc: GrpcEndpoint | None
    access: Access = OPEN
    """The key and CAs of every request to these ends (a deployment's; open for the harness's own)."""
    models: tuple[str, ...] = ()
    """The models its processes serve; empty: as deployed."""
    alone: bool = False
    """Its processes serve one model of a run of several (`coserving`)."""

    @property
    def processes(self) -> list[ServerProcess]:
        """The processes the harness must start for it (HTTP first); none for a deployment."""
        return [p for p in (self.http, self.grpc) if isinstance(p, ServerProcess)]

    def serves(self, model: str) -> bool:
        """Whether rows of `model` are measured against it."""
        return not self.models or model in self.models


def group_env(base: Mapping[str, str], batching: str, overload_queue_size: int | None) -> dict[str, str]:
    """The served processes' `VISION_*` for a batching mode and, for overload, a queue size."""
    env = dict(base)
    if batching == "off":
        env["VISION_MAX_BATCH_SIZE"] = "1"
    if overload_queue_size is not None:
        env["VISION_MAX_QUEUE_SIZE"] = str(overload_queue_size)
    return env


def wants_alone(config: BenchConfig, models: tuple[str, ...]) -> bool:
    """Whether the run serves its first model alone too: two or more models, `coserving`, and a
    closed-loop row with model work to measure there."""
    asked = set(config.http_endpoints) | set(config.grpc_endpoints)
    work = {name for names in CLOSED_LOOP_MODEL_WORK.values() for name in names}
    return config.coserving and len(models) > 1 and bool(asked & work)


def served_groups(
    config: BenchConfig, backend: str, env: Mapping[str, str], models: tuple[str, ...]
) -> list[ServedGroup]:
    """The process groups a backend needs (not started): sweep groups, the first model alone,
    then overload groups. `env` is the processes' `VISION_*` without `VISION_MODELS`."""
    plans: list[tuple[str, int | None, bool, bool, tuple[str, ...]]] = [
        (mode, None, bool(config.http_endpoints), bool(config.grpc_endpoints), models)
        for mode in config.batching
    ]
    if wants_alone(config, models):
        alone_http = bool(set(CLOSED_LOOP_MODEL_WORK["http"]) & set(config.http_endpoints))
        alone_grpc = bool(set(CLOSED_LOOP_MODEL_WORK["grpc"]) & set(config.grpc_endpoints))
        plans.append((config.batching[0], None, alone_http, alone_grpc, models[:1]))
    if config.overload:
        wants_http = bool({"json", "file"} & set(config.overload_endpoints))
        wants_grpc = "grpc" in config.overload_endpoints
        plans += [
            (mode, config.overload_queue_size, wants_http, wants_grpc, models) for mode in config.batching
        ]
    groups = []
    for mode, queue_size, wants_http, wants_grpc, served in plans:
        alone = served != models
        suffix = f"{'-overload' if queue_size is not None else ''}{'-alone' if alone else ''}-batching-{mode}"
        group_vars = {**group_env(env, mode, queue_size), "VISION_MODELS": ",".join(served)}
        http: ServerProcess | None = None
        grpc: GrpcServerProcess | None = None
        if wants_http:
            http = ServerProcess(
                backend,
                env=group_vars,
                log_path=config.output / f"server-{backend}{suffix}.log",
                ready_timeout_s=config.ready_timeout_s,
            )
        if wants_grpc:
            grpc = GrpcServerProcess(
                backend,
                env=group_vars,
                log_path=config.output / f"server-grpc-{backend}{suffix}.log",
                ready_timeout_s=config.ready_timeout_s,
            )
        groups.append(ServedGroup(mode, queue_size, http, grpc, models=served, alone=alone))
    return groups


def baseline_process(
    config: BenchConfig, *, repository: Path, model_name: str, threads: int
) -> BaselineServerProcess:
    """The naive reference server for a classifier of `repository` (not started)."""
    return BaselineServerProcess(
        model_repository=repository,
        model_name=model_name,
        threads=threads,
        log_path=config.output / "server-baseline.log",
        ready_timeout_s=config.ready_timeout_s,
    )

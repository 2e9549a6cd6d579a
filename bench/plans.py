"""The served rows of one backend: which processes to start, and for each row how to measure it.

A backend gets one HTTP and one gRPC process per batching mode (`on`: the batcher as configured;
`off`: `VISION_MAX_BATCH_SIZE=1`), the same again with a small `VISION_MAX_QUEUE_SIZE` for the
overload rows, and, once per run, the baseline server. A `RowPlan` is one served row: the
`ResultRow` it will become, a `measure(requests, duration_s)` that runs one round of it, and the
`/metrics` URL to scrape around each round.

A group's HTTP and gRPC ends are anything with an address and a metrics URL (`HttpEndpoint`,
`GrpcEndpoint`): a process the harness started, or a deployment it did not (`deployment`).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import grpc

from bench.access import OPEN, Access
from bench.closed_loop import OnAnswer, SendOnce, cycling, run_closed_loop
from bench.config import BenchConfig
from bench.grpc_load import (
    HEALTH,
    STREAM,
    UNARY,
    V2_UNARY,
    grpc_channel,
    grpc_sender,
    health_sender,
    measure_stream,
    v2_grpc_sender,
)
from bench.http_load import REQUESTS, HttpRequestSpec, http_client, http_sender
from bench.images import BenchImage
from bench.progress import ProgressBar
from bench.raw_http import RawHttpClient
from bench.rows import BASELINE, GRPC, GRPC_STREAM, HTTP, ResultRow
from bench.server_metrics import ServerFigures
from bench.servers import BaselineServerProcess, GrpcServerProcess, ServerProcess
from bench.stats import Measurement

Measure = Callable[[int | None, float | None], Coroutine[Any, Any, Measurement]]
"""Runs one round of a served row, bounded by (requests, duration_s)."""

BASELINE_TARGET = "POST /predict (JSON base64, seed 004 plain endpoint)"

_EMPTY = Measurement(latencies_s=(), wall_s=0.0)


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
    """The served ends of one configuration: a batching mode, and whether it is the overload
    configuration (small queue). Ends the harness starts are `ServerProcess`es; a deployment's are
    only addresses."""

    batching: str
    overload_queue_size: int | None
    http: HttpEndpoint | None
    grpc: GrpcEndpoint | None
    access: Access = OPEN
    """The key and CAs of every request to these ends (a deployment's; open for the harness's own)."""

    @property
    def processes(self) -> list[ServerProcess]:
        """The processes the harness must start for it (HTTP first); none for a deployment."""
        return [p for p in (self.http, self.grpc) if isinstance(p, ServerProcess)]


def split_requests(total: int | None, rounds: int) -> list[int | None]:
    """`total` requests spread over `rounds` as evenly as possible (None: unbounded each round)."""
    if total is None:
        return [None] * rounds
    base, extra = divmod(total, rounds)
    return [base + 1 if i < extra else base for i in range(rounds)]


def group_env(base: dict[str, str], batching: str, overload_queue_size: int | None) -> dict[str, str]:
    """The served processes' `VISION_*` for a batching mode and, for overload, a queue size."""
    env = dict(base)
    if batching == "off":
        env["VISION_MAX_BATCH_SIZE"] = "1"
    if overload_queue_size is not None:
        env["VISION_MAX_QUEUE_SIZE"] = str(overload_queue_size)
    return env


def served_groups(config: BenchConfig, backend: str, env: dict[str, str]) -> list[ServedGroup]:
    """The process groups a backend needs (not started): sweep groups, then overload groups."""
    log_dir = config.output
    groups = []
    plans: list[tuple[str, int | None, bool, bool]] = [
        (mode, None, bool(config.http_endpoints), bool(config.grpc_endpoints)) for mode in config.batching
    ]
    if config.overload:
        wants_http = bool({"json", "file"} & set(config.overload_endpoints))
        wants_grpc = "grpc" in config.overload_endpoints
        plans += [(mode, config.overload_queue_size, wants_http, wants_grpc) for mode in config.batching]
    for mode, queue_size, wants_http, wants_grpc in plans:
        suffix = f"{'-overload' if queue_size is not None else ''}-batching-{mode}"
        group_vars = group_env(env, mode, queue_size)
        http = grpc = None
        if wants_http:
            http = ServerProcess(
                backend,
                env=group_vars,
                log_path=log_dir / f"server-{backend}{suffix}.log",
                ready_timeout_s=config.ready_timeout_s,
            )
        if wants_grpc:
            grpc = GrpcServerProcess(
                backend,
                env=group_vars,
                log_path=log_dir / f"server-grpc-{backend}{suffix}.log",
                ready_timeout_s=config.ready_timeout_s,
            )
        groups.append(ServedGroup(mode, queue_size, http, grpc))
    return groups


def baseline_process(config: BenchConfig, *, model_name: str, threads: int) -> BaselineServerProcess:
    """The naive reference server for the run's model (not started)."""
    return BaselineServerProcess(
        model_repository=Path(config.model_repository),
        model_name=model_name,
        threads=threads,
        log_path=config.output / "server-baseline.log",
        ready_timeout_s=config.ready_timeout_s,
    )


@dataclass
class RowPlan:
    """One served row: what it will be reported as, how to measure a round, where its server's
    metrics are; the rounds measured so far and their server figures."""

    template: ResultRow
    """The row with an empty measurement; `result()` fills it in."""
    measure: Measure
    metrics_url: str | None = None
    rounds: list[int | None] | None = None
    """Requests of each round, where the row has its own (overload); None: the run's."""
    parts: list[Measurement] = field(default_factory=list)
    figures: ServerFigures | None = None
    access: Access = OPEN
    """The key and CAs of the metrics scrapes."""

    def add(self, measurement: Measurement, figures: ServerFigures | None) -> None:
        """One round's measurement and what the server saw during it."""
        self.parts.append(measurement)
        if figures is not None:
            self.figures = figures if self.figures is None else self.figures.plus(figures)

    def result(self) -> ResultRow:
        """The row with every round merged."""
        return ResultRow(
            runtime=self.template.runtime,
            mode=self.template.mode,
            target=self.template.target,
            concurrency=self.template.concurrency,
            measurement=Measurement.merged(self.parts),
            model_work=self.template.model_work,
            batching=self.template.batching,
            overload_queue_size=self.template.overload_queue_size,
            server=self.figures,
        )


def template(
    runtime: str,
    mode: str,
    target: str,
    concurrency: int,
    *,
    batching: str,
    model_work: bool = True,
    overload_queue_size: int | None = None,
) -> ResultRow:
    """A row not measured yet."""
    return ResultRow(
        runtime,
        mode,
        target,
        concurrency,
        _EMPTY,
        model_work=model_work,
        batching=batching,
        overload_queue_size=overload_queue_size,
    )


def closed_loop(
    send: SendOnce, concurrency: int, on_answer: OnAnswer | None, *, backoff_s: float = 0.0
) -> Measure:
    """A `Measure` of `concurrency` closed-loop senders of `send` (refused ones wait `backoff_s`)."""

    def measure(requests: int | None, duration_s: float | None) -> Coroutine[Any, Any, Measurement]:
        return run_closed_loop(
            send,
            concurrency=concurrency,
            requests=requests,
            duration_s=duration_s,
            on_answer=on_answer,
            backoff_s=backoff_s,
        )

    return measure


def build_plans(
    config: BenchConfig,
    *,
    label: str,
    groups: list[ServedGroup],
    baseline: HttpEndpoint | None,
    images: list[BenchImage],
    runner: asyncio.Runner,
    stack: contextlib.ExitStack,
    bar: ProgressBar,
    model_name: str | None = None,
) -> list[RowPlan]:
    """Every served row of one backend, in the order they take their turns: each concurrency level
    (each group's HTTP then gRPC rows, then the baseline), the streams, the overload rows. Clients
    are made on `runner`'s loop and closed by `stack`."""
    datas = [image.data for image in images]
    if model_name is None and ("v2" in config.http_endpoints or "v2grpc" in config.grpc_endpoints):
        raise ValueError("the V2 endpoints (v2, v2grpc) name the model in each request: give --model")
    model = model_name or ""
    specs = {
        name: [REQUESTS[name](image.data, image.name, model) for image in images]
        for name in config.http_endpoints
    }

    def http_senders(
        process: HttpEndpoint,
        level: int,
        chosen: dict[str, list[HttpRequestSpec]],
        access: Access = OPEN,
    ) -> dict[str, SendOnce]:
        keyed = {
            name: [replace(spec, headers={**spec.headers, **access.headers()}) for spec in group]
            for name, group in chosen.items()
        }
        context = access.ssl_context() if process.base_url.startswith("https://") else None
        if config.client == "raw":
            raw = RawHttpClient(
                process.base_url, concurrency=level, timeout_s=config.timeout_s, ssl_context=context
            )
            stack.callback(runner.run, raw.aclose())
            return {name: cycling([raw.sender(spec) for spec in group]) for name, group in keyed.items()}
        client = http_client(
            process.base_url, concurrency=level, timeout_s=config.timeout_s, verify=context or True
        )
        stack.callback(runner.run, client.aclose())
        return {name: cycling([http_sender(client, spec) for spec in group]) for name, group in keyed.items()}

    channels: dict[str, grpc.aio.Channel] = {}

    def channel(target: str, access: Access = OPEN) -> grpc.aio.Channel:
        if target not in channels:
            # NOTE: made on the runner's loop: a grpc.aio channel belongs to the loop it is made on.
            channels[target] = runner.run(_open_channel(target, access))
            stack.callback(runner.run, channels[target].close())
        return channels[target]

    def unary(target: str, access: Access = OPEN) -> SendOnce:
        to, key = channel(target, access), access.metadata()
        return cycling([grpc_sender(to, data, timeout_s=config.timeout_s, metadata=key) for data in datas])

    def v2_unary(target: str, access: Access = OPEN) -> SendOnce:
        to, key = channel(target, access), access.metadata()
        return cycling(
            [v2_grpc_sender(to, data, model, timeout_s=config.timeout_s, metadata=key) for data in datas]
        )

    plans: list[RowPlan] = []
    sweep = [g for g in groups if g.overload_queue_size is None]
    for level in config.concurrency:
        for group in sweep:
            access = group.access
            if group.http is not None:
                for name, send in http_senders(group.http, level, specs, access).items():
                    spec = specs[name][0]
                    row = template(
                        label, HTTP, spec.name, level, batching=group.batching, model_work=spec.model_work
                    )
                    measure = closed_loop(send, level, bar.advance)
                    plans.append(RowPlan(row, measure, group.http.metrics_url, access=access))
            if group.grpc is not None:
                target, metrics_url = group.grpc.target, group.grpc.metrics_url
                if "grpc" in config.grpc_endpoints:
                    row = template(label, GRPC, UNARY, level, batching=group.batching)
                    measure = closed_loop(unary(target, access), level, bar.advance)
                    plans.append(RowPlan(row, measure, metrics_url, access=access))
                if "v2grpc" in config.grpc_endpoints:
                    row = template(label, GRPC, V2_UNARY, level, batching=group.batching)
                    measure = closed_loop(v2_unary(target, access), level, bar.advance)
                    plans.append(RowPlan(row, measure, metrics_url, access=access))
                if "health" in config.grpc_endpoints:
                    send = health_sender(channel(target, access), timeout_s=config.timeout_s)
                    row = template(label, GRPC, HEALTH, level, batching=group.batching, model_work=False)
                    measure = closed_loop(send, level, bar.advance)
                    plans.append(RowPlan(row, measure, metrics_url, access=access))
        if baseline is not None:
            baseline_specs = {BASELINE_TARGET: [_baseline_request(data) for data in datas]}
            send = http_senders(baseline, level, baseline_specs)[BASELINE_TARGET]
            row = template("onnx", BASELINE, BASELINE_TARGET, level, batching="none")
            plans.append(RowPlan(row, closed_loop(send, level, bar.advance)))
    if "stream" in config.grpc_endpoints:
        for group in sweep:
            if group.grpc is not None:
                row = template(label, GRPC_STREAM, STREAM, 1, batching=group.batching)
                stream = _stream(channel(group.grpc.target, group.access), datas, config, group.access)
                plans.append(RowPlan(row, stream, group.grpc.metrics_url, access=group.access))
    level = config.overload_concurrency
    rounds = split_requests(config.resolved_overload_requests(), config.rounds)
    for group in groups:
        queue = group.overload_queue_size
        if queue is None:
            continue
        if group.http is not None:
            chosen = {name: specs[name] for name in config.overload_endpoints if name in specs}
            for name, send in http_senders(group.http, level, chosen).items():
                row = template(
                    label,
                    HTTP,
                    specs[name][0].name,
                    level,
                    batching=group.batching,
                    overload_queue_size=queue,
                )
                measure = closed_loop(send, level, bar.advance, backoff_s=config.overload_backoff_ms / 1e3)
                plans.append(RowPlan(row, measure, group.http.metrics_url, rounds))
        if group.grpc is not None:
            row = template(label, GRPC, UNARY, level, batching=group.batching, overload_queue_size=queue)
            plans.append(
                RowPlan(
                    row,
                    closed_loop(
                        unary(group.grpc.target),
                        level,
                        bar.advance,
                        backoff_s=config.overload_backoff_ms / 1e3,
                    ),
                    group.grpc.metrics_url,
                    rounds,
                )
            )
    return plans


def _baseline_request(image: bytes) -> HttpRequestSpec:
    """The baseline's request: seed 004's `{"image": <base64>}`, nothing else."""
    body = json.dumps({"image": base64.b64encode(image).decode("ascii")}).encode("ascii")
    return HttpRequestSpec(
        name=BASELINE_TARGET,
        method="POST",
        path="/predict",
        headers={"Content-Type": "application/json"},
        body=body,
    )


async def _open_channel(target: str, access: Access) -> grpc.aio.Channel:
    return grpc_channel(target, access.grpc_credentials())


def _stream(channel: grpc.aio.Channel, images: list[bytes], config: BenchConfig, access: Access) -> Measure:
    def measure(frames: int | None, duration_s: float | None) -> Coroutine[Any, Any, Measurement]:
        return measure_stream(
            channel,
            images,
            frames=frames,
            duration_s=duration_s,
            window=config.resolved_stream_window(),
            frame_timeout_s=config.timeout_s,
            metadata=access.metadata(),
        )

    return measure

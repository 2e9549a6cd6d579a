"""The served rows of one backend, and for each how to measure a round of it.

A `RowPlan` is one served row: the `ResultRow` it will become, a `measure(requests, duration_s)`
that runs one round of it, and the `/metrics` URL to scrape around each round (only its model's
samples). `build_plans` lists every served row of the run's models against the groups'
processes (`groups`): each concurrency level (per model: each group's HTTP then gRPC rows, then
the baseline), a pipeline's group image alone at the highest level (its faces/s), the streams, the
overload rows. The floors (`live`, `health`) run no model and are measured once, with the first
model's group; the V2 endpoints and the baseline ask for a classification and are measured for
classifiers only.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field, replace
from typing import Any

from bench.access import OPEN, Access
from bench.closed_loop import OnAnswer, SendOnce, run_closed_loop
from bench.config import BenchConfig
from bench.groups import HttpEndpoint, ServedGroup
from bench.grpc_load import CLASSIFIER_ONLY as GRPC_CLASSIFIER_ONLY
from bench.grpc_load import GRPC_ENDPOINTS, HEALTH, UNARY, V2_UNARY
from bench.http_load import CLASSIFIER_ONLY as HTTP_CLASSIFIER_ONLY
from bench.http_load import REQUESTS, HttpRequestSpec
from bench.progress import ProgressBar
from bench.rows import BASELINE, GRPC, GRPC_STREAM, HTTP, ResultRow
from bench.senders import Clients
from bench.server_metrics import ServerFigures
from bench.stats import Measurement
from bench.subjects import BenchModel

Measure = Callable[[int | None, float | None], Coroutine[Any, Any, Measurement]]
"""Runs one round of a served row, bounded by (requests, duration_s)."""

BASELINE_TARGET = "POST /predict (JSON base64, seed 004 plain endpoint)"
FLOORS = ("live", "health")
"""Endpoints that run no model: measured once per group, with the first model."""

_EMPTY = Measurement(latencies_s=(), wall_s=0.0)


def split_requests(total: int | None, rounds: int) -> list[int | None]:
    """`total` requests spread over `rounds` as evenly as possible (None: unbounded each round)."""
    if total is None:
        return [None] * rounds
    base, extra = divmod(total, rounds)
    return [base + 1 if i < extra else base for i in range(rounds)]


def stream_target(name: str, fps: float) -> str:
    """What the report calls a stream row (`pacedstream` and `livestream` say their rate)."""
    return GRPC_ENDPOINTS[name].replace("paced", f"{fps:g} frames/s")


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
    metrics_model: str | None = None
    """Whose samples of /metrics the row reads (None: its model's; a pipeline: its detector's)."""

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
            model=self.template.model,
            alone=self.template.alone,
            image=self.template.image,
        )


def template(
    runtime: str,
    mode: str,
    target: str,
    concurrency: int,
    *,
    batching: str,
    model: str = "",
    model_work: bool = True,
    overload_queue_size: int | None = None,
    alone: bool = False,
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
        model=model,
        alone=alone,
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
    models: list[BenchModel],
    clients: Clients,
    bar: ProgressBar,
    baseline: HttpEndpoint | None = None,
    baseline_model: str = "",
) -> list[RowPlan]:
    """Every served row of one backend, in the order they take their turns: each concurrency level
    (per model, each group's HTTP then gRPC rows; the baseline of `baseline_model`), the streams,
    the overload rows."""
    specs = {model.name: _specs(config, model, first=model is models[0]) for model in models}
    sweep = [group for group in groups if group.overload_queue_size is None]
    plans: list[RowPlan] = []
    for level in config.concurrency:
        for model in models:
            for group in sweep:
                if group.serves(model.name):
                    plans += _closed_loop_rows(
                        config,
                        label=label,
                        group=group,
                        model=model,
                        specs=specs[model.name],
                        level=level,
                        clients=clients,
                        bar=bar,
                        first=model is models[0],
                    )
            if baseline is not None and model.name == baseline_model:
                baseline_specs = {BASELINE_TARGET: [_baseline_request(data) for data in model.datas]}
                send = clients.http(baseline, level, baseline_specs)[BASELINE_TARGET]
                row = template("onnx", BASELINE, BASELINE_TARGET, level, batching="none", model=model.name)
                plans.append(RowPlan(row, closed_loop(send, level, bar.advance)))
    for model in models:
        if model.many_faces is not None:
            plans += _one_image_rows(config, label=label, groups=sweep, model=model, clients=clients, bar=bar)
    for model in models:
        for name in config.stream_endpoints:
            for group in sweep:
                if group.grpc is None or group.alone or not group.serves(model.name):
                    continue
                row = template(
                    label,
                    GRPC_STREAM,
                    stream_target(name, config.clip_fps),
                    1,
                    batching=group.batching,
                    model=model.name,
                )
                measure: Measure = clients.stream(name, group.grpc.target, model, group.access)
                plans.append(RowPlan(row, measure, group.grpc.metrics_url, access=group.access))
    level = config.overload_concurrency
    rounds = split_requests(config.resolved_overload_requests(), config.rounds)
    backoff_s = config.overload_backoff_ms / 1e3
    for model in models:
        for group in groups:
            queue = group.overload_queue_size
            if queue is None:
                continue
            if group.http is not None:
                chosen = {
                    name: specs[model.name][name]
                    for name in config.overload_endpoints
                    if name in specs[model.name]
                }
                for name, send in clients.http(group.http, level, chosen).items():
                    row = template(
                        label,
                        HTTP,
                        chosen[name][0].name,
                        level,
                        batching=group.batching,
                        model=model.name,
                        overload_queue_size=queue,
                    )
                    measure = closed_loop(send, level, bar.advance, backoff_s=backoff_s)
                    plans.append(RowPlan(row, measure, group.http.metrics_url, rounds))
            if group.grpc is not None:
                row = template(
                    label,
                    GRPC,
                    UNARY,
                    level,
                    batching=group.batching,
                    model=model.name,
                    overload_queue_size=queue,
                )
                send = clients.unary(group.grpc.target, model)
                measure = closed_loop(send, level, bar.advance, backoff_s=backoff_s)
                plans.append(RowPlan(row, measure, group.grpc.metrics_url, rounds))
    scraped = {model.name: model.metrics_model for model in models if model.metrics_model}
    for plan in plans:
        plan.metrics_model = scraped.get(plan.template.model)
    return plans


def _one_image_rows(
    config: BenchConfig,
    *,
    label: str,
    groups: list[ServedGroup],
    model: BenchModel,
    clients: Clients,
    bar: ProgressBar,
) -> list[RowPlan]:
    """A pipeline's closed-loop rows with model work at the run's highest level, every request its
    group image (`BenchModel.many_faces`): its faces/s served."""
    image = model.many_faces
    assert image is not None
    only = replace(model, images=[image])
    specs = {name: found for name, found in _specs(config, only, first=False).items() if name not in FLOORS}
    plans: list[RowPlan] = []
    for group in groups:
        if group.alone or not group.serves(model.name):
            continue
        found = _closed_loop_rows(
            config,
            label=label,
            group=group,
            model=only,
            specs=specs,
            level=max(config.concurrency),
            clients=clients,
            bar=bar,
            first=False,
        )
        plans += [replace(plan, template=replace(plan.template, image=image.name)) for plan in found]
    return plans


def _specs(config: BenchConfig, model: BenchModel, *, first: bool) -> dict[str, list[HttpRequestSpec]]:
    """The HTTP requests of `model`'s rows, one per image, by endpoint name (the floor with the
    first model only; the V2 request for a classifier only)."""
    found = {}
    for name in config.http_endpoints:
        if (name in FLOORS and not first) or (
            name in HTTP_CLASSIFIER_ONLY and model.task != "classification"
        ):
            continue
        found[name] = [
            REQUESTS[name](image.data, image.name, model.name, model.params) for image in model.images
        ]
    return found


def _closed_loop_rows(
    config: BenchConfig,
    *,
    label: str,
    group: ServedGroup,
    model: BenchModel,
    specs: dict[str, list[HttpRequestSpec]],
    level: int,
    clients: Clients,
    bar: ProgressBar,
    first: bool,
) -> list[RowPlan]:
    """One group's closed-loop rows of `model` (`first`: the run's first) at `level`: HTTP, then
    gRPC (a group serving the model alone: the rows with model work only)."""
    access, plans = group.access, []

    def row(mode: str, target: str, *, model_work: bool = True) -> ResultRow:
        return template(
            label,
            mode,
            target,
            level,
            batching=group.batching,
            model=model.name,
            model_work=model_work,
            alone=group.alone,
        )

    def add(send: SendOnce, template_row: ResultRow, metrics_url: str | None) -> None:
        plans.append(RowPlan(template_row, closed_loop(send, level, bar.advance), metrics_url, access=access))

    if group.http is not None:
        chosen = {name: found for name, found in specs.items() if not (group.alone and name in FLOORS)}
        for name, send in clients.http(group.http, level, chosen, access).items():
            spec = chosen[name][0]
            add(send, row(HTTP, spec.name, model_work=spec.model_work), group.http.metrics_url)
    if group.grpc is None:
        return plans
    target, metrics_url = group.grpc.target, group.grpc.metrics_url
    for name in config.grpc_endpoints:
        if name == "grpc":
            add(clients.unary(target, model, access), row(GRPC, UNARY), metrics_url)
        elif name in GRPC_CLASSIFIER_ONLY and model.task == "classification":
            add(clients.v2_unary(target, model, access), row(GRPC, V2_UNARY), metrics_url)
        elif name == "health" and first and not group.alone:
            add(clients.health(target, access), row(GRPC, HEALTH, model_work=False), metrics_url)
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

"""`python -m bench.processes`: one process or two for both APIs, measured on the same machine in
the same run, to choose `make run`'s layout.

- two: `python -m fastapi_onnx` (HTTP) and `python -m grpc_server` (gRPC), each loading every
  model and sized to the whole machine (runtime threads and preprocessing pool = the usable
  cores), as two containers or two services would be;
- one: `VISION_GRPC_SERVE_HTTP=true python -m grpc_server`, both APIs over one registry, one
  compute budget.

All three processes are up at once (idle ones do not spin) and the layouts take turns, round by
round. Each round loads both protocols at once with closed-loop senders on one model (HTTP JSON
and gRPC unary, `http_clients` + `grpc_clients`), for `duration_s`; then each protocol alone with
one sender (concurrency 1). Each process's resident memory (psutil) is read after warm-up, every
`SAMPLE_S` under load (the peak) and at the end, its CPU seconds around the mixed rounds. Writes
`processes.md` and `processes.json` to `--output`; nothing is asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psutil

from bench.closed_loop import SendOnce, cycling, run_closed_loop
from bench.grpc_load import grpc_channel, grpc_sender
from bench.http_load import event_loop_runner, json_request
from bench.images import default_images
from bench.machine import describe_machine
from bench.processes_report import PROTOCOLS, LayoutResult, ProcessesReport, ProcessFigures
from bench.raw_http import RawHttpClient
from bench.server_env import model_env
from bench.server_metrics import MetricsSnapshot, ServerFigures, scrape
from bench.servers import CombinedServerProcess, GrpcServerProcess, ServerError, ServerProcess
from bench.stats import Measurement
from visionserve.cpu import available_cpus
from visionserve.repository import ModelRepository
from visionserve.settings import ModelSettings

SAMPLE_S = 0.5
"""How often the processes' memory is read under load."""
MB = 2**20


@dataclass(frozen=True)
class ProcessesConfig:
    """What to run: the models every process loads, the one loaded with requests, how hard, how long."""

    model_repository: Path = Path("model_repository")
    model: str = "efficientnet_lite0"
    """The model the senders load (the default model of every process)."""
    models: tuple[str, ...] = ()
    """The models every process serves; empty: every model of the repository."""
    http_clients: int = 8
    grpc_clients: int = 8
    duration_s: float = 15.0
    """Seconds of mixed load per layout and round."""
    rounds: int = 3
    warmup_s: float = 3.0
    single_requests: int = 150
    """Requests of each concurrency-1 row, per layout (split over the rounds)."""
    ready_timeout_s: float = 300.0
    timeout_s: float = 30.0
    output: Path = Path("bench-results/processes")

    def __post_init__(self) -> None:
        if min(self.http_clients, self.grpc_clients) < 0 or self.http_clients + self.grpc_clients < 1:
            raise ValueError("give at least one sender (--http-clients, --grpc-clients)")
        if self.duration_s <= 0 or self.warmup_s < 0 or self.rounds < 1 or self.single_requests < 0:
            raise ValueError(
                "the duration and rounds must be positive, the warm-up and requests not negative"
            )


@dataclass
class _Layout:
    result: LayoutResult
    http: ServerProcess
    grpc: GrpcServerProcess
    mixed: dict[str, list[Measurement]]
    single: dict[str, list[Measurement]]
    handles: list[psutil.Process]
    figures: ServerFigures | None = None


def run_processes(config: ProcessesConfig, *, note: Callable[[str], None] = print) -> ProcessesReport:
    """Start both layouts, measure them in turns, stop them; the report."""
    names = config.models or tuple(ModelRepository(config.model_repository).names())
    settings = ModelSettings(model_repository=config.model_repository, model_name=config.model)
    env = model_env(settings, names)
    out = config.output

    def logged(name: str) -> Path:
        return out / f"server-{name}.log"

    http = ServerProcess("onnx", env=env, log_path=logged("http"), ready_timeout_s=config.ready_timeout_s)
    grpc = GrpcServerProcess("onnx", env=env, log_path=logged("grpc"), ready_timeout_s=config.ready_timeout_s)
    both = CombinedServerProcess(
        "onnx", env=env, log_path=logged("both"), ready_timeout_s=config.ready_timeout_s
    )
    cores = available_cpus()
    with contextlib.ExitStack() as stack:
        for process in (http, grpc, both):
            stack.callback(process.stop)
            process.launch()
        for process in (http, grpc, both):
            process.wait_until_ready()
        note(f"processes: ready ({', '.join(names)} in each); measuring in {config.rounds} rounds")
        two = _layout(
            "two",
            f"two processes (python -m {http.module} + python -m {grpc.module}), each {cores} threads + "
            f"{cores} preprocessing",
            http,
            grpc,
            [http, grpc],
        )
        one = _layout(
            "one",
            f"one process (VISION_GRPC_SERVE_HTTP=true python -m grpc_server), {cores} threads + "
            f"{cores} preprocessing",
            both,
            both,
            [both],
        )
        with event_loop_runner() as runner:
            runner.run(_measure(config, [two, one], note))
    settings_facts: dict[str, object] = {
        "models loaded by every process": ", ".join(names),
        "load": f"{config.http_clients} HTTP JSON (POST /predict?model={config.model}) + "
        f"{config.grpc_clients} gRPC unary (Predict) closed-loop senders at once, "
        f"{config.duration_s:g} s per layout and round, {config.rounds} rounds, layouts in turns; "
        f"warm-up {config.warmup_s:g} s",
        "concurrency 1": f"{config.single_requests} requests per protocol and layout, one sender",
        "images": "every packaged photo as a 600 px JPEG (topk=5)",
        "clients": "bench.raw_http (HTTP/1.1 keep-alive), grpc.aio (one channel per process), same machine",
    }
    return ProcessesReport(describe_machine(), settings_facts, [two.result, one.result])


def _layout(
    name: str, description: str, http: ServerProcess, grpc: GrpcServerProcess, processes: list[ServerProcess]
) -> _Layout:
    shared = http is grpc
    figures = [
        ProcessFigures(command=f"python -m {p.module}" + (" (HTTP + gRPC)" if shared else ""), pid=p.pid or 0)
        for p in processes
    ]
    return _Layout(
        result=LayoutResult(name, description, figures),
        http=http,
        grpc=grpc,
        mixed={protocol: [] for protocol in PROTOCOLS},
        single={protocol: [] for protocol in PROTOCOLS},
        handles=[psutil.Process(p.pid) for p in processes if p.pid],
    )


async def _measure(config: ProcessesConfig, layouts: list[_Layout], note: Callable[[str], None]) -> None:
    images = default_images()
    async with contextlib.AsyncExitStack() as stack:
        senders: dict[str, dict[str, tuple[SendOnce, SendOnce]]] = {}
        for layout in layouts:
            mixed_http = RawHttpClient(
                layout.http.base_url, concurrency=max(1, config.http_clients), timeout_s=config.timeout_s
            )
            alone_http = RawHttpClient(layout.http.base_url, concurrency=1, timeout_s=config.timeout_s)
            channel = grpc_channel(layout.grpc.target)
            stack.push_async_callback(mixed_http.aclose)
            stack.push_async_callback(alone_http.aclose)
            stack.push_async_callback(channel.close)
            specs = [json_request(image.data, model=config.model) for image in images]
            unary = cycling(
                [
                    grpc_sender(channel, image.data, model=config.model, timeout_s=config.timeout_s)
                    for image in images
                ]
            )
            senders[layout.result.name] = {
                "HTTP": (
                    cycling([mixed_http.sender(spec) for spec in specs]),
                    cycling([alone_http.sender(spec) for spec in specs]),
                ),
                "gRPC": (unary, unary),
            }
        clients = {"HTTP": config.http_clients, "gRPC": config.grpc_clients}
        for layout in layouts:
            chosen = senders[layout.result.name]
            note(f"processes: warming up {layout.result.name}")
            await _mixed(chosen, clients, config.warmup_s)
            for protocol in PROTOCOLS:
                await run_closed_loop(chosen[protocol][1], requests=10)
            for figures, handle in zip(layout.result.processes, layout.handles, strict=True):
                figures.rss_warm_mb = handle.memory_info().rss / MB
        per_round = max(1, config.single_requests // config.rounds)
        for number in range(1, config.rounds + 1):
            for layout in layouts:
                chosen = senders[layout.result.name]
                before = [_cpu(handle) for handle in layout.handles]
                metrics = [scrape(url, model=config.model) for url in _metrics_urls(layout)]
                sampler = asyncio.create_task(_sample_rss(layout))
                try:
                    found = await _mixed(chosen, clients, config.duration_s)
                finally:
                    sampler.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await sampler
                after = [scrape(url, model=config.model) for url in _metrics_urls(layout)]
                _add_figures(layout, metrics, after)
                for figures, handle, cpu in zip(layout.result.processes, layout.handles, before, strict=True):
                    figures.cpu_s += _cpu(handle) - cpu
                for protocol, measurement in found.items():
                    layout.mixed[protocol].append(measurement)
                rates = ", ".join(f"{p} {m.throughput_rps:.1f} req/s" for p, m in found.items())
                note(f"processes: round {number}/{config.rounds}, {layout.result.name}: {rates}")
                for protocol in PROTOCOLS:
                    if per_round:
                        single = await run_closed_loop(chosen[protocol][1], requests=per_round)
                        layout.single[protocol].append(single)
    for layout in layouts:
        result = layout.result
        result.mixed = {p: Measurement.merged(parts) for p, parts in layout.mixed.items() if parts}
        result.single = {p: Measurement.merged(parts) for p, parts in layout.single.items() if parts}
        result.mean_batch = None if layout.figures is None else layout.figures.mean_batch
        for figures, handle in zip(result.processes, layout.handles, strict=True):
            figures.rss_end_mb = handle.memory_info().rss / MB
            figures.threads = handle.num_threads()


async def _mixed(
    senders: dict[str, tuple[SendOnce, SendOnce]], clients: dict[str, int], duration_s: float
) -> dict[str, Measurement]:
    """Both protocols' senders at once for `duration_s`."""
    chosen = [protocol for protocol in PROTOCOLS if clients[protocol]]
    found = await asyncio.gather(
        *(
            run_closed_loop(senders[protocol][0], concurrency=clients[protocol], duration_s=duration_s)
            for protocol in chosen
        )
    )
    return dict(zip(chosen, found, strict=True))


async def _sample_rss(layout: _Layout) -> None:
    while True:
        for figures, handle in zip(layout.result.processes, layout.handles, strict=True):
            figures.rss_peak_mb = max(figures.rss_peak_mb, handle.memory_info().rss / MB)
        await asyncio.sleep(SAMPLE_S)


def _cpu(handle: psutil.Process) -> float:
    times = handle.cpu_times()
    return float(times.user + times.system)


def _metrics_urls(layout: _Layout) -> list[str]:
    """One metrics endpoint per process (the one process's HTTP and gRPC endpoints show one registry)."""
    urls = (
        [layout.http.metrics_url]
        if layout.http is layout.grpc
        else [layout.http.metrics_url, layout.grpc.metrics_url]
    )
    return [url for url in urls if url]


def _add_figures(layout: _Layout, before: list[MetricsSnapshot], after: list[MetricsSnapshot]) -> None:
    for early, late in zip(before, after, strict=True):
        figures = ServerFigures.between(early, late)
        layout.figures = figures if layout.figures is None else layout.figures.plus(figures)


def build_parser() -> argparse.ArgumentParser:
    """The command line's options."""
    defaults = ProcessesConfig()
    parser = argparse.ArgumentParser(
        prog="python -m bench.processes", description=__doc__.split("\n\n")[0] if __doc__ else None
    )
    parser.add_argument("--model-repository", type=Path, default=defaults.model_repository)
    parser.add_argument(
        "--model", default=defaults.model, help=f"the model loaded with requests (default {defaults.model})"
    )
    parser.add_argument(
        "--models",
        type=lambda text: tuple(n.strip() for n in text.split(",") if n.strip()),
        default=(),
        help="the models every process serves, comma-separated (default: every model of the repository)",
    )
    parser.add_argument("--http-clients", type=int, default=defaults.http_clients)
    parser.add_argument("--grpc-clients", type=int, default=defaults.grpc_clients)
    parser.add_argument(
        "--duration",
        dest="duration_s",
        type=float,
        default=defaults.duration_s,
        help=f"seconds of mixed load per layout and round (default {defaults.duration_s:g})",
    )
    parser.add_argument("--rounds", type=int, default=defaults.rounds)
    parser.add_argument("--warmup", dest="warmup_s", type=float, default=defaults.warmup_s)
    parser.add_argument(
        "--single-requests",
        type=int,
        default=defaults.single_requests,
        help="concurrency-1 requests per protocol and layout",
    )
    parser.add_argument(
        "--ready-timeout", dest="ready_timeout_s", type=float, default=defaults.ready_timeout_s
    )
    parser.add_argument("--output", type=Path, default=defaults.output)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Measure both layouts; print the tables; exit 0, or 2 on a setup error."""
    parser = build_parser()
    try:
        config = ProcessesConfig(**vars(parser.parse_args(argv)))
    except ValueError as exc:
        parser.error(str(exc))
    logging.basicConfig(
        level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    try:
        report = run_processes(config, note=lambda line: print(line, file=sys.stderr, flush=True))
    except (ServerError, FileNotFoundError, ValueError) as exc:
        print(f"processes: {exc}", file=sys.stderr)
        return 2
    print(report.to_markdown(), end="", flush=True)
    for path in report.write(config.output):
        print(f"processes: wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

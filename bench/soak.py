"""`python -m bench.soak` (`make soak`): steady load on both protocols for minutes,
watching the servers' memory, threads, file descriptors and event-loop tasks for growth.

The real HTTP (`python -m fastapi_onnx`) and gRPC (`python -m grpc_server`) processes are started
as `servers` starts them, with the real model. Closed-loop senders load both at once, each sender
cycling through every packaged photo and every inference endpoint of its protocol (HTTP: JSON,
multipart and V2 binary; gRPC: `Predict` and V2 `ModelInfer`). After a warm-up the load pauses,
each process's figures are read from its own `/metrics` (`process_resident_memory_bytes`,
`process_threads`, `process_open_fds`, `visionserve_event_loop_tasks`); then the soak runs,
sampled every `interval_s`; then it pauses again and the figures are read once more. The client's
connections stay open throughout, so both readings see the same connections.

It passes when no request failed, resident memory grew by less than `max_rss_growth_mb` and the
threads, descriptors and tasks at the end are no more than after warm-up plus their allowed
slack (threads: 4 by default, for pools that start threads lazily; see `SoakConfig.thread_slack`).
It prints a table and writes `soak.json` and `soak.md` to `output`.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from bench.closed_loop import cycling, run_closed_loop
from bench.grpc_load import grpc_channel, grpc_sender, v2_grpc_sender
from bench.http_load import event_loop_runner, file_request, json_request, v2_request
from bench.images import default_images
from bench.raw_http import RawHttpClient
from bench.servers import GrpcServerProcess, ServerError, ServerProcess
from bench.soak_report import Sample, ServerSoak, SoakReport
from bench.stats import Measurement

__all__ = ["Sample", "ServerSoak", "SoakConfig", "SoakReport", "main", "run_soak"]


@dataclass(frozen=True)
class SoakConfig:
    """What a soak runs: how long, how hard, against which model, and its pass bounds."""

    model_repository: Path = Path("model_repository")
    model_name: str = "efficientnet_lite0"
    backend: str = "onnx"
    duration_s: float = 180.0
    warmup_s: float = 20.0
    concurrency: int = 4
    """Closed-loop senders per protocol."""
    interval_s: float = 10.0
    """Seconds between samples during the soak (the trend in the report)."""
    max_rss_growth_mb: float = 50.0
    thread_slack: int = 4
    """Threads that may appear after warm-up: pools start their threads lazily, one when work
    arrives while every existing one is busy (the V2 HTTP decode runs in asyncio's default
    executor, up to min(32, cores + 4) threads), so with `concurrency` senders up to that many
    may first be needed late. A leak, one per request or connection, would be thousands."""
    fd_slack: int = 0
    task_slack: int = 0
    timeout_s: float = 30.0
    ready_timeout_s: float = 300.0
    output: Path = Path("bench-results/soak")

    def __post_init__(self) -> None:
        if self.duration_s <= 0 or self.warmup_s < 0 or self.interval_s <= 0:
            raise ValueError("the duration and interval must be positive, the warm-up not negative")
        if self.concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, got {self.concurrency}")
        if min(self.thread_slack, self.fd_slack, self.task_slack) < 0 or self.max_rss_growth_mb <= 0:
            raise ValueError("the bounds must not be negative")

    def limits(self) -> dict[str, float]:
        """The allowed growth of each figure, warm-up to end."""
        return {
            "rss_mb": self.max_rss_growth_mb,
            "threads": self.thread_slack,
            "open_fds": self.fd_slack,
            "tasks": self.task_slack,
        }


def run_soak(config: SoakConfig, *, note: Callable[[str], None] = print) -> SoakReport:
    """Start both servers, warm up, soak, read the figures; the servers are stopped at the end."""
    env = {
        "VISION_MODEL_REPOSITORY": str(Path(config.model_repository).resolve()),
        "VISION_MODEL_NAME": config.model_name,
    }
    http = ServerProcess(
        config.backend,
        env=env,
        log_path=config.output / "server-http.log",
        ready_timeout_s=config.ready_timeout_s,
    )
    grpc = GrpcServerProcess(
        config.backend,
        env=env,
        log_path=config.output / "server-grpc.log",
        ready_timeout_s=config.ready_timeout_s,
    )
    started = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    try:
        note(f"soak: starting python -m {http.module} and python -m {grpc.module}")
        for process in (http, grpc):
            process.launch()
        for process in (http, grpc):
            process.wait_until_ready()
        with event_loop_runner() as runner:
            servers = runner.run(_soak(config, http, grpc, note))
    finally:
        for process in (http, grpc):
            process.stop()
    return SoakReport(config, started, servers)


async def _soak(
    config: SoakConfig, http: ServerProcess, grpc: GrpcServerProcess, note: Callable[[str], None]
) -> list[ServerSoak]:
    images = default_images()
    model = config.model_name
    specs = [
        spec
        for image in images
        for spec in (
            json_request(image.data),
            file_request(image.data, image.name),
            v2_request(image.data, model),
        )
    ]
    client = RawHttpClient(http.base_url, concurrency=config.concurrency, timeout_s=config.timeout_s)
    channel = grpc_channel(grpc.target)
    try:
        http_send = cycling([client.sender(spec) for spec in specs])
        grpc_send = cycling(
            [
                send
                for image in images
                for send in (
                    grpc_sender(channel, image.data, timeout_s=config.timeout_s),
                    v2_grpc_sender(channel, image.data, model, timeout_s=config.timeout_s),
                )
            ]
        )
        http_url, grpc_url = http.metrics_url, grpc.metrics_url
        if http_url is None or grpc_url is None:
            raise ServerError("a server announced no /metrics endpoint")
        servers = [
            ServerSoak("HTTP", f"python -m {http.module}", sorted({s.name for s in specs})),
            ServerSoak(
                "gRPC", f"python -m {grpc.module}", ["Inference/Predict", "GRPCInferenceService/ModelInfer"]
            ),
        ]
        urls = [http_url, grpc_url]

        async def sample(at_s: float) -> None:
            for server, url in zip(servers, urls, strict=True):
                server.samples.append(await asyncio.to_thread(Sample.read, url, at_s))

        async def both(duration_s: float) -> list[Measurement]:
            return list(
                await asyncio.gather(
                    run_closed_loop(http_send, concurrency=config.concurrency, duration_s=duration_s),
                    run_closed_loop(grpc_send, concurrency=config.concurrency, duration_s=duration_s),
                )
            )

        note(f"soak: warming up for {config.warmup_s:g} s ({config.concurrency} senders per protocol)")
        warm = await both(config.warmup_s) if config.warmup_s else []
        for measurement, server in zip(warm, servers, strict=True):
            if measurement.failed:
                raise ServerError(
                    f"{server.protocol} requests failed during warm-up: {dict(measurement.errors)}"
                )
        await asyncio.sleep(1.0)  # let the last answers' tasks finish
        await sample(-1.0)
        note(f"soak: after warm-up {_line(servers)}; soaking for {config.duration_s:g} s")
        started = time.perf_counter()
        loads = asyncio.ensure_future(both(config.duration_s))
        while not loads.done():
            await asyncio.wait([loads], timeout=config.interval_s)
            if not loads.done():
                await sample(time.perf_counter() - started)
                note(f"soak: {time.perf_counter() - started:.0f} s {_line(servers)}")
        measurements = loads.result()
        await asyncio.sleep(1.0)
        await sample(time.perf_counter() - started)
        for measurement, server in zip(measurements, servers, strict=True):
            server.measurement = measurement
        note(f"soak: end {_line(servers)}")
        return servers
    finally:
        await client.aclose()
        await channel.close()


def _line(servers: list[ServerSoak]) -> str:
    return "; ".join(
        f"{s.protocol}: RSS {s.samples[-1].rss_mb:g} MB, {s.samples[-1].threads} threads, "
        f"{s.samples[-1].open_fds} fds, {s.samples[-1].tasks} tasks"
        for s in servers
    )


def build_parser() -> argparse.ArgumentParser:
    defaults = SoakConfig()
    parser = argparse.ArgumentParser(
        prog="python -m bench.soak",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    parser.add_argument("--model-repository", type=Path, default=defaults.model_repository)
    parser.add_argument("--model", dest="model_name", default=defaults.model_name)
    parser.add_argument("--backend", choices=["onnx", "torch"], default=defaults.backend)
    parser.add_argument(
        "--duration",
        dest="duration_s",
        type=float,
        default=defaults.duration_s,
        help=f"seconds of load after warm-up (default {defaults.duration_s:g})",
    )
    parser.add_argument(
        "--warmup",
        dest="warmup_s",
        type=float,
        default=defaults.warmup_s,
        help=f"seconds of load before the first reading (default {defaults.warmup_s:g})",
    )
    parser.add_argument(
        "--concurrency",
        type=int,
        default=defaults.concurrency,
        help=f"closed-loop senders per protocol (default {defaults.concurrency})",
    )
    parser.add_argument(
        "--interval",
        dest="interval_s",
        type=float,
        default=defaults.interval_s,
        help=f"seconds between samples during the soak (default {defaults.interval_s:g})",
    )
    parser.add_argument(
        "--max-rss-growth-mb",
        type=float,
        default=defaults.max_rss_growth_mb,
        help="fail if resident memory grows by this many MB or more (default "
        f"{defaults.max_rss_growth_mb:g})",
    )
    parser.add_argument(
        "--thread-slack",
        type=int,
        default=defaults.thread_slack,
        help=f"threads allowed to appear after warm-up (default {defaults.thread_slack}: pools start "
        "threads lazily)",
    )
    parser.add_argument(
        "--fd-slack", type=int, default=defaults.fd_slack, help="file descriptors allowed to appear"
    )
    parser.add_argument(
        "--task-slack", type=int, default=defaults.task_slack, help="asyncio tasks allowed to appear"
    )
    parser.add_argument(
        "--ready-timeout", dest="ready_timeout_s", type=float, default=defaults.ready_timeout_s
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=defaults.output,
        help=f"folder for soak.json, soak.md and the servers' logs (default {defaults.output}/)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run a soak; print its table; exit 0 when it passed, 1 when not, 2 on a setup error."""
    parser = build_parser()
    try:
        config = SoakConfig(**vars(parser.parse_args(argv)))
    except ValueError as exc:
        parser.error(str(exc))
    logging.basicConfig(
        level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    try:
        report = run_soak(config, note=lambda line: print(line, file=sys.stderr, flush=True))
    except (ServerError, FileNotFoundError, ValueError) as exc:
        print(f"soak: {exc}", file=sys.stderr)
        return 2
    print(report.to_markdown(), end="", flush=True)
    for path in report.write(config.output):
        print(f"soak: wrote {path}", file=sys.stderr)
    return 0 if report.passed else 1


if __name__ == "__main__":
    sys.exit(main())

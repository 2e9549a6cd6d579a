"""The command line of `python -m bench`: its options, parsed into a `BenchConfig`."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from bench.config import (
    BATCHING_MODES,
    DEFAULT_BACKENDS,
    DEFAULT_ENDPOINTS,
    DEFAULT_MODELS,
    ENDPOINTS,
    IMAGE_SETS,
    BenchConfig,
)
from bench.images import DEFAULT_LONG_SIDE, DEFAULT_QUALITY
from bench.layouts import Layout, parse_layouts
from bench.server_env import parse_server_env
from bench.servers import DEPLOYABLES


def _models(text: str) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    if not names:
        raise argparse.ArgumentTypeError(f"{text!r}: give a comma-separated list of model names")
    return names


def _names(allowed: list[str]) -> Callable[[str], tuple[str, ...]]:
    def parse(text: str) -> tuple[str, ...]:
        names = tuple(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
        unknown = [n for n in names if n not in allowed]
        if unknown or not names:
            raise argparse.ArgumentTypeError(f"{text!r}: give a comma-separated list of {', '.join(allowed)}")
        return names

    return parse


def parse_concurrency(text: str) -> tuple[int, ...]:
    """`1,4,16` -> (1, 4, 16): positive whole numbers, ascending, duplicates dropped."""
    levels: set[int] = set()
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        try:
            level = int(part)
        except ValueError:
            level = 0
        if level < 1:
            raise argparse.ArgumentTypeError(
                f"{part!r} is not a concurrency level: give whole numbers of at least 1, e.g. 1,4,16,32"
            )
        levels.add(level)
    if not levels:
        raise argparse.ArgumentTypeError("give at least one concurrency level, e.g. 1,4,16,32")
    return tuple(sorted(levels))


def _layouts(text: str) -> tuple[Layout, ...]:
    if text.strip().lower() == "none":
        return ()
    try:
        return parse_layouts(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _server_env(text: str) -> tuple[str, str]:
    try:
        return parse_server_env(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give a whole number of at least 1")
    return value


DESCRIPTION = """\
Measure, for each model, the in-process limit (decode + preprocess + predict_batch +
postprocess over thread layouts), the in-process stages (batch 1), and the served HTTP and gRPC
latency and throughput of the same images, and one stream's frames/s and per-frame latency, for
each runtime, concurrency level and batching mode. By default the harness starts the servers
itself (python -m fastapi_onnx / fastapi_pt, python -m grpc_server), each serving every model of
the run, from --model-repository; with --url and/or --grpc-target it measures a running
deployment instead. python -m bench.processes compares one process serving both APIs with two."""

EPILOG = """\
a running deployment (--url, --grpc-target):
  The harness starts no servers of the API: it measures the given ones at every --concurrency
  level, in the same rounds, with the same progress, report and files. Before measuring,
  GET URL/health/ready must answer 200 and the gRPC health check of visionserve.v1.Inference
  must answer SERVING within --ready-timeout; otherwise it exits 2 naming the target and its
  answer. The served model, runtime, device and threads are read from GET URL/models (with
  --grpc-target alone: --model and --backends say them). Batching is reported "as deployed".
  Server figures: HTTP rows from URL/metrics; gRPC rows from --grpc-metrics-url, or none.
  In-process rows and the limit run only if --model-repository holds the served model (with the
  deployment's runtime, device and threads); otherwise the report says "in-process limit: not
  measured (no local model repository)" and the x limit column is empty. --baseline starts the
  local baseline from --model-repository, and is refused without the model there.
  Refused with a target, as they only configure servers the harness starts: --batching off,
  --server-env, --overload, --backends with more than one runtime, --threads, --device.
  A deployment with the API key on: --api-key (default VISION_API_KEY) goes on every request
  and scrape; without it (or with a wrong one) the run stops before measuring, naming it. TLS:
  https:// in --url and --grpc-metrics-url, and --tls-ca PEM for a private CA (which also
  turns on TLS for --grpc-target).

  e.g. against make run:
    python -m bench --url http://127.0.0.1:8000 --grpc-target 127.0.0.1:50051 \\
        --grpc-metrics-url http://127.0.0.1:8002/metrics --concurrency 1,4,16"""


def build_parser() -> argparse.ArgumentParser:
    """The command line's options."""
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    deployment = parser.add_argument_group(
        "a running deployment", "measure services already running instead of starting servers"
    )
    deployment.add_argument(
        "--url",
        metavar="http://HOST:PORT",
        help="the HTTP API to measure (e.g. http://127.0.0.1:8000, make run's): rows for the HTTP "
        "endpoints of --endpoints, server figures from URL/metrics",
    )
    deployment.add_argument(
        "--grpc-target",
        metavar="HOST:PORT",
        help="the gRPC API to measure (e.g. 127.0.0.1:50051, make run's): rows for the gRPC "
        "endpoints of --endpoints",
    )
    deployment.add_argument(
        "--grpc-metrics-url",
        metavar="URL",
        help="the gRPC process's Prometheus endpoint (e.g. http://127.0.0.1:8002/metrics, make "
        "run's); default: none, and the gRPC rows have no server figures",
    )
    deployment.add_argument(
        "--api-key",
        metavar="KEY",
        help="the deployment's API key, sent on every request (Authorization: Bearer, gRPC "
        "metadata too) and never written into the report; default: VISION_API_KEY, or none",
    )
    deployment.add_argument(
        "--tls-ca",
        metavar="PEM",
        type=Path,
        help="certificates to trust for https:// URLs (default: the system CAs); also turns on TLS "
        "for --grpc-target (default: plain gRPC)",
    )
    parser.add_argument(
        "--model-repository",
        type=Path,
        default=Path("model_repository"),
        help="where the model is loaded from (default model_repository); with a deployment, only "
        "for the in-process rows and --baseline, and only if it holds the served model",
    )
    parser.add_argument(
        "--model",
        dest="models",
        type=_models,
        help=f"models to measure, comma-separated, the first the servers' default (default: "
        f"{','.join(DEFAULT_MODELS)}; a name the repository lacks, like yolo11n_320, is exported "
        "into OUTPUT/repository first); with --url: one model it serves (default: its default)",
    )
    parser.add_argument(
        "--backends",
        type=_names(list(DEPLOYABLES)),
        help=f"comma-separated runtimes (default: {','.join(DEFAULT_BACKENDS)}; torch compiles "
        "each model for minutes); with a deployment: at most one, the one it serves (default: GET "
        "URL/models says)",
    )
    parser.add_argument(
        "--endpoints",
        type=_names(ENDPOINTS),
        default=DEFAULT_ENDPOINTS,
        help="json = POST /predict, file = POST /predict/file, live = GET /health/live (the HTTP "
        "floor), grpc = unary Predict, health = gRPC health check (the gRPC floor), stream = one "
        "PredictStream, frames back to back (frames/s), pacedstream / livestream = one "
        "PredictStream / PredictLive fed at --clip-fps (latency from capture), v2 = Open "
        "Inference Protocol HTTP infer (binary extension, BYTES image), v2grpc = its gRPC "
        f"ModelInfer; default: {','.join(DEFAULT_ENDPOINTS)}",
    )
    parser.add_argument(
        "--images",
        choices=list(IMAGE_SETS),
        default="auto",
        help="what each model is sent: photos = every packaged photo as a 600 px JPEG, clip = the "
        "frames of a clip made from them (640x480, bench.clip), auto = the clip for a detector, "
        "the photos and an 8-face group image for face_expression, the photos otherwise (default auto)",
    )
    parser.add_argument(
        "--clip-fps",
        type=float,
        default=30.0,
        help="frame rate of pacedstream and livestream, a camera's (default 30)",
    )
    parser.add_argument(
        "--no-coserving",
        dest="coserving",
        action="store_false",
        help="with two or more models, do not also serve the first alone (its rows with the "
        "others loaded vs alone measure what they cost it)",
    )
    parser.add_argument(
        "--requests",
        type=int,
        default=200,
        help="measured requests per row (default 200; 0 = none, bound by --duration)",
    )
    parser.add_argument(
        "--duration", dest="duration_s", type=float, help="also stop each row after this many seconds"
    )
    parser.add_argument(
        "--warmup", type=int, default=30, help="unmeasured requests before each row (default 30)"
    )
    parser.add_argument(
        "--concurrency",
        type=parse_concurrency,
        default=(1, 16),
        help="closed-loop senders, a comma list of levels (e.g. 1,4,16,32): every served row is "
        "measured at each (default 1,16)",
    )
    parser.add_argument(
        "--batching",
        type=_names(list(BATCHING_MODES)),
        default=("on",),
        help="on = the server's batcher as configured; off = VISION_MAX_BATCH_SIZE=1 (one image per "
        "batch); on,off measures both, each with processes of its own (default on; with a "
        "deployment: as deployed, off refused)",
    )
    parser.add_argument(
        "--server-env",
        dest="server_env",
        type=_server_env,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a VISION_* setting for every served process (and the in-process runtimes where it "
        "is a model setting); repeatable, e.g. --server-env VISION_MAX_QUEUE_DELAY_US=500 (refused "
        "with a deployment: set it there)",
    )
    parser.add_argument(
        "--layouts",
        type=_layouts,
        help="in-process limit: thread layouts WORKERSxTHREADS, comma-separated (default on 2 cores: "
        "1x1,2x1,3x1,1x2,2x2,3x2); none = skip it",
    )
    parser.add_argument(
        "--limit-cap",
        dest="limit_cap_s",
        type=float,
        default=30.0,
        help="in-process limit: at most this many seconds per layout, over all rounds (default 30)",
    )
    parser.add_argument(
        "--baseline",
        action="store_true",
        help="also measure seed 004's plain endpoint (python -m bench.baseline: sync "
        "FastAPI, batch 1, ONNX Runtime) with HTTP JSON at each concurrency level; started on this "
        "machine from --model-repository, with a deployment too",
    )
    parser.add_argument(
        "--overload",
        action="store_true",
        help="also load HTTP JSON, HTTP multipart and gRPC unary (those of --endpoints) with "
        "--overload-concurrency senders against "
        "servers with a queue of --overload-queue-size: refusals must be immediate, none lost "
        "(refused with a deployment: it needs servers the harness starts)",
    )
    parser.add_argument(
        "--overload-concurrency",
        type=_positive_int,
        default=64,
        help="overload: closed-loop senders (default 64)",
    )
    parser.add_argument(
        "--overload-queue-size",
        type=_positive_int,
        default=8,
        help="overload: the servers' VISION_MAX_QUEUE_SIZE (default 8)",
    )
    parser.add_argument(
        "--overload-requests",
        type=_positive_int,
        help="overload: measured requests per row (default: --requests, at least 4 per sender)",
    )
    parser.add_argument(
        "--overload-backoff-ms",
        type=float,
        default=0.0,
        help="overload: a refused sender waits this long before its next request (default 0: it "
        "retries at once, a flood; e.g. 100 for a client that backs off as Retry-After asks)",
    )
    parser.add_argument(
        "--stream-window",
        type=int,
        help="stream: at most this many frames written and unanswered (default: the server's "
        "read-ahead, VISION_GRPC_STREAM_READ_AHEAD or 8)",
    )
    parser.add_argument(
        "--image",
        type=Path,
        help="one image file to send as it is (default: every packaged photo, resized to "
        f"{DEFAULT_LONG_SIDE} px on its longer side, JPEG quality {DEFAULT_QUALITY})",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=4,
        help="split each row into this many rounds, the rows taking turns (default 4; 1 = in sequence)",
    )
    parser.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        help="default: VISION_DEVICE or cpu (refused with a deployment: its own is used)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        help="runtime threads (default: the usable cores, as served; refused with a deployment: "
        "its own are used)",
    )
    parser.add_argument(
        "--no-torch-eager",
        dest="torch_eager",
        action="store_false",
        help="skip the in-process torch eager row",
    )
    parser.add_argument(
        "--ready-timeout",
        dest="ready_timeout_s",
        type=float,
        default=300.0,
        help="seconds to wait for a server, or a deployment's targets, to be ready (default 300)",
    )
    parser.add_argument(
        "--timeout",
        dest="timeout_s",
        type=float,
        default=30.0,
        help="per-request HTTP and gRPC timeout in seconds (default 30; per frame for the stream)",
    )
    parser.add_argument(
        "--client",
        choices=["raw", "httpx2"],
        default="raw",
        help="HTTP client: raw (minimal keep-alive HTTP/1.1, least overhead; default) or httpx2",
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=Path("bench-results"),
        help="folder for bench.json, bench.md, bench.csv, throughput.png, streams.png, the servers' "
        "logs and exported models (default bench-results/)",
    )
    parser.add_argument(
        "--progress",
        choices=["auto", "bar", "lines"],
        default="auto",
        help="progress on stderr: a redrawn bar (bar), one line per finished row (lines), or a bar "
        "on a terminal and lines elsewhere (auto, the default)",
    )
    return parser


def parse_args(argv: list[str] | None = None) -> BenchConfig:
    """Command line -> `BenchConfig`; bad combinations exit with a usage message."""
    return parse(argv)[0]


def parse(argv: list[str] | None) -> tuple[BenchConfig, str]:
    """Command line -> (`BenchConfig`, the progress mode)."""
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    progress = args.pop("progress")
    if args["backends"] is None:
        del args["backends"]  # BenchConfig's default: onnx,torch, or a deployment's own runtime
    if args["requests"] == 0:
        args["requests"] = None
    args["server_env"] = dict(args["server_env"])
    try:
        return BenchConfig(**args), progress
    except ValueError as exc:
        parser.error(str(exc))

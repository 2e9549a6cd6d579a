"""`python -m visionserve.bench`: in-process vs served latency for each runtime (`make bench`).

Prints the markdown table to stdout and writes `bench.json` and `bench.md` to `--output`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from pathlib import Path

from visionserve.bench.runner import DEFAULT_IMAGE, ENDPOINTS, BenchConfig, run_benchmark
from visionserve.bench.servers import DEPLOYABLES, ServerError
from visionserve.errors import ConfigurationError


def _names(allowed: list[str]) -> Callable[[str], tuple[str, ...]]:
    def parse(text: str) -> tuple[str, ...]:
        names = tuple(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
        unknown = [n for n in names if n not in allowed]
        if unknown or not names:
            raise argparse.ArgumentTypeError(f"{text!r}: give a comma-separated list of {', '.join(allowed)}")
        return names

    return parse


def build_parser() -> argparse.ArgumentParser:
    """The command line's options."""
    parser = argparse.ArgumentParser(
        prog="python -m visionserve.bench",
        description="Measure the in-process pipeline (decode + preprocess + predict_batch + "
        "postprocess, batch 1) and the served HTTP and gRPC latency of the same image, for each runtime.",
    )
    parser.add_argument("--model-repository", type=Path, default=Path("model_repository"))
    parser.add_argument(
        "--model", dest="model_name", help="model name (default: VISION_MODEL_NAME or the default)"
    )
    parser.add_argument(
        "--backends",
        type=_names(list(DEPLOYABLES)),
        default=("onnx", "torch"),
        help="comma-separated runtimes (default: onnx,torch)",
    )
    parser.add_argument(
        "--endpoints",
        type=_names(ENDPOINTS),
        default=("file", "json", "live", "grpc", "health", "stream"),
        help="file = POST /predict/file, json = POST /predict, live = GET /health/live "
        "(the HTTP floor), grpc = unary Predict, health = gRPC health check (the gRPC floor), "
        "stream = frames/s of one PredictStream; default: all of them",
    )
    parser.add_argument(
        "--requests",
        type=int,
        default=300,
        help="measured requests per row (default 300; 0 = none, bound by --duration)",
    )
    parser.add_argument(
        "--duration", dest="duration_s", type=float, help="also stop each row after this many seconds"
    )
    parser.add_argument(
        "--warmup", type=int, default=30, help="unmeasured requests before each row (default 30)"
    )
    parser.add_argument(
        "--concurrency", type=int, default=1, help="closed-loop HTTP and gRPC unary senders (default 1)"
    )
    parser.add_argument(
        "--stream-window",
        type=int,
        help="stream: at most this many frames written and unanswered (default: the server's "
        "read-ahead, VISION_GRPC_STREAM_READ_AHEAD or 8)",
    )
    parser.add_argument(
        "--image", type=Path, help=f"image file to send (default: scikit-image's {DEFAULT_IMAGE})"
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=5,
        help="split each row into this many rounds, the rows taking turns (default 5; 1 = in sequence)",
    )
    parser.add_argument("--device", choices=["cpu", "cuda"], help="default: VISION_DEVICE or cpu")
    parser.add_argument("--threads", type=int, help="runtime threads (default: the usable cores, as served)")
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
        help="seconds to wait for a server to be ready (default 300)",
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
        help="folder for bench.json, bench.md and the servers' logs (default bench-results/)",
    )
    return parser


def parse_args(argv: list[str] | None = None) -> BenchConfig:
    """Command line -> `BenchConfig`; bad combinations exit with a usage message."""
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    if args["requests"] == 0:
        args["requests"] = None
    try:
        return BenchConfig(**args)
    except ValueError as exc:
        parser.error(str(exc))


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; print the markdown table; write the report files. Returns the exit status."""
    config = parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    try:
        report = run_benchmark(config)
    except (ServerError, ConfigurationError, FileNotFoundError, ValueError) as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bench: interrupted", file=sys.stderr)
        return 130
    print(report.to_markdown(), end="", flush=True)
    for path in report.write(config.output):
        print(f"bench: wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

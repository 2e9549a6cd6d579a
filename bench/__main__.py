"""`python -m bench`: each model's in-process limit and pipeline vs served latency and
throughput, for each runtime, concurrency level and batching mode (`make bench`).

Prints the markdown report to stdout, progress to stderr, and writes `bench.json`, `bench.md`,
`bench.csv`, and (with two or more concurrency levels) `throughput.png` and (with streams)
`streams.png` to `--output`. Exits 1 when an overload row lost requests (neither accepted nor
refused), 2 on a setup error (a server that does not start, a deployment that is not ready, a
model that cannot be exported).

The options are `cli`'s; with `--url` / `--grpc-target` it measures a running deployment instead
of starting servers (`cli.EPILOG`, the end of `--help`).
"""

from __future__ import annotations

import logging
import sys

from bench.cli import build_parser, parse, parse_args, parse_concurrency
from bench.deployment import DeploymentError
from bench.progress import ProgressBar
from bench.runner import run_benchmark
from bench.servers import ServerError
from bench.variants import ExportError
from visionserve.errors import ConfigurationError

__all__ = ["build_parser", "main", "parse_args", "parse_concurrency"]


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; print the markdown table; write the report files. Returns the exit status."""
    config, mode = parse(argv)
    logging.basicConfig(
        level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    progress = ProgressBar(live=None if mode == "auto" else mode == "bar")
    try:
        report = run_benchmark(config, progress=progress)
    except (
        ServerError,
        DeploymentError,
        ConfigurationError,
        FileNotFoundError,
        ExportError,
        ValueError,
    ) as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bench: interrupted", file=sys.stderr)
        return 130
    print(report.to_markdown(), end="", flush=True)
    for path in report.write(config.output):
        print(f"bench: wrote {path}", file=sys.stderr)
    if not report.nothing_lost():
        print(
            "bench: FAILED: overload rows lost requests (neither accepted nor refused); see the "
            "overload table",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

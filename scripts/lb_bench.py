"""Replicas behind HAProxy, measured longer than the tests do (docs/reliability.md).

    python scripts/lb_bench.py restarts [--rounds 10] [--protocol http grpc]   (make lb-restarts)
    python scripts/lb_bench.py throughput [--seconds 20] [--concurrency 16]    (make lb-throughput)

`restarts`: two replicas of the API (the real efficientnet_lite0) behind Debian's HAProxy, three
client threads sending a real photo all the time; each round restarts both replicas in turn
(SIGTERM, exit, start, ready, UP), and every other round also SIGKILLs one replica while the
clients retry per the documented policy. Fails (exit 1) if a request is lost: a graceful restart
must fail nothing, a SIGKILL nothing once retried.

`throughput`: requests/s and latency at a fixed concurrency through HAProxy, for three layouts on
this machine: one replica on one core (`taskset`), two replicas on one core each, one replica on
every core with the default threads; each over HTTP (`POST /predict/file`) and gRPC (`Predict`),
with the benchmark's own ~600x400 JPEGs. HAProxy and the load generator run unpinned on the same
cores, as a sidecar balancer would; the report says so.

Both use the classes of tests/lb.py (the same configuration the tests check) and the model
repository of VISION_TEST_MODEL_REPOSITORY (default ./model_repository; `make export` fills it).
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.closed_loop import cycling, run_closed_loop  # noqa: E402
from bench.grpc_load import grpc_channel, grpc_sender  # noqa: E402
from bench.http_load import event_loop_runner, file_request, http_client, http_sender  # noqa: E402
from bench.images import default_images  # noqa: E402
from bench.stats import Measurement  # noqa: E402
from tests.lb import (  # noqa: E402
    HAProxy,
    Load,
    Outcome,
    Protocol,
    Replica,
    haproxy_path,
    in_parallel,
    ok,
)

CLIENTS = 3


def repository() -> Path:
    path = Path(os.environ.get("VISION_TEST_MODEL_REPOSITORY", ROOT / "model_repository"))
    if not (path / "efficientnet_lite0" / "config.json").is_file():
        sys.exit(f"no efficientnet_lite0 in {path}: run `make export` first")
    return path


def describe(outcomes: list[Outcome]) -> str:
    return ", ".join(f"{n} x {k}" for k, n in Counter(f"{o.status} {o.error[:70]}" for o in outcomes).items())


# --- restarts ---------------------------------------------------------------------------------


def restarts(protocol: Protocol, rounds: int, directory: Path) -> bool:
    replicas = [Replica(repository(), protocol), Replica(repository(), protocol)]
    in_parallel(*(replica.start for replica in replicas))
    haproxy: HAProxy | None = None
    loads: list[Load] = []
    try:
        in_parallel(*(replica.wait_ready for replica in replicas))
        haproxy = HAProxy(directory, replicas, protocol)
        for index in range(len(replicas)):
            haproxy.wait_state(f"r{index}", "UP")
        address = haproxy.url if protocol == "http" else haproxy.target
        graceful = Load(address, CLIENTS, False, protocol)
        loads.append(graceful)
        graceful.start()
        graceful.wait_for(10)
        started = time.monotonic()
        windows: list[float] = []
        kills: list[str] = []
        for round_ in range(1, rounds + 1):
            for index, replica in enumerate(replicas):
                began = time.monotonic()
                replica.signal(signal.SIGTERM)
                assert replica.wait_exit(timeout_s=60) == 0, f"r{index} did not exit 0"
                replica.start()
                replica.wait_ready()
                haproxy.wait_state(f"r{index}", "UP")
                windows.append(time.monotonic() - began)
                graceful.wait_for(2 * CLIENTS)
            if round_ % 2 == 0:  # a SIGKILL, with clients that retry per the policy
                graceful.stopping.set()
                graceful.stop()
                retrying = Load(address, CLIENTS, True, protocol)
                loads.append(retrying)
                retrying.start()
                retrying.wait_for(10)
                victim = replicas[round_ // 2 % 2]
                victim.signal(signal.SIGKILL)
                victim.wait_exit()
                retrying.wait_for(5 * CLIENTS)
                victim.start()
                victim.wait_ready()
                retrying.wait_for(2 * CLIENTS)
                retrying.stop()
                lost = [o for o in retrying.outcomes if not ok(o)]
                kills.append(f"{len(retrying.outcomes)} requests, {len(lost)} lost")
                graceful = Load(address, CLIENTS, False, protocol)
                loads.append(graceful)
                graceful.start()
                graceful.wait_for(2 * CLIENTS)
            print(
                f"  {protocol} round {round_}/{rounds}: {sum(len(x.outcomes) for x in loads)} requests so far"
            )
        graceful.stop()
        elapsed = time.monotonic() - started
    finally:
        for load in loads:
            load.stopping.set()
        for replica in replicas:
            replica.kill()
        if haproxy is not None:
            haproxy.stop()
    outcomes = [o for load in loads for o in load.outcomes]
    failed = [o for o in outcomes if not ok(o)]
    latencies = sorted(o.ended - o.started for o in outcomes if ok(o))
    print(
        f"{protocol}: {rounds} rounds ({2 * rounds} graceful restarts, {len(kills)} SIGKILLs) in "
        f"{elapsed:.0f} s; {len(outcomes)} requests, {len(failed)} failed"
        + (f" ({describe(failed)})" if failed else "")
        + f"; restart window (SIGTERM to UP again) median {statistics.median(windows):.1f} s, "
        f"max {max(windows):.1f} s; latency p50 {1000 * latencies[len(latencies) // 2]:.0f} ms, "
        f"p99 {1000 * latencies[int(len(latencies) * 0.99)]:.0f} ms; SIGKILL rounds: {kills}"
    )
    return not failed


# --- throughput -------------------------------------------------------------------------------

LAYOUTS: dict[str, tuple[list[str], int | None]] = {
    # name: (one core list per replica, VISION_THREADS per replica; None: the default)
    "1 replica, 1 core": (["0"], 1),
    "2 replicas, 1 core each": (["0", "1"], 1),
    "1 replica, 2 cores (default threads)": (["0,1"], None),
}


async def measure(protocol: Protocol, address: str, concurrency: int, seconds: float) -> Measurement:
    images = default_images()
    if protocol == "http":
        async with http_client(address, concurrency=concurrency) as client:
            send = cycling([http_sender(client, file_request(i.data, i.name)) for i in images])
            await run_closed_loop(send, concurrency=concurrency, requests=4 * concurrency)
            return await run_closed_loop(send, concurrency=concurrency, duration_s=seconds)
    async with grpc_channel(address) as channel:
        send = cycling([grpc_sender(channel, i.data) for i in images])
        await run_closed_loop(send, concurrency=concurrency, requests=4 * concurrency)
        return await run_closed_loop(send, concurrency=concurrency, duration_s=seconds)


def throughput(protocols: list[Protocol], concurrency: int, seconds: float, directory: Path) -> bool:
    rows: list[str] = []
    good = True
    for name, (cores, threads) in LAYOUTS.items():
        for protocol in protocols:
            replicas = [Replica(repository(), protocol, threads) for _ in cores]
            for replica, core in zip(replicas, cores, strict=True):
                replica.taskset = ["taskset", "-c", core]
            haproxy: HAProxy | None = None
            try:
                in_parallel(*(replica.start for replica in replicas))
                in_parallel(*(replica.wait_ready for replica in replicas))
                haproxy = HAProxy(directory, replicas, protocol)
                for index in range(len(replicas)):
                    haproxy.wait_state(f"r{index}", "UP")
                address = haproxy.url if protocol == "http" else haproxy.target
                with event_loop_runner() as runner:
                    result = runner.run(measure(protocol, address, concurrency, seconds))
            finally:
                for replica in replicas:
                    replica.kill()
                if haproxy is not None:
                    haproxy.stop()
            summary = result.summary()
            good &= result.failed == 0
            p50 = f"{summary.p50_ms:.1f}" if summary else "-"
            p99 = f"{summary.p99_ms:.1f}" if summary else "-"
            rows.append(
                f"| {name} | {protocol} | {result.throughput_rps:.1f} | {p50} | {p99} | {result.failed} |"
            )
            print(rows[-1], flush=True)
    print(f"\nconcurrency {concurrency}, {seconds:g} s per row, through HAProxy:\n")
    print("| Layout | Protocol | req/s | p50 ms | p99 ms | failed |\n| --- | --- | --: | --: | --: | --: |")
    print("\n".join(rows))
    return good


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    restart = commands.add_parser("restarts", help="rolling restarts and SIGKILLs under load, many rounds")
    restart.add_argument("--rounds", type=int, default=10)
    restart.add_argument("--protocol", nargs="+", choices=["http", "grpc"], default=["http", "grpc"])
    speed = commands.add_parser("throughput", help="1 vs 2 replicas vs 1 replica on 2 cores")
    speed.add_argument("--seconds", type=float, default=20.0)
    speed.add_argument("--concurrency", type=int, default=16)
    speed.add_argument("--protocol", nargs="+", choices=["http", "grpc"], default=["http", "grpc"])
    args = parser.parse_args()
    if haproxy_path() is None:
        print("no haproxy: apt-get install haproxy (make test installs it)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="lb-bench-") as directory:
        if args.command == "restarts":
            results = [restarts(protocol, args.rounds, Path(directory)) for protocol in args.protocol]
            return 0 if all(results) else 1
        if os.cpu_count() is not None and (os.cpu_count() or 0) < 2:
            print("throughput needs 2 cores", file=sys.stderr)
            return 2
        return 0 if throughput(args.protocol, args.concurrency, args.seconds, Path(directory)) else 1


if __name__ == "__main__":
    sys.exit(main())

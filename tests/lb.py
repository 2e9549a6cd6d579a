"""API replicas behind Debian's HAProxy, for the load-balancer tests and `make lb-soak`.

Each replica is `python -m fastapi_onnx` (HTTP) or `python -m grpc_server` (gRPC) on ports chosen
free (it keeps them across restarts, since the balancer's configuration names them); HAProxy runs
in the foreground (`-db`) with the configuration written by `haproxy_config`, and its stats page
(CSV) says which replicas it sees UP. A gRPC replica's health is checked over HTTP on its metrics
port (`/health/ready` there says what gRPC health says): HAProxy's checks cannot send the binary
gRPC health request.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import grpc
import httpx2

from tests.conftest import photo_bytes
from tests.processes import ServiceProcess

HAPROXY = Path("/usr/sbin/haproxy")
PHOTO = "chelsea.png"
CATS = {"tabby", "tiger cat", "Persian cat", "Siamese cat", "Egyptian cat"}
CHECK_INTER_MS = 200
SHUTDOWN_DELAY_S = 1.5  # > the check interval (and a slow check on busy cores): out of rotation first
Protocol = Literal["http", "grpc"]
BANNERS = {
    "http": re.compile(r"on (http://127\.0\.0\.1:\d+)"),
    "grpc": re.compile(r" on (127\.0\.0\.1:\d+)\s*$"),
}
# The documented client policy (docs/reliability.md): on a retriable failure (HTTP: 502, 503, 504,
# or the connection closed with no answer; gRPC: UNAVAILABLE) retry at once, and if that fails too
# once more after a pause longer than the balancer's check interval, by when a dead replica is out of
# rotation (an immediate retry alone lost 4 requests in 10 SIGKILLs: it reached the dying replica).
HTTP_RETRY_DELAYS_S = (0.0, 0.5)
# gRPC: its own retry policy (service config); its backoff is jittered, random(0, backoff).
GRPC_RETRY_CONFIG = json.dumps(
    {
        "methodConfig": [
            {
                "name": [{"service": "visionserve.v1.Inference"}],
                "retryPolicy": {
                    "maxAttempts": 3,
                    "initialBackoff": "0.1s",
                    "maxBackoff": "1s",
                    "backoffMultiplier": 5.0,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ]
    }
)


@dataclass(frozen=True)
class Timeouts:
    """The balancer's client-side timeouts, matched to the replicas' own (settings.py).

    - `header_s` = VISION_HEADER_TIMEOUT_S (10): `timeout http-request`; HAProxy answers a client
      that trickles its headers 408 itself, so a slowloris never reaches a replica.
    - `idle_s`: `timeout client` / `timeout server`, inactivity. HTTP: 60 s, shorter than the
      replicas' keep-alive (VISION_KEEP_ALIVE_S 75) as the setting's doc asks, and equal to
      VISION_BODY_TIMEOUT_S (60), the replica's whole-body deadline, which is what ends a body
      trickled a byte at a time (activity resets HAProxy's timer; the replica's deadline it does
      not). gRPC: 300 s = VISION_GRPC_MAX_CONNECTION_IDLE_S, so that a quiet live stream is not
      cut by the balancer sooner than by the server.
    """

    header_s: float = 10.0
    idle_s: float = 60.0

    @staticmethod
    def for_protocol(protocol: Protocol) -> Timeouts:
        return Timeouts(idle_s=60.0 if protocol == "http" else 300.0)


def haproxy_path() -> str | None:
    """Debian's haproxy (`make test` installs it where apt-get exists), else one on PATH."""
    return str(HAPROXY) if HAPROXY.is_file() else shutil.which("haproxy")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def haproxy_config(
    frontend_port: int,
    stats_port: int,
    replicas: list[tuple[int, int]],
    protocol: Protocol = "http",
    timeouts: Timeouts | None = None,
) -> str:
    """HTTP mode (HTTP/2 both sides for gRPC); active checks on /health/ready; `replicas` are
    (service port, check port) pairs.

    - `option httpchk GET /health/ready` + `inter 200ms fall 1 rise 1`: a replica leaves rotation at
      the first 503 `stopping` (within ~0.2 s of SIGTERM, well inside VISION_SHUTDOWN_DELAY_S) and
      comes back at its first 200 after a restart (never while it loads: its /predict would 503).
      `timeout check 2s` so that a check slowed by busy cores fails only when really stuck (with
      `fall 1` a short timeout could take both replicas out at once: 503 for everyone).
    - HTTP: `option http-server-close`: the client side keeps alive, but HAProxy opens a server
      connection per request and closes it after the answer, so no idle pooled connection to a
      stopping replica can be reused as it closes (the race that loses a request with keep-alive
      reuse).
    - gRPC: `proto h2` on the bind (cleartext HTTP/2 from clients) and on each server; every call
      (HTTP/2 stream) is balanced on its own, so one client channel spreads over the replicas. The
      check goes to the metrics port over HTTP/1 (`port`, `check-proto h1`). A stopping replica's
      GOAWAY makes HAProxy open no new stream on that connection; it is DOWN by then anyway.
    - `retries 3` + `option redispatch 1` with the default `retry-on conn-failure`: a connection
      refused (a replica that closed its port before the check saw it, or a crashed one) is retried
      on the other replica; the request was never sent, so this is always safe. No L7 retries
      (`retry-on empty-response/503`): they replay a request already sent, need it to fit in
      `tune.bufsize` (16 kB; a photo is 240 kB), and the replay policy belongs to the client.
    - No `on-marked-down shutdown-sessions`: requests in flight on a stopping replica finish.
    - Timeouts: see `Timeouts`.
    """
    timeouts = timeouts or Timeouts.for_protocol(protocol)
    h2 = " proto h2" if protocol == "grpc" else ""
    servers = "\n".join(
        f"    server r{index} 127.0.0.1:{port}{h2} check"
        + (f" port {check_port} check-proto h1" if check_port != port else "")
        for index, (port, check_port) in enumerate(replicas)
    )
    connection_mode = "    option http-server-close\n" if protocol == "http" else ""
    return f"""global
    maxconn 2000
    log stdout format raw local0 info

defaults
    mode http
    log global
    option httplog
    timeout connect 2s
    timeout client {timeouts.idle_s:g}s
    timeout server {timeouts.idle_s:g}s
    timeout check 2s
    timeout http-request {timeouts.header_s:g}s
{connection_mode}    retries 3
    option redispatch 1

frontend api
    bind 127.0.0.1:{frontend_port}{h2}
    default_backend replicas

backend replicas
    balance roundrobin
    option httpchk GET /health/ready
    http-check expect status 200
    default-server inter {CHECK_INTER_MS}ms fall 1 rise 1
    http-response set-header X-Replica %s
{servers}

listen stats
    mode http
    bind 127.0.0.1:{stats_port}
    stats enable
    stats uri /stats
"""


class HAProxy:
    """`haproxy -db -f CONFIG` in the foreground; `states()` reads its stats CSV."""

    def __init__(
        self,
        directory: Path,
        replicas: list[Replica],
        protocol: Protocol = "http",
        timeouts: Timeouts | None = None,
    ):
        binary = haproxy_path()
        assert binary, "no haproxy"
        self.port, self.stats_port = free_port(), free_port()
        self.config = directory / "haproxy.cfg"
        ports = [(replica.port, replica.check_port) for replica in replicas]
        self.config.write_text(haproxy_config(self.port, self.stats_port, ports, protocol, timeouts))
        command = [binary, "-c", "-f", str(self.config)]
        check = subprocess.run(command, check=False, capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr
        self.log = (directory / "haproxy.log").open("w")
        self.process = subprocess.Popen(
            [binary, "-db", "-f", str(self.config)], stdout=self.log, stderr=subprocess.STDOUT
        )
        self.url = f"http://127.0.0.1:{self.port}"
        self.target = f"127.0.0.1:{self.port}"  # gRPC

    def states(self) -> dict[str, str]:
        """Server name -> status (UP, DOWN, ...), as HAProxy sees it now."""
        text = httpx2.get(f"http://127.0.0.1:{self.stats_port}/stats;csv", timeout=5).text
        header = text.splitlines()[0].lstrip("# ").split(",")
        states = {}
        for line in text.splitlines()[1:]:
            row = dict(zip(header, line.split(","), strict=False))
            if row.get("pxname") == "replicas" and row.get("svname", "").startswith("r"):
                states[row["svname"]] = row["status"]
        return states

    def wait_state(self, server: str, state: str, timeout_s: float = 30) -> float:
        """Wait until `server` is `state` (e.g. UP); return the seconds it took."""
        started = time.monotonic()
        while time.monotonic() - started < timeout_s:
            assert self.process.poll() is None, "haproxy exited"
            try:
                if self.states().get(server) == state:
                    return time.monotonic() - started
            except httpx2.TransportError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"{server} not {state} in {timeout_s} s: {self.states()}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGUSR1)  # soft stop
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()


class Replica:
    """One API process on fixed ports; `start()` again after an exit starts a new one there.

    HTTP: `python -m fastapi_onnx`, checked on its own port. gRPC: `python -m grpc_server`, checked
    on its metrics port (`check_port`), where /health/ready follows gRPC health.
    """

    def __init__(self, repository: Path, protocol: Protocol = "http", threads: int | None = 1, **env: str):
        self.protocol = protocol
        self.port = free_port()
        self.module = "fastapi_onnx" if protocol == "http" else "grpc_server"
        common = {
            "VISION_MODEL_REPOSITORY": str(repository),
            "VISION_MODELS": "efficientnet_lite0",
            "VISION_SHUTDOWN_DELAY_S": str(SHUTDOWN_DELAY_S),
            **({"VISION_THREADS": str(threads)} if threads is not None else {}),  # None: the default
        }
        if protocol == "http":
            self.check_port = self.port
            ports = {"VISION_PORT": str(self.port), "VISION_GRACEFUL_SHUTDOWN_S": "10"}
        else:
            self.check_port = free_port()
            ports = {
                "VISION_GRPC_PORT": str(self.port),
                "VISION_GRPC_METRICS_PORT": str(self.check_port),
                "VISION_GRPC_GRACE_S": "10",
            }
        self.env = {**common, **ports, **env}
        self.server: ServiceProcess | None = None
        self.outputs: list[str] = []
        self.taskset: list[str] = []  # e.g. ["taskset", "-c", "0"]: pin the process to a core

    def start(self) -> None:
        self.server = ServiceProcess(self.module, self.env, BANNERS[self.protocol], prefix=self.taskset)

    def wait_ready(self, timeout_s: float = 120) -> None:
        assert self.server is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.server.process.poll() is None, self.server.output()
            try:
                url = f"http://127.0.0.1:{self.check_port}/health/ready"
                if httpx2.get(url, timeout=2).status_code == 200:
                    return
            except httpx2.TransportError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"not ready in {timeout_s} s")

    def signal(self, sig: int) -> None:
        assert self.server is not None
        self.server.process.send_signal(sig)

    def wait_exit(self, timeout_s: float = 30) -> int:
        """Wait for the exit; return the exit code (negative: killed by that signal)."""
        assert self.server is not None
        code = self.server.process.wait(timeout=timeout_s)
        self.outputs.append(self.server.output())
        self.server = None
        return code

    def kill(self) -> None:
        """Teardown: whatever runs is killed."""
        if self.server is not None:
            self.outputs.append(self.server.output())
            self.server = None


@dataclass
class Outcome:
    started: float
    ended: float
    status: int  # HTTP status; 0: no HTTP answer (transport error); gRPC: 200 for OK, else 0
    prediction: str = ""
    replica: str = ""
    error: str = ""
    retried: int = 0  # HTTP: retries the client made before this answer


@dataclass
class Load:
    """`clients` threads, each sending the photo through the balancer until stopped: HTTP POSTs
    (keep-alive), or gRPC Predict calls (one channel per thread, `url` the target host:port)."""

    url: str
    clients: int = 3
    retry: bool = False  # the documented client policy (HTTP_RETRY_DELAYS_S; gRPC: GRPC_RETRY_CONFIG)
    protocol: Protocol = "http"
    outcomes: list[Outcome] = field(default_factory=list)
    stopping: threading.Event = field(default_factory=threading.Event)
    threads: list[threading.Thread] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> None:
        for _ in range(self.clients):
            thread = threading.Thread(target=self._client, daemon=True)
            thread.start()
            self.threads.append(thread)

    def _client(self) -> None:
        if self.protocol == "grpc":
            self._grpc_client()
            return
        data = photo_bytes(PHOTO)
        with httpx2.Client(base_url=self.url, timeout=30) as client:
            while not self.stopping.is_set():
                outcome = self._send(client, data)
                tries = [outcome]
                for delay in HTTP_RETRY_DELAYS_S if self.retry else ():
                    if ok(outcome):
                        break
                    time.sleep(delay)
                    outcome = self._send(client, data)
                    tries.append(outcome)
                if len(tries) > 1:
                    outcome.retried = len(tries) - 1
                    outcome.error = " then ".join(f"{o.status} {o.error}".strip() for o in tries)[:300]
                    outcome.started = tries[0].started
                with self.lock:
                    self.outcomes.append(outcome)

    def _grpc_client(self) -> None:
        from visionserve.v1 import inference_pb2 as pb
        from visionserve.v1 import inference_pb2_grpc as pb_grpc

        request = pb.PredictRequest(image=photo_bytes(PHOTO))
        options: list[tuple[str, int | str]] = (
            [("grpc.service_config", GRPC_RETRY_CONFIG), ("grpc.per_rpc_retry_buffer_size", 4 << 20)]
            if self.retry
            else [("grpc.enable_retries", 0)]
        )
        with grpc.insecure_channel(self.url, options=options) as channel:
            stub = pb_grpc.InferenceStub(channel)
            while not self.stopping.is_set():
                started = time.monotonic()
                try:
                    reply, call = stub.Predict.with_call(request, timeout=30)
                    metadata = dict(call.initial_metadata() or ())
                    outcome = Outcome(
                        started, time.monotonic(), 200, reply.prediction, str(metadata.get("x-replica", ""))
                    )
                except grpc.RpcError as error:
                    code = error.code().name if isinstance(error, grpc.Call) else "?"
                    details = error.details() if isinstance(error, grpc.Call) else str(error)
                    outcome = Outcome(started, time.monotonic(), 0, error=f"{code}: {details}"[:200])
                with self.lock:
                    self.outcomes.append(outcome)

    @staticmethod
    def _send(client: httpx2.Client, data: bytes) -> Outcome:
        started = time.monotonic()
        try:
            response = client.post("/predict/file", files={"file": (PHOTO, data, "image/png")})
        except httpx2.TransportError as error:
            return Outcome(started, time.monotonic(), 0, error=type(error).__name__)
        prediction = response.json().get("prediction", "") if response.status_code == 200 else ""
        return Outcome(
            started,
            time.monotonic(),
            response.status_code,
            prediction,
            response.headers.get("x-replica", ""),
            "" if response.status_code == 200 else response.text[:200],
        )

    def count(self) -> int:
        with self.lock:
            return len(self.outcomes)

    def between(self, start: float, end: float) -> list[Outcome]:
        with self.lock:
            return [o for o in self.outcomes if start <= o.started < end]

    def wait_for(self, more: int, timeout_s: float = 30) -> None:
        """Wait until `more` further answers arrived."""
        target = self.count() + more
        deadline = time.monotonic() + timeout_s
        while self.count() < target:
            assert time.monotonic() < deadline, f"load stalled at {self.count()} answers"
            time.sleep(0.05)

    def stop(self, timeout_s: float = 60) -> None:
        self.stopping.set()
        deadline = time.monotonic() + timeout_s
        for thread in self.threads:
            thread.join(timeout=max(0.0, deadline - time.monotonic()))
        assert not any(thread.is_alive() for thread in self.threads), "a client still waits"


def ok(outcome: Outcome) -> bool:
    return outcome.status == 200 and outcome.prediction in CATS


def in_parallel(*steps: Callable[[], None]) -> None:
    """Run `steps` on threads (starting replicas at once halves the wait on 2 cores)."""
    errors: list[BaseException] = []

    def run(step: Callable[[], None]) -> None:
        try:
            step()
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=run, args=(step,)) for step in steps]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]

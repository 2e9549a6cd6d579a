"""HTTP API replicas behind Debian's HAProxy, for the load-balancer tests and `scripts/lb_restart.py`.

Each replica is `python -m fastapi_onnx` on a port chosen free (it keeps that port across restarts,
since the balancer's configuration names it); HAProxy runs in the foreground (`-db`) with the
configuration written by `haproxy_config`, and its stats page (CSV) says which replicas it sees UP.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx2

from tests.conftest import photo_bytes
from tests.integration.test_server_process import Server

HAPROXY = Path("/usr/sbin/haproxy")
PHOTO = "chelsea.png"
CATS = {"tabby", "tiger cat", "Persian cat", "Siamese cat", "Egyptian cat"}
CHECK_INTER_MS = 200
SHUTDOWN_DELAY_S = 1.5  # > the check interval (and a slow check on busy cores): out of rotation first


def haproxy_path() -> str | None:
    """Debian's haproxy (`make test` installs it where apt-get exists), else one on PATH."""
    return str(HAPROXY) if HAPROXY.is_file() else shutil.which("haproxy")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def haproxy_config(frontend_port: int, stats_port: int, replica_ports: list[int]) -> str:
    """HTTP mode; active checks on /health/ready; a new server connection per request.

    - `option httpchk GET /health/ready` + `inter 200ms fall 1 rise 1`: a replica leaves rotation at
      the first 503 `stopping` (within ~0.2 s of SIGTERM, well inside VISION_SHUTDOWN_DELAY_S) and
      comes back at its first 200 after a restart (never while it loads: its /predict would 503).
      `timeout check 2s` so that a check slowed by busy cores fails only when really stuck (with
      `fall 1` a short timeout could take both replicas out at once: 503 for everyone).
    - `option http-server-close`: the client side keeps alive, but HAProxy opens a server connection
      per request and closes it after the answer, so no idle pooled connection to a stopping replica
      can be reused as it closes (the race that loses a request with keep-alive reuse).
    - `retries 3` + `option redispatch 1` with the default `retry-on conn-failure`: a connection
      refused (a replica that closed its port before the check saw it, or a crashed one) is retried
      on the other replica; the request was never sent, so this is always safe. No L7 retries
      (`retry-on empty-response/503`): they replay a request already sent, need it to fit in
      `tune.bufsize` (16 kB; a photo is 240 kB), and the replay policy belongs to the client.
    - No `on-marked-down shutdown-sessions`: requests in flight on a stopping replica finish.
    """
    servers = "\n".join(
        f"    server r{index} 127.0.0.1:{port} check" for index, port in enumerate(replica_ports)
    )
    return f"""global
    maxconn 2000
    log stdout format raw local0 info

defaults
    mode http
    log global
    option httplog
    timeout connect 2s
    timeout client 60s
    timeout server 60s
    timeout check 2s
    timeout http-request 10s
    option http-server-close
    retries 3
    option redispatch 1

frontend api
    bind 127.0.0.1:{frontend_port}
    default_backend replicas

backend replicas
    balance roundrobin
    option httpchk GET /health/ready
    http-check expect status 200
    default-server inter {CHECK_INTER_MS}ms fall 1 rise 1
    http-response set-header X-Replica %s
{servers}

listen stats
    bind 127.0.0.1:{stats_port}
    stats enable
    stats uri /stats
"""


class HAProxy:
    """`haproxy -db -f CONFIG` in the foreground; `states()` reads its stats CSV."""

    def __init__(self, directory: Path, replica_ports: list[int]):
        binary = haproxy_path()
        assert binary, "no haproxy"
        self.port, self.stats_port = free_port(), free_port()
        self.config = directory / "haproxy.cfg"
        self.config.write_text(haproxy_config(self.port, self.stats_port, replica_ports))
        command = [binary, "-c", "-f", str(self.config)]
        check = subprocess.run(command, check=False, capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr
        self.log = (directory / "haproxy.log").open("w")
        self.process = subprocess.Popen(
            [binary, "-db", "-f", str(self.config)], stdout=self.log, stderr=subprocess.STDOUT
        )
        self.url = f"http://127.0.0.1:{self.port}"

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
    """One HTTP API process on a fixed port; `restart()` starts a new one there."""

    def __init__(self, repository: Path, threads: int = 1):
        self.port = free_port()
        self.env = {
            "VISION_PORT": str(self.port),
            "VISION_MODEL_REPOSITORY": str(repository),
            "VISION_MODELS": "efficientnet_lite0",
            "VISION_THREADS": str(threads),
            "VISION_SHUTDOWN_DELAY_S": str(SHUTDOWN_DELAY_S),
            "VISION_GRACEFUL_SHUTDOWN_S": "10",
        }
        self.server: Server | None = None
        self.outputs: list[str] = []

    def start(self) -> None:
        self.server = Server("fastapi_onnx", self.env)

    def wait_ready(self, timeout_s: float = 120) -> None:
        assert self.server is not None
        self.server.wait_ready(timeout_s)

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
    status: int  # 0: no HTTP answer (transport error)
    prediction: str = ""
    replica: str = ""
    error: str = ""
    retried: bool = False  # answered on the client's one retry


@dataclass
class Load:
    """`clients` threads, each POSTing the photo through the balancer (keep-alive) until stopped."""

    url: str
    clients: int = 3
    retry_once: bool = False  # the documented client policy: retry once on 502/503/504/transport error
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
        data = photo_bytes(PHOTO)
        with httpx2.Client(base_url=self.url, timeout=30) as client:
            while not self.stopping.is_set():
                outcome = self._send(client, data)
                if self.retry_once and not ok(outcome):
                    first = outcome
                    outcome = self._send(client, data)
                    outcome.retried = True
                    outcome.error = f"first try: {first.status} {first.error}".strip()
                    outcome.started = first.started
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

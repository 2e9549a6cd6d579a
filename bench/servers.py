"""The real services as subprocesses: HTTP (`python -m fastapi_onnx` / `python -m fastapi_pt`),
gRPC (`python -m grpc_server`, `VISION_BACKEND` naming the runtime), both APIs from one process
(`VISION_GRPC_SERVE_HTTP=true python -m grpc_server`) and the naive reference server
(`python -m bench.baseline`).

Each listens on a free port (`VISION_PORT=0` / `VISION_GRPC_PORT=0` / `--port 0`), announces it in
its start-up banner (`... on http://127.0.0.1:PORT` / `visionserve gRPC API (...) on
127.0.0.1:PORT`), and is used once it is ready (`GET /health/ready` answers 200 / the standard
health check answers SERVING); it is stopped with SIGTERM, as a process manager stops it. The
gRPC process also announces its Prometheus endpoint (`visionserve gRPC metrics on
http://127.0.0.1:PORT/metrics`, with `VISION_GRPC_METRICS_PORT=0`).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType

import grpc
import httpx2
from grpc_health.v1 import health_pb2, health_pb2_grpc

import visionserve
from bench.server_env import inherited_env, model_env

__all__ = ["DEPLOYABLES", "BaselineServerProcess", "CombinedServerProcess", "GrpcServerProcess"]
__all__ += ["ServerError", "ServerProcess", "model_env"]

DEPLOYABLES = {"onnx": "fastapi_onnx", "torch": "fastapi_pt"}
"""Backend -> the module that serves it."""

GRPC_MODULE = "grpc_server"
"""The module that serves gRPC, for either backend."""

_BANNER = re.compile(r"\bon (http://[\w.\-]+:\d+)\s*$", re.MULTILINE)
_GRPC_BANNER = re.compile(r"\bgRPC API \(.*\) on ([\w.\-]+:\d+)\s*$", re.MULTILINE)
_GRPC_METRICS_BANNER = re.compile(r"\bgRPC metrics on (http://[\w.\-]+:\d+/metrics)\s*$", re.MULTILINE)
BASELINE_MODULE = "bench.baseline"
_GRPC_SERVICE = "visionserve.v1.Inference"
_SOURCE_ROOT = Path(visionserve.__file__).resolve().parent.parent


class ServerError(RuntimeError):
    """The service did not start, did not get ready in time, or died; the message says which and
    ends with the tail of its log."""


def banner_url(text: str) -> str | None:
    """The base URL announced in the service's start-up banner, if `text` holds it."""
    match = _BANNER.search(text)
    return match.group(1) if match else None


def grpc_banner_target(text: str) -> str | None:
    """The `host:port` announced in the gRPC service's start-up banner, if `text` holds it."""
    match = _GRPC_BANNER.search(text)
    return match.group(1) if match else None


def grpc_metrics_url(text: str) -> str | None:
    """The metrics URL the gRPC service announces (`visionserve gRPC metrics on URL`), if any."""
    match = _GRPC_METRICS_BANNER.search(text)
    return match.group(1) if match else None


class ServerProcess:
    """One served HTTP process: `start()` (or `with`) blocks until it is ready, `stop()` ends it.
    `launch()` then `wait_until_ready()` do the same in two steps (to start several at once).

    Its stdout and stderr go to `log_path`; the banner is read from there, and the log's tail is
    quoted when something goes wrong.
    """

    protocol = "HTTP"

    def __init__(
        self,
        backend: str,
        *,
        env: Mapping[str, str],
        log_path: Path,
        ready_timeout_s: float = 300.0,
        stop_timeout_s: float = 60.0,
    ):
        if backend not in DEPLOYABLES:
            raise ValueError(f"unknown backend {backend!r}; choose from {', '.join(DEPLOYABLES)}")
        self.backend = backend
        self.env = dict(env)
        self.log_path = log_path
        self.ready_timeout_s = ready_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self.address = ""
        """Where it listens, once started: `http://host:port` (HTTP) or `host:port` (gRPC)."""
        self._process: subprocess.Popen[bytes] | None = None
        self._deadline = 0.0

    @property
    def base_url(self) -> str:
        """The HTTP service's base URL, once started."""
        return self.address

    @property
    def pid(self) -> int | None:
        """The process id, once launched."""
        return self._process.pid if self._process is not None else None

    @property
    def module(self) -> str:
        """The module `python -m` runs."""
        return DEPLOYABLES[self.backend]

    @property
    def metrics_url(self) -> str | None:
        """Its Prometheus endpoint, once started (None where it has none)."""
        return f"{self.address}/metrics" if self.address else None

    def arguments(self) -> list[str]:
        """Command-line arguments after `python -m MODULE`."""
        return []

    def listen_env(self) -> dict[str, str]:
        """Variables that make it listen on a free port of 127.0.0.1."""
        return {"VISION_HOST": "127.0.0.1", "VISION_PORT": "0"}

    def announced(self, text: str) -> str | None:
        """The address its banner announces, if `text` holds the banner."""
        return banner_url(text)

    def start(self) -> str:
        """Start the service, wait for its banner and then for readiness; return its address."""
        self.launch()
        return self.wait_until_ready()

    def launch(self) -> None:
        """Start the process and return at once; `wait_until_ready` waits for it."""
        env = {
            **inherited_env(),
            **self.env,
            **self.listen_env(),
            "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(_SOURCE_ROOT), os.environ.get("PYTHONPATH")])),
        }
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._deadline = time.monotonic() + self.ready_timeout_s
        with self.log_path.open("wb") as log:
            # NOTE: a session of its own, so a Ctrl-C at the terminal reaches the harness only; the
            # harness then stops the server with SIGTERM (in `stop`), the way it is measured.
            self._process = subprocess.Popen(
                [sys.executable, "-m", self.module, *self.arguments()],
                env=env,
                cwd=_SOURCE_ROOT,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def wait_until_ready(self) -> str:
        """Wait for the banner and then for readiness (`ready_timeout_s` from `launch`); return the
        address. The process is stopped if it does not get there."""
        try:
            self.address = self._wait_for_banner(self._deadline)
            self._wait_ready(self._deadline)
        except BaseException:
            self.stop()
            raise
        return self.address

    def _wait_for_banner(self, deadline: float) -> str:
        while time.monotonic() < deadline:
            self._check_alive("while starting")
            address = self.announced(self._read_log())
            if address:
                return address
            time.sleep(0.05)
        raise ServerError(f"{self._name()} printed no start-up banner with its address in time{self._tail()}")

    def _wait_ready(self, deadline: float) -> None:
        self._wait_http(self.address, deadline)

    def _wait_http(self, address: str, deadline: float) -> None:
        """Poll `GET {address}/health/ready` until it answers 200."""
        with httpx2.Client(base_url=address, timeout=5.0, trust_env=False) as client:
            while time.monotonic() < deadline:
                self._check_alive("while loading the model")
                try:
                    if client.get("/health/ready").status_code == 200:
                        return
                except httpx2.TransportError:
                    pass  # not listening yet
                time.sleep(0.2)
        raise self._not_ready()

    def _not_ready(self) -> ServerError:
        return ServerError(
            f"{self._name()} was not ready after {self.ready_timeout_s:.0f} s "
            f"(raise --ready-timeout for a slow warm-up){self._tail()}"
        )

    def _check_alive(self, when: str) -> None:
        if self._process is not None and self._process.poll() is not None:
            raise ServerError(
                f"{self._name()} exited with status {self._process.returncode} {when}{self._tail()}"
            )

    def stop(self) -> int | None:
        """SIGTERM, wait for the graceful shutdown (SIGKILL after `stop_timeout_s`); the exit status."""
        process = self._process
        if process is None:
            return None
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(self.stop_timeout_s)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        return process.returncode

    def _name(self) -> str:
        return f"python -m {self.module}"

    def _read_log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def _tail(self, lines: int = 20) -> str:
        tail = self._read_log().rstrip().splitlines()[-lines:]
        return f"; last lines of {self.log_path}:\n" + "\n".join(tail) if tail else ""

    def __enter__(self) -> ServerProcess:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


class GrpcServerProcess(ServerProcess):
    """One served gRPC process (`python -m grpc_server`) for `backend`; `env` should set
    `VISION_BACKEND` (`model_env` does). Ready when the standard health check of the Inference
    service answers SERVING; `target` is its `host:port`."""

    protocol = "gRPC"

    @property
    def target(self) -> str:
        """`host:port`, once started."""
        return self.address

    @property
    def module(self) -> str:
        return GRPC_MODULE

    @property
    def metrics_url(self) -> str | None:
        """The metrics endpoint its banner announced (None if it announced none)."""
        return grpc_metrics_url(self._read_log()) if self.address else None

    def listen_env(self) -> dict[str, str]:
        return {
            "VISION_BACKEND": self.backend,
            "VISION_GRPC_HOST": "127.0.0.1",
            "VISION_GRPC_PORT": "0",
            "VISION_GRPC_METRICS_PORT": "0",
        }

    def announced(self, text: str) -> str | None:
        return grpc_banner_target(text)

    def _wait_ready(self, deadline: float) -> None:
        request = health_pb2.HealthCheckRequest(service=_GRPC_SERVICE)
        with grpc.insecure_channel(self.address, options=[("grpc.enable_http_proxy", 0)]) as channel:
            check = health_pb2_grpc.HealthStub(channel).Check
            while time.monotonic() < deadline:
                self._check_alive("while loading the model")
                try:
                    if check(request, timeout=5.0).status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass  # not answering yet
                time.sleep(0.2)
        raise self._not_ready()


class CombinedServerProcess(GrpcServerProcess):
    """One process serving both APIs over one registry (`VISION_GRPC_SERVE_HTTP=true python -m
    grpc_server`, `make run`'s layout): `target` is its gRPC `host:port`, `base_url` its HTTP API.
    Ready when both the gRPC health check answers SERVING and `GET /health/ready` 200."""

    protocol = "HTTP+gRPC"

    def __init__(
        self,
        backend: str,
        *,
        env: Mapping[str, str],
        log_path: Path,
        ready_timeout_s: float = 300.0,
        stop_timeout_s: float = 60.0,
    ):
        super().__init__(
            backend,
            env=env,
            log_path=log_path,
            ready_timeout_s=ready_timeout_s,
            stop_timeout_s=stop_timeout_s,
        )
        self.http_address = ""

    @property
    def base_url(self) -> str:
        """The HTTP API's base URL, once started."""
        return self.http_address

    def listen_env(self) -> dict[str, str]:
        return {
            **super().listen_env(),
            "VISION_GRPC_SERVE_HTTP": "true",
            "VISION_HOST": "127.0.0.1",
            "VISION_PORT": "0",
        }

    def announced(self, text: str) -> str | None:
        """The gRPC target, once both banners are out (the HTTP one is kept in `http_address`)."""
        target, url = grpc_banner_target(text), banner_url(text)
        if target is None or url is None:
            return None
        self.http_address = url
        return target

    def _wait_ready(self, deadline: float) -> None:
        super()._wait_ready(deadline)
        self._wait_http(self.http_address, deadline)


class BaselineServerProcess(ServerProcess):
    """The naive reference server of seed 004 (`python -m bench.baseline`) on ONNX
    Runtime, for the model of `model_repository`; it has no /metrics."""

    protocol = "HTTP"

    def __init__(
        self,
        *,
        model_repository: Path,
        model_name: str,
        threads: int,
        log_path: Path,
        ready_timeout_s: float = 300.0,
        stop_timeout_s: float = 60.0,
    ):
        super().__init__(
            "onnx", env={}, log_path=log_path, ready_timeout_s=ready_timeout_s, stop_timeout_s=stop_timeout_s
        )
        self.model_repository = Path(model_repository).resolve()
        self.model_name = model_name
        self.threads = threads

    @property
    def module(self) -> str:
        return BASELINE_MODULE

    @property
    def metrics_url(self) -> str | None:
        return None

    def listen_env(self) -> dict[str, str]:
        return {}

    def arguments(self) -> list[str]:
        return [
            "--model-repository",
            str(self.model_repository),
            "--model",
            self.model_name,
            "--threads",
            str(self.threads),
            "--host",
            "127.0.0.1",
            "--port",
            "0",
        ]

"""`make run`: start the local stack (the HTTP and gRPC APIs, and the upload UI), wait until each is
ready, print where they are, and stop them all cleanly on Ctrl-C (no orphan processes).

The APIs are one process serving both protocols over one registry of models
(`VISION_GRPC_SERVE_HTTP=true python -m grpc_server`): one copy of every model, one compute budget
for the cores (docs/benchmarks.md has the measurement behind the choice); the UI is its own
process. Each can also be started alone (`python -m fastapi_onnx`, `python -m fastapi_pt`,
`python -m grpc_server`, `python -m flask_ui`), as Compose does.
Ports: VISION_PORT (8000), VISION_GRPC_PORT (50051), VISION_UI_PORT (5000). With VISION_API_KEY
set, the UI gets the key too (VISION_UI_API_KEY); with VISION_TLS_CERT_FILE/_KEY_FILE set, both APIs
serve TLS and the UI and the ready checks trust VISION_UI_TLS_CA_FILE, else the certificate itself
(a self-signed one).
"""

from __future__ import annotations

import argparse
import os
import signal
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field

BACKENDS = ("onnx", "torch")
STOP_TIMEOUT_S = 40.0


@dataclass
class Service:
    """A child process and how to tell that it is ready."""

    name: str
    module: str
    env: dict[str, str]
    ready: object  # a callable returning True once ready
    address: str
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def start(self) -> None:
        self.process = subprocess.Popen([sys.executable, "-m", self.module], env={**os.environ, **self.env})

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None


def http_ready(url: str, path: str = "/health/ready", ca_file: str | None = None) -> bool:
    """GET `path` answers 200 (over https:// trusting `ca_file`)."""
    context = ssl.create_default_context(cafile=ca_file) if url.startswith("https://") else None
    try:
        with urllib.request.urlopen(f"{url}{path}", timeout=2, context=context) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def grpc_ready(target: str, ca_file: str | None = None) -> bool:
    """The standard health check says SERVING (over TLS trusting `ca_file`, when given)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    if ca_file is not None:
        with open(ca_file, "rb") as pem:
            channel = grpc.secure_channel(target, grpc.ssl_channel_credentials(pem.read()))
    else:
        channel = grpc.insecure_channel(target)
    try:
        with channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
            return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)
    except grpc.RpcError:
        return False


def _read_key(path: str | None) -> str | None:
    """The key in VISION_API_KEY_FILE, if set and readable (the APIs report a bad one)."""
    try:
        return open(path, encoding="utf-8").read().strip() if path else None
    except OSError:
        return None


def stop_all(services: list[Service]) -> int:
    """SIGTERM every child still running, wait for them, kill stragglers; worst exit code."""
    for service in services:
        if service.alive():
            assert service.process is not None
            service.process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT_S
    worst = 0
    for service in services:
        if service.process is None:
            continue
        try:
            code = service.process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            print(f"{service.name} did not stop in {STOP_TIMEOUT_S:.0f} s: killing it", file=sys.stderr)
            service.process.kill()
            code = service.process.wait()
        if code != 0:
            how = f"by signal {-code}" if code < 0 else f"with status {code}"
            print(f"{service.name} exited {how}", file=sys.stderr)
        worst = max(worst, abs(code))
    return worst


def main(argv: list[str] | None = None) -> int:
    """Start the stack; return when it is stopped."""
    parser = argparse.ArgumentParser(prog="scripts/stack.py", description=__doc__)
    parser.add_argument("--backend", choices=BACKENDS, default=os.environ.get("BACKEND", "onnx"))
    parser.add_argument("--ready-timeout", type=float, default=300.0)
    args = parser.parse_args(argv)

    http_port = os.environ.get("VISION_PORT", "8000")
    grpc_port = os.environ.get("VISION_GRPC_PORT", "50051")
    ui_port = os.environ.get("VISION_UI_PORT", "5000")
    tls_cert = os.environ.get("VISION_TLS_CERT_FILE") or None
    ca_file = (os.environ.get("VISION_UI_TLS_CA_FILE") or tls_cert) if tls_cert else None
    http_url = f"{'https' if tls_cert else 'http'}://127.0.0.1:{http_port}"
    grpc_target = f"127.0.0.1:{grpc_port}"
    ui_url = f"http://127.0.0.1:{ui_port}"
    ui_env = {"VISION_UI_PORT": ui_port, "VISION_UI_API_URL": http_url, "VISION_UI_GRPC_TARGET": grpc_target}
    if not os.environ.get("VISION_UI_API_KEY"):
        key = os.environ.get("VISION_API_KEY") or _read_key(os.environ.get("VISION_API_KEY_FILE"))
        if key:
            ui_env["VISION_UI_API_KEY"] = key
    if ca_file:
        ui_env |= {"VISION_UI_GRPC_TLS": "true", "VISION_UI_TLS_CA_FILE": ca_file}
    api_env = {
        "VISION_PORT": http_port,
        "VISION_GRPC_PORT": grpc_port,
        "VISION_BACKEND": args.backend,
        "VISION_GRPC_SERVE_HTTP": "true",
    }
    services = [
        Service(
            "HTTP and gRPC APIs",
            "grpc_server",
            api_env,
            lambda: http_ready(http_url, ca_file=ca_file) and grpc_ready(grpc_target, ca_file),
            f"{http_url}, {grpc_target}",
        ),
        Service(
            "UI",
            "flask_ui",
            ui_env,
            lambda: http_ready(ui_url, "/health/live"),
            ui_url,
        ),
    ]
    # NOTE: Ctrl-C reaches every process of the terminal's group: the children shut down
    # gracefully on their own; this parent waits for them (and SIGTERMs any that did not get it).
    # SIGINT is handled explicitly: started from a script in the background, it would be ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        for service in services:
            service.start()
        pending = list(services)
        deadline = time.monotonic() + args.ready_timeout
        while pending:
            for service in list(pending):
                if not service.alive():
                    print(f"{service.name} exited during start-up; stopping the stack", file=sys.stderr)
                    stop_all(services)
                    return 1
                if service.ready():  # type: ignore[operator]
                    pending.remove(service)
            if time.monotonic() > deadline:
                print(
                    f"not ready after {args.ready_timeout:.0f} s: {[s.name for s in pending]}",
                    file=sys.stderr,
                )
                stop_all(services)
                return 1
            time.sleep(0.3)
        print(
            f"\nvisionserve stack ready ({args.backend}):\n"
            f"  UI        {ui_url}  (image page; {ui_url}/video, {ui_url}/live, {ui_url}/status)\n"
            f"  HTTP API  {http_url}  (docs: {http_url}/docs)\n"
            f"  gRPC API  {grpc_target}  (python -m grpc_server.client photo.jpg --target {grpc_target})\n"
            "  Ctrl-C stops everything\n",
            flush=True,
        )
        while all(service.alive() for service in services):
            time.sleep(0.5)
        print("a service exited; stopping the stack", file=sys.stderr)
        return stop_all(services) or 1
    except KeyboardInterrupt:
        return stop_all(services)


if __name__ == "__main__":
    sys.exit(main())

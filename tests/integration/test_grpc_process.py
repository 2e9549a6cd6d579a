"""`python -m grpc_server` as users start it: a real process on a real socket (port 0), real signals."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.conftest import DEFAULT_MODEL, ROOT, photo_bytes
from tests.processes import ServiceProcess
from visionserve.v1 import inference_pb2 as pb
from visionserve.v1 import inference_pb2_grpc as pb_grpc

pytestmark = [pytest.mark.real_model, pytest.mark.slow]

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
BANNER = re.compile(r" on (127\.0\.0\.1:\d+)\s*$")


class GrpcProcess(ServiceProcess):
    """`python -m grpc_server`; `target` (host:port) comes from its banner."""

    def __init__(self, env: dict[str, str]):
        super().__init__("grpc_server", env, BANNER)
        self.target = self.address
        assert int(self.target.rsplit(":", 1)[1]) > 0, "the banner shows port 0, not the bound port"

    def wait_serving(self, channel: grpc.Channel, timeout_s: float = 120) -> None:
        """Poll health Check ("" and the Inference service) until both are SERVING."""
        stub = health_pb2_grpc.HealthStub(channel)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.output()
            statuses = [
                stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=5).status
                for name in ("", "visionserve.v1.Inference")
            ]
            if statuses == [SERVING, SERVING]:
                return
            # (the two are set one after the other: "" may already be SERVING, the service not yet)
            assert set(statuses) <= {SERVING, NOT_SERVING}, statuses
            time.sleep(0.05)
        raise AssertionError(f"not SERVING in {timeout_s} s")


def _env(real_repository: Path, **extra: str) -> dict[str, str]:
    return {
        "VISION_GRPC_PORT": "0",
        "VISION_GRPC_METRICS_PORT": "0",
        "VISION_MODEL_REPOSITORY": str(real_repository),
        **extra,
    }


@pytest.fixture
def started() -> Iterator[list[GrpcProcess]]:
    processes: list[GrpcProcess] = []
    yield processes
    for process in processes:
        process.output()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_serves_and_stops_cleanly_on_a_signal(
    sig: int, real_repository: Path, started: list[GrpcProcess]
) -> None:
    server = GrpcProcess(_env(real_repository))
    started.append(server)
    with grpc.insecure_channel(server.target) as channel:
        server.wait_serving(channel)
        stub = pb_grpc.InferenceStub(channel)
        response = stub.Predict(pb.PredictRequest(image=photo_bytes("coffee.png")), timeout=30)
        assert response.model == DEFAULT_MODEL
        assert response.prediction == "espresso" and response.probability > 0.9
        started_at = time.monotonic()
        assert server.stop(sig) == 0
        assert time.monotonic() - started_at < 5
    output = server.output()
    assert "Traceback" not in output, output
    assert "grpcurl" in output and "stopped" in output, output


def test_invalid_setting_exits_2_naming_it(real_repository: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "grpc_server"],
        cwd=ROOT,
        env={**os.environ, **_env(real_repository, VISION_GRPC_MAX_MESSAGE_BYTES="5")},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert "VISION_GRPC_MAX_MESSAGE_BYTES='5'" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr

"""The deployables as users start them: real processes on real sockets (port 0), real signals."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx2
import pytest

from tests.conftest import DEFAULT_MODEL, ROOT, photo_bytes
from tests.processes import ServiceProcess

pytestmark = [pytest.mark.real_model, pytest.mark.slow]

BANNER = re.compile(r"on (http://127\.0\.0\.1:\d+)")


class Server(ServiceProcess):
    """An HTTP deployable; `url` comes from its banner."""

    def __init__(self, module: str, env: dict[str, str]):
        super().__init__(module, env, BANNER)
        self.url = self.address

    def wait_ready(self, timeout_s: float = 120) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.output()
            try:
                if httpx2.get(f"{self.url}/health/ready", timeout=2).status_code == 200:
                    return
            except httpx2.TransportError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"not ready in {timeout_s} s")


def _env(real_repository: Path, **extra: str) -> dict[str, str]:
    return {"VISION_PORT": "0", "VISION_MODEL_REPOSITORY": str(real_repository), **extra}


@pytest.fixture
def started() -> Iterator[list[Server]]:
    servers: list[Server] = []
    yield servers
    for server in servers:
        server.output()


@pytest.mark.parametrize(
    ("module", "runtime", "extra"),
    [("fastapi_onnx", "onnx", {}), ("fastapi_pt", "torch", {"VISION_TORCH_COMPILE": "false"})],
)
def test_deployable_serves_and_stops_cleanly_on_ctrl_c(
    module: str, runtime: str, extra: dict[str, str], real_repository: Path, started: list[Server]
) -> None:
    server = Server(module, _env(real_repository, **extra))
    started.append(server)
    server.wait_ready()
    with httpx2.Client(base_url=server.url, timeout=30) as client:
        models = client.get("/models").json()["models"]
        assert models[0]["name"] == DEFAULT_MODEL and models[0]["runtime"] == runtime
        response = client.post("/predict/file", files={"file": ("coffee.png", photo_bytes("coffee.png"))})
        assert response.status_code == 200 and response.json()["prediction"] == "espresso"
        assert client.get("/docs").status_code == 200
    started_at = time.monotonic()
    assert server.stop(signal.SIGINT) == 0
    assert time.monotonic() - started_at < 15
    output = server.output()
    assert "Traceback" not in output, output
    assert "docs:" in output and "curl" in output


def test_sigterm_exits_zero(real_repository: Path, started: list[Server]) -> None:
    server = Server("fastapi_onnx", _env(real_repository))
    started.append(server)
    server.wait_ready()
    assert server.stop(signal.SIGTERM) == 0
    assert "Traceback" not in server.output()


def _run_to_exit(module: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", module],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_unknown_model_exits_with_a_helpful_message(real_repository: Path) -> None:
    result = _run_to_exit("fastapi_onnx", _env(real_repository, VISION_MODEL_NAME="resnet999"))
    assert result.returncode == 2
    assert "resnet999" in result.stderr and DEFAULT_MODEL in result.stderr  # lists what is there


def test_invalid_setting_exits_naming_it(real_repository: Path) -> None:
    result = _run_to_exit("fastapi_onnx", _env(real_repository, VISION_DEVICE="tpu"))
    assert result.returncode == 2
    assert "VISION_DEVICE='tpu'" in result.stderr and "cpu" in result.stderr


def test_cuda_without_provider_fails_at_start_saying_what_is_missing(real_repository: Path) -> None:
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    result = _run_to_exit("fastapi_onnx", _env(real_repository, VISION_DEVICE="cuda"))
    assert result.returncode == 1
    assert "onnxruntime-gpu" in result.stderr and "VISION_DEVICE=cpu" in result.stderr

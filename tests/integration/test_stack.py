"""`make run`'s launcher: both APIs and the UI up and ready, Ctrl-C stops everything, no orphans."""

from __future__ import annotations

import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import grpc
import httpx2
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.conftest import ROOT, photo_bytes
from tests.tls import make_tls

pytestmark = [pytest.mark.real_model, pytest.mark.slow]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


KEY = "stack-test-key-0123456789"


def _secured(folder: Path) -> dict[str, str]:
    """The key and TLS on (a throwaway CA's certificate), as a user would turn them on."""
    tls = make_tls(folder)
    return {
        "VISION_API_KEY": KEY,
        "VISION_TLS_CERT_FILE": str(tls.cert_file),
        "VISION_TLS_KEY_FILE": str(tls.key_file),
        "VISION_UI_TLS_CA_FILE": str(tls.ca_file),
    }


@pytest.mark.parametrize("secured", [False, True], ids=["plain", "key-and-tls"])
def test_stack_starts_both_apis_and_the_ui_and_ctrl_c_stops_all(
    real_repository: Path, secured: bool, tmp_path: Path
) -> None:
    http_port, grpc_port, ui_port = _free_port(), _free_port(), _free_port()
    env = {
        **os.environ,
        "VISION_MODEL_REPOSITORY": str(real_repository),
        "VISION_PORT": str(http_port),
        "VISION_GRPC_PORT": str(grpc_port),
        "VISION_GRPC_METRICS_PORT": "0",
        "VISION_UI_PORT": str(ui_port),
        "PYTHONUNBUFFERED": "1",
        **(_secured(tmp_path) if secured else {}),
    }
    scheme = "https" if secured else "http"
    verify = ssl.create_default_context(cafile=str(tmp_path / "ca.pem")) if secured else True
    process = subprocess.Popen(
        [sys.executable, "scripts/stack.py", "--backend", "onnx"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group, like a terminal's foreground job
    )
    assert process.stdout is not None
    lines = []
    try:
        for line in process.stdout:
            lines.append(line)
            if "stack ready" in line:
                break
        assert any("stack ready" in line for line in lines), "".join(lines)
        banner = "".join(process.stdout.readline() for _ in range(4))
        for address in (
            f"http://127.0.0.1:{ui_port}",
            f"{scheme}://127.0.0.1:{http_port}",
            f"127.0.0.1:{grpc_port}",
        ):
            assert address in banner, banner
        children = _children(process.pid)
        assert len(children) == 2  # one process for both APIs, one for the UI
        api = f"{scheme}://127.0.0.1:{http_port}"
        assert httpx2.get(f"{api}/health/ready", verify=verify).status_code == 200
        status = httpx2.get(f"http://127.0.0.1:{ui_port}/status").text
        assert 'id="api-status" data-state="ready"' in status, "the UI reaches the HTTP API"
        assert 'id="grpc-status" data-state="ready"' in status, "the UI reaches the gRPC API"
        if secured:
            channel = grpc.secure_channel(
                f"127.0.0.1:{grpc_port}", grpc.ssl_channel_credentials((tmp_path / "ca.pem").read_bytes())
            )
        else:
            channel = grpc.insecure_channel(f"127.0.0.1:{grpc_port}")
        with channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        # the UI classifies through the API (with the key the stack passed it, when secured)
        page = httpx2.post(
            f"http://127.0.0.1:{ui_port}/",
            files={"file": ("coffee.png", photo_bytes("coffee.png"))},
            timeout=60,
        ).text
        assert "espresso" in page and KEY not in page
        if secured:
            assert httpx2.get(f"{api}/models", verify=verify).status_code == 401
        os.killpg(process.pid, signal.SIGINT)  # what Ctrl-C does
        code = process.wait(timeout=60)
        assert code == 0, f"exit {code}:\n" + "".join(lines) + banner + process.stdout.read()
        deadline = time.monotonic() + 10
        while any(_alive(pid) for pid in children) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(_alive(pid) for pid in children), "orphan service processes"
        rest = process.stdout.read()
        assert "Traceback" not in "".join(lines) + rest
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        process.stdout.close()

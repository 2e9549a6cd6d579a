"""One process serving both protocols over one registry (`VISION_GRPC_SERVE_HTTP=true python -m
grpc_server`, what `make run` starts): every model over HTTP and gRPC, one set of batchers and
metrics, and a shutdown that turns readiness on both protocols first."""

from __future__ import annotations

import re
import signal
import socket
import time
from pathlib import Path

import grpc
import httpx2
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.conftest import photo_bytes
from tests.processes import ServiceProcess
from visionserve.repository import ModelEntry
from visionserve.v1 import inference_pb2 as pb
from visionserve.v1 import inference_pb2_grpc as pb_grpc

pytestmark = [pytest.mark.real_model, pytest.mark.slow]

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _health(target: str) -> int:
    with grpc.insecure_channel(target) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        return int(reply.status)


def _until(condition: object, what: str, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_one_process_serves_both_protocols_and_every_model_then_stops_cleanly(
    real_repository: Path, real_detector: ModelEntry, real_faces: tuple[object, ...]
) -> None:
    http_port, grpc_port = _free_port(), _free_port()
    env = {
        "VISION_MODEL_REPOSITORY": str(real_repository),
        "VISION_GRPC_SERVE_HTTP": "true",
        "VISION_PORT": str(http_port),
        "VISION_GRPC_PORT": str(grpc_port),
        "VISION_GRPC_METRICS_PORT": "0",
        "VISION_SHUTDOWN_DELAY_S": "1",
    }
    served = ServiceProcess("grpc_server", env, re.compile(r"HTTP API \(onnx\) on (http://[\d.:]+)"))
    api, target = served.address, f"127.0.0.1:{grpc_port}"
    try:
        _until(lambda: httpx2.get(f"{api}/health/ready").status_code == 200, "HTTP ready")
        assert _health(target) == SERVING
        models = {m["name"]: m["task"] for m in httpx2.get(f"{api}/models").json()["models"]}
        assert models == {
            "efficientnet_lite0": "classification",
            "yolo11n": "detection",
            "retinaface_mnet025": "detection",
            "mini_xception": "classification",
            "face_expression": "face_expression",
        }
        found = httpx2.post(
            f"{api}/predict/file?model=yolo11n",
            files={"file": photo_bytes("motorcycle_left.png")},
            timeout=60,
        ).json()
        assert found["detections"][0]["label"] == "motorcycle"
        with grpc.insecure_channel(target) as channel:
            reply = pb_grpc.InferenceStub(channel).Predict(
                pb.PredictRequest(image=photo_bytes("coffee.png")), timeout=60
            )
            faces = pb_grpc.InferenceStub(channel).Predict(
                pb.PredictRequest(image=photo_bytes("astronaut.png"), model="face_expression"), timeout=60
            )
        assert reply.prediction == "espresso"
        assert [face.top for face in faces.faces] == ["happiness"]
        # one registry: the HTTP app's metrics count the gRPC call too
        metrics = httpx2.get(f"{api}/metrics").text
        assert re.search(
            r'visionserve_requests_total\{endpoint="/visionserve.v1.Inference/Predict",'
            r'model="efficientnet_lite0",protocol="grpc",status="OK"\} 1.0',
            metrics,
        ), metrics
        served.process.send_signal(signal.SIGTERM)
        # the drain delay: both protocols turn not-ready at once, requests are still answered
        _until(lambda: httpx2.get(f"{api}/health/ready").status_code == 503, "HTTP not ready", 5)
        assert _health(target) == NOT_SERVING
        still = httpx2.post(f"{api}/predict/file", files={"file": photo_bytes("chelsea.png")}, timeout=30)
        assert still.status_code == 200 and still.headers["connection"] == "close"
        assert served.process.wait(timeout=60) == 0
    finally:
        output = served.output()
    assert "Traceback" not in output, output
    assert "stopped" in output

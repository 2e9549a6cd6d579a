"""The API key and TLS on every protocol, against the deployables as users start them.

One HTTP process (`python -m fastapi_onnx`) and one gRPC process (`python -m grpc_server`) serve
the real model with `VISION_API_KEY` and `VISION_TLS_CERT_FILE`/`VISION_TLS_KEY_FILE` set; the
certificate is made here by a throwaway authority (trustme). Each protocol is called with no
key, a wrong key, a key in the wrong scheme and the right key in both accepted forms; health
checks must stay open; the UI must pass its key through to both APIs and never show it.
"""

from __future__ import annotations

import base64
import io
import json
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx2
import pytest
from flask.testing import FlaskClient
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from PIL import Image

from flask_ui.app import create_app as create_ui
from flask_ui.settings import UISettings
from grpc_server.client import main as grpc_client_main
from tests.conftest import DEFAULT_MODEL, photo_bytes
from tests.processes import ServiceProcess
from tests.tls import Tls, make_tls
from visionserve.v1 import inference_pb2 as pb
from visionserve.v1 import inference_pb2_grpc as pb_grpc
from visionserve.v2 import grpc_service_pb2 as v2_pb
from visionserve.v2 import grpc_service_pb2_grpc as v2_pb_grpc

pytestmark = [pytest.mark.real_model, pytest.mark.slow]

KEY = "test-key-0123456789abcdef"
WRONG = "not-the-key-0123456789"
PHOTO = "coffee.png"
LABEL = "espresso"
HTTPS_BANNER = re.compile(r"on (https://127\.0\.0\.1:\d+)")
GRPC_BANNER = re.compile(r" on (127\.0\.0\.1:\d+)\s*$")
METRICS_BANNER = re.compile(r"metrics on (https://127\.0\.0\.1:\d+/metrics)")


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> Tls:
    return make_tls(tmp_path_factory.mktemp("tls"))


def _secured_env(real_repository: Path, tls: Tls) -> dict[str, str]:
    return {
        "VISION_MODEL_REPOSITORY": str(real_repository),
        "VISION_API_KEY": KEY,
        "VISION_TLS_CERT_FILE": str(tls.cert_file),
        "VISION_TLS_KEY_FILE": str(tls.key_file),
        "VISION_PREPROCESS_WORKERS": "1",
    }


@pytest.fixture(scope="module")
def http_url(real_repository: Path, tls: Tls) -> Iterator[str]:
    """`python -m fastapi_onnx` with the key and TLS on; its https:// base URL once ready."""
    server = ServiceProcess(
        "fastapi_onnx", {**_secured_env(real_repository, tls), "VISION_PORT": "0"}, HTTPS_BANNER
    )
    try:
        with httpx2.Client(base_url=server.address, verify=tls.context(), timeout=10) as client:
            for _ in range(1200):
                assert server.process.poll() is None, server.output()
                try:
                    if client.get("/health/ready").status_code == 200:
                        break
                except httpx2.TransportError:
                    pass
                time.sleep(0.1)
            else:
                raise AssertionError("the HTTP API did not become ready")
        yield server.address
    finally:
        server.process.terminate()
        server.output()


@dataclass
class GrpcProcess:
    target: str
    metrics_url: str


@pytest.fixture(scope="module")
def grpc_process(real_repository: Path, tls: Tls) -> Iterator[GrpcProcess]:
    """`python -m grpc_server` with the key and TLS on, once its health check says SERVING."""
    env = {**_secured_env(real_repository, tls), "VISION_GRPC_PORT": "0", "VISION_GRPC_METRICS_PORT": "0"}
    server = ServiceProcess("grpc_server", env, GRPC_BANNER)
    try:
        assert server.process.stdout is not None
        metrics_url = ""
        for line in server.process.stdout:
            server.lines.append(line)
            match = METRICS_BANNER.search(line)
            if match:
                metrics_url = match.group(1)
                break
        assert metrics_url, server.output()
        with grpc.secure_channel(server.address, tls.channel_credentials()) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            for _ in range(1200):
                assert server.process.poll() is None, server.output()
                reply = stub.Check(
                    health_pb2.HealthCheckRequest(service="visionserve.v1.Inference"), timeout=5
                )
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    break
                time.sleep(0.1)
            else:
                raise AssertionError("the gRPC API did not become SERVING")
        yield GrpcProcess(server.address, metrics_url)
    finally:
        server.process.terminate()
        server.output()


@pytest.fixture
def https(http_url: str, tls: Tls) -> Iterator[httpx2.Client]:
    with httpx2.Client(base_url=http_url, verify=tls.context(), timeout=30) as client:
        yield client


# --- HTTP ---------------------------------------------------------------------------------------

V2_MODEL = f"/v2/models/{DEFAULT_MODEL}"
PROTECTED_GETS = ["/", "/models", "/metrics", "/v2", V2_MODEL, f"{V2_MODEL}/config", f"{V2_MODEL}/stats"]
WRONG_CREDENTIALS = {
    "no key": {},
    "wrong bearer": {"Authorization": f"Bearer {WRONG}"},
    "wrong x-api-key": {"X-API-Key": WRONG},
    "another scheme": {"Authorization": f"Basic {KEY}"},
    "empty bearer": {"Authorization": "Bearer"},
    "key with a suffix": {"X-API-Key": KEY + "x"},
    "key's prefix": {"X-API-Key": KEY[:-1]},
}
RIGHT_CREDENTIALS = {"bearer": {"Authorization": f"Bearer {KEY}"}, "x-api-key": {"X-API-Key": KEY}}


def _assert_refused(response: httpx2.Response, path: str) -> str:
    assert response.status_code == 401, (path, response.status_code, response.text)
    assert response.headers["www-authenticate"] == "Bearer"
    body = response.json()
    message = body["error"] if path.startswith("/v2") else body["error"]["message"]
    if not path.startswith("/v2"):
        assert body["error"]["code"] == "unauthenticated"
    assert KEY not in response.text
    return str(message)


@pytest.mark.parametrize("path", ["/health/live", "/health/ready", "/v2/health/live", "/v2/health/ready"])
def test_http_health_checks_need_no_key(https: httpx2.Client, path: str) -> None:
    assert https.get(path).status_code == 200


def test_http_openapi_document_declares_the_key_and_needs_none(https: httpx2.Client) -> None:
    document = https.get("/openapi.json").json()
    assert set(document["components"]["securitySchemes"]) == {"bearer", "apiKey"}
    predict = document["paths"]["/predict/file"]["post"]
    assert predict["security"] == [{"bearer": []}, {"apiKey": []}] and "401" in predict["responses"]
    assert "security" not in document["paths"]["/health/ready"]["get"]
    assert https.get("/docs").status_code == 200


@pytest.mark.parametrize("credentials", list(WRONG_CREDENTIALS))
@pytest.mark.parametrize("path", PROTECTED_GETS)
def test_http_reads_need_the_right_key(https: httpx2.Client, path: str, credentials: str) -> None:
    message = _assert_refused(https.get(path, headers=WRONG_CREDENTIALS[credentials]), path)
    if credentials in ("no key", "another scheme"):
        assert "Authorization: Bearer <key>" in message and "X-API-Key" in message
    else:
        assert message == "the API key is not valid"


@pytest.mark.parametrize("credentials", list(WRONG_CREDENTIALS))
def test_http_inference_needs_the_right_key(https: httpx2.Client, credentials: str) -> None:
    headers = WRONG_CREDENTIALS[credentials]
    image = photo_bytes(PHOTO)
    _assert_refused(
        https.post("/predict/file", files={"file": ("p.png", image)}, headers=headers), "/predict"
    )
    v2 = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["aGk="]}]}
    _assert_refused(https.post(f"{V2_MODEL}/infer", json=v2, headers=headers), f"{V2_MODEL}/infer")


def test_http_refuses_before_reading_the_body(https: httpx2.Client) -> None:
    """No key and a body over the size limit: 401, not 413 (the key is checked first)."""
    response = https.post("/predict", content=b"x" * (21 * 1024 * 1024), headers={"X-API-Key": WRONG})
    assert response.status_code == 401


@pytest.mark.parametrize("credentials", list(RIGHT_CREDENTIALS))
def test_http_right_key_serves_every_endpoint(https: httpx2.Client, credentials: str) -> None:
    headers = RIGHT_CREDENTIALS[credentials]
    image = photo_bytes(PHOTO)
    reply = https.post("/predict/file", files={"file": ("p.png", image)}, headers=headers)
    assert reply.status_code == 200 and reply.json()["prediction"] == LABEL
    reply = https.post("/predict", json={"image": base64.b64encode(image).decode()}, headers=headers)
    assert reply.status_code == 200 and reply.json()["prediction"] == LABEL
    v2 = {
        "inputs": [
            {"name": "image", "datatype": "BYTES", "shape": [1], "data": [base64.b64encode(image).decode()]}
        ],
        "outputs": [{"name": "probabilities", "parameters": {"classification": 1}}],
    }
    reply = https.post(f"{V2_MODEL}/infer", json=v2, headers=headers)
    assert reply.status_code == 200, reply.text
    assert reply.json()["outputs"][0]["data"][0].endswith(f":{LABEL}")
    for path in PROTECTED_GETS:
        assert https.get(path, headers=headers).status_code == 200, path
    assert https.get("/models").status_code == 401
    metrics = https.get("/metrics", headers=headers).text
    assert re.search(
        r'visionserve_requests_total\{endpoint="unmatched",model="",protocol="http",status="401"\} [1-9]',
        metrics,
    )


def test_http_needs_tls_and_a_trusted_certificate(http_url: str) -> None:
    plain = http_url.replace("https://", "http://")
    with pytest.raises(httpx2.TransportError):
        httpx2.get(f"{plain}/health/live", timeout=5)
    with pytest.raises(httpx2.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        httpx2.get(f"{http_url}/health/live", timeout=5)  # the system's authorities do not know it


def test_tritonclient_http_sends_the_key_over_tls(http_url: str, tls: Tls) -> None:
    """An unmodified Open Inference Protocol client reaches the secured API with its own options."""
    import tritonclient.http as triton
    from tritonclient.utils import InferenceServerException

    client = triton.InferenceServerClient(
        http_url.removeprefix("https://"), ssl=True, ssl_options={"ca_certs": str(tls.ca_file)}
    )
    try:
        assert client.is_server_ready()  # health: no key
        with pytest.raises(InferenceServerException, match="API key"):
            client.get_model_metadata(DEFAULT_MODEL)
        metadata = client.get_model_metadata(DEFAULT_MODEL, headers={"Authorization": f"Bearer {KEY}"})
        assert metadata["name"] == DEFAULT_MODEL
    finally:
        client.close()


# --- gRPC ---------------------------------------------------------------------------------------

GRPC_WRONG = {
    "no key": (),
    "wrong bearer": (("authorization", f"Bearer {WRONG}"),),
    "wrong x-api-key": (("x-api-key", WRONG),),
    "another scheme": (("authorization", f"Basic {KEY}"),),
}
GRPC_RIGHT = {"bearer": (("authorization", f"Bearer {KEY}"),), "x-api-key": (("x-api-key", KEY),)}


@pytest.fixture
def channel(grpc_process: GrpcProcess, tls: Tls) -> Iterator[grpc.Channel]:
    with grpc.secure_channel(grpc_process.target, tls.channel_credentials()) as channel:
        yield channel


def _grpc_calls(channel: grpc.Channel) -> dict[str, object]:
    """One call of each kind and service, each a function of the metadata."""
    v1 = pb_grpc.InferenceStub(channel)
    v2 = v2_pb_grpc.GRPCInferenceServiceStub(channel)
    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
    image = photo_bytes(PHOTO)
    v2_request = v2_pb.ModelInferRequest(
        model_name=DEFAULT_MODEL,
        inputs=[v2_pb.ModelInferRequest.InferInputTensor(name="image", datatype="BYTES", shape=[1])],
        raw_input_contents=[len(image).to_bytes(4, "little") + image],
    )
    return {
        "Predict": lambda md: v1.Predict(pb.PredictRequest(image=image, topk=1), metadata=md, timeout=30),
        "PredictBatch": lambda md: v1.PredictBatch(
            pb.PredictBatchRequest(images=[image]), metadata=md, timeout=30
        ),
        "PredictStream": lambda md: list(
            v1.PredictStream(iter([pb.Frame(image=image, frame_id=0, topk=1)]), metadata=md, timeout=30)
        ),
        "ServerLive": lambda md: v2.ServerLive(v2_pb.ServerLiveRequest(), metadata=md, timeout=30),
        "ModelMetadata": lambda md: v2.ModelMetadata(
            v2_pb.ModelMetadataRequest(name=DEFAULT_MODEL), metadata=md, timeout=30
        ),
        "ModelInfer": lambda md: v2.ModelInfer(v2_request, metadata=md, timeout=30),
        "Reflection": lambda md: list(
            reflection.ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]), metadata=md, timeout=30
            )
        ),
    }


def test_grpc_health_needs_no_key(channel: grpc.Channel) -> None:
    stub = health_pb2_grpc.HealthStub(channel)
    for service in ("", "visionserve.v1.Inference", "inference.GRPCInferenceService"):
        reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize("credentials", list(GRPC_WRONG))
def test_grpc_every_service_needs_the_right_key(channel: grpc.Channel, credentials: str) -> None:
    for name, call in _grpc_calls(channel).items():
        with pytest.raises(grpc.RpcError) as caught:
            call(GRPC_WRONG[credentials])  # type: ignore[operator]
        error = caught.value
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED, (name, error)
        expected = "needs an API key" if credentials in ("no key", "another scheme") else "not valid"
        assert expected in error.details(), (name, error.details())
        assert KEY not in error.details()


@pytest.mark.parametrize("credentials", list(GRPC_RIGHT))
def test_grpc_right_key_serves_every_service(channel: grpc.Channel, credentials: str) -> None:
    calls = _grpc_calls(channel)
    metadata = GRPC_RIGHT[credentials]
    assert calls["Predict"](metadata).prediction == LABEL  # type: ignore[operator]
    assert calls["PredictBatch"](metadata).results[0].result.prediction == LABEL  # type: ignore[operator]
    assert calls["PredictStream"](metadata)[0].topk[0].label == LABEL  # type: ignore[operator]
    assert calls["ServerLive"](metadata).live  # type: ignore[operator]
    assert calls["ModelMetadata"](metadata).name == DEFAULT_MODEL  # type: ignore[operator]
    infer = calls["ModelInfer"](metadata)  # type: ignore[operator]
    assert infer.model_name == DEFAULT_MODEL and infer.outputs
    services = calls["Reflection"](metadata)[0].list_services_response.service  # type: ignore[operator]
    assert "visionserve.v1.Inference" in {s.name for s in services}


def test_grpc_needs_tls_and_a_trusted_certificate(grpc_process: GrpcProcess) -> None:
    for channel in (
        grpc.insecure_channel(grpc_process.target),
        grpc.secure_channel(grpc_process.target, grpc.ssl_channel_credentials()),  # system authorities
    ):
        with channel, pytest.raises(grpc.RpcError) as caught:
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


def test_grpc_metrics_endpoint_needs_tls_and_the_key(
    grpc_process: GrpcProcess, tls: Tls, channel: grpc.Channel
) -> None:
    with pytest.raises(grpc.RpcError):
        _grpc_calls(channel)["Predict"](())  # type: ignore[operator]
    with httpx2.Client(verify=tls.context(), timeout=10) as client:
        refused = client.get(grpc_process.metrics_url)
        assert refused.status_code == 401 and refused.headers["www-authenticate"] == "Bearer"
        assert refused.json()["error"]["code"] == "unauthenticated"
        assert client.get(grpc_process.metrics_url, headers={"X-API-Key": WRONG}).status_code == 401
        served = client.get(grpc_process.metrics_url, headers={"Authorization": f"Bearer {KEY}"})
        assert served.status_code == 200
        # refused calls are counted by method and status
        counted = (
            r'endpoint="/visionserve.v1.Inference/Predict",model="efficientnet_lite0",protocol="grpc",'
            r'status="UNAUTHENTICATED"\} [1-9]'
        )
        assert re.search(counted, served.text), served.text


def test_grpc_client_cli_passes_the_key_over_tls(
    grpc_process: GrpcProcess, tls: Tls, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    photo = tmp_path / PHOTO
    photo.write_bytes(photo_bytes(PHOTO))
    target = ["--target", grpc_process.target, "--tls-ca", str(tls.ca_file)]
    assert grpc_client_main([str(photo), *target, "--api-key", KEY]) == 0
    assert LABEL in capsys.readouterr().out
    assert grpc_client_main([str(photo), *target, "--api-key", WRONG]) == 1
    assert "UNAUTHENTICATED" in capsys.readouterr().err


# --- the UI -------------------------------------------------------------------------------------


def _ui(http_url: str, grpc_process: GrpcProcess, tls: Tls, key: str) -> UISettings:
    return UISettings(
        api_url=http_url,
        grpc_target=grpc_process.target,
        api_key=key,  # type: ignore[arg-type]
        grpc_tls=True,
        tls_ca_file=tls.ca_file,
    )


def _gif() -> bytes:
    first = Image.open(io.BytesIO(photo_bytes(PHOTO))).convert("RGB").resize((224, 224))
    frames = [first, first.transpose(Image.Transpose.FLIP_LEFT_RIGHT)]  # (equal frames would merge)
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:], duration=40)
    return buffer.getvalue()


def test_ui_passes_its_key_to_both_apis_and_never_shows_it(
    http_url: str, grpc_process: GrpcProcess, tls: Tls
) -> None:
    app = create_ui(_ui(http_url, grpc_process, tls, KEY))
    client = app.test_client()
    closing = app.extensions["visionserve_ui"]["api"]
    try:
        _check_ui_pages(client)
    finally:
        closing.close()


def _check_ui_pages(client: FlaskClient) -> None:
    pages = []
    reply = client.post("/", data={"file": (io.BytesIO(photo_bytes(PHOTO)), PHOTO)})
    assert reply.status_code == 200 and LABEL in reply.get_data(as_text=True)
    pages.append(reply.get_data(as_text=True))
    reply = client.post("/video", data={"file": (io.BytesIO(_gif()), "clip.gif"), "every": "1"})
    video = reply.get_data(as_text=True)
    assert reply.status_code == 200 and video.count(LABEL) >= 2, video[-2000:]
    pages.append(video)
    status = client.get("/status").get_data(as_text=True)
    assert re.search(r'badge good">\s*ready<', status) and re.search(r'badge good">\s*SERVING<', status), (
        status
    )
    pages.append(status)
    pages += [client.get(path).get_data(as_text=True) for path in ("/", "/video")]
    for page in pages:
        assert KEY not in page


def test_ui_with_a_wrong_key_says_so(http_url: str, grpc_process: GrpcProcess, tls: Tls) -> None:
    app = create_ui(_ui(http_url, grpc_process, tls, WRONG))
    client = app.test_client()
    try:
        _check_ui_refused(client)
    finally:
        app.extensions["visionserve_ui"]["api"].close()


def _check_ui_refused(client: FlaskClient) -> None:
    reply = client.post("/", data={"file": (io.BytesIO(photo_bytes(PHOTO)), PHOTO)})
    page = reply.get_data(as_text=True)
    assert "refused this page&#39;s key" in page or "refused this page's key" in page, page[-3000:]
    assert "VISION_UI_API_KEY" in page and WRONG not in page
    events = client.post(
        "/video",
        data={"file": (io.BytesIO(_gif()), "clip.gif"), "every": "1"},
        headers={"Accept": "application/x-ndjson"},
    ).get_data(as_text=True)
    last = json.loads(events.strip().splitlines()[-1])
    assert last["event"] == "error" and "key" in last["title"], last

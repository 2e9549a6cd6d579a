"""The seed articles' own gRPC services (seed 000 `classify.Classifier`, seed 001 `InferenceServer`,
seed 003 `Pipeline`), called with stubs generated from each seed's .proto text by grpc_tools.protoc,
unmodified, against a real `GrpcServer` on 127.0.0.1 port 0 that also serves visionserve.v1 and V2.

The clients run in a child process (tests/integration/seed_clients.py), once per group of calls:
their messages would collide with the server's copies (visionserve/seeds/) in this process's
protobuf descriptor pool. What each call answered comes back as JSON; the tests below read it.

- protos/seeds/*.proto are the articles' text                     test_protos_are_the_articles_text
- seed 000 on chelsea.png: a cat on top; topk 0 -> 5, topk 3 -> 3   test_classifier_*
- seed 001 on 3 real photos: the own API's top-1, in order          test_inference_server_*
- seed 003 on astronaut.png / coffee.png (when face_expression is
  in the model repository)                                          test_pipeline_*
- bad input on each: the own API's status and message              test_bad_input_*
- NOT_FOUND when the model a seed service runs on is not served     test_*_not_served* (fakes)
- reflection lists the three services; health; metrics; API key    test_reflection_*, test_health_*, ...
"""

from __future__ import annotations

import re
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from grpc_server.seed_services import SEED_SERVICES
from grpc_server.server import GrpcServer
from tests.conftest import DEFAULT_MODEL, ROOT
from tests.fixtures import (
    FakeDetectorRuntime,
    FakeRuntime,
    grpc_server_of,
    write_fake_detector,
    write_fake_entry,
)
from tests.integration.seed_harness import (
    FACE_MODEL,
    PROTOS,
    article_proto,
    face_model_exported,
    fake_calls,
    generate_stubs,
    ok,
    own_api,
    real_calls,
    refused,
    run_clients,
    running,
    target,
    write_inputs,
)
from visionserve.photos import packaged_photo
from visionserve.serving.model import ServedModel
from visionserve.serving.registry import registry_from_settings
from visionserve.settings import GrpcSettings, ModelSettings, SecuritySettings, ServerSettings
from visionserve.v1 import inference_pb2 as v1

SEEDS_DIR = ROOT.parent / "shared" / "seeds"
LIMIT = 2 * 1024 * 1024
"""The real server's VISION_GRPC_MAX_MESSAGE_BYTES: above the three photos of seed 001's call."""
QUEUE = 16
"""The real server's VISION_MAX_QUEUE_SIZE."""
KEY = "seed-clients-test-key-0123456789"
CATS = {"tabby", "tiger cat", "Persian cat", "Siamese cat", "Egyptian cat"}
PHOTOS = ("chelsea.png", "coffee.png", "flower.jpg")


# --- the .proto files ------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", sorted(PROTOS))
def test_protos_are_the_articles_text(seed: str) -> None:
    articles = sorted(SEEDS_DIR.glob(f"{seed}_*.txt"))
    if not articles:
        pytest.skip(f"no seed article {seed}_*.txt in {SEEDS_DIR}")
    expected = article_proto(articles[0].read_text(encoding="utf-8"))
    assert (ROOT / "protos" / "seeds" / PROTOS[seed]).read_text() == expected


@pytest.fixture(scope="module")
def stubs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The seeds' client stubs, generated from protos/seeds/ as their articles do, in a temporary
    folder."""
    return generate_stubs(tmp_path_factory.mktemp("seed_stubs"))


@pytest.fixture(scope="module")
def real_server(real_repository: Path) -> Iterator[GrpcServer]:
    """The real default classifier (and face_expression with its stages, when exported), built
    from the repository as `python -m grpc_server` builds it."""
    server_settings = ServerSettings(preprocess_workers=2, max_queue_size=QUEUE)
    models = None if face_model_exported(real_repository) else DEFAULT_MODEL  # None: every model
    model_settings = ModelSettings(model_repository=real_repository, model_name=DEFAULT_MODEL, models=models)

    def build() -> GrpcServer:
        settings = GrpcSettings(host="127.0.0.1", port=0, metrics_port=0, max_message_bytes=LIMIT)
        return GrpcServer(settings, server_settings, registry_from_settings(model_settings, server_settings))

    with running(build) as server:
        yield server


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Files for the bytes fields: the real photos, and bad input."""
    return write_inputs(tmp_path_factory.mktemp("seed_inputs"), (*PHOTOS, "astronaut.png"), LIMIT)


@pytest.fixture(scope="module")
def seen(
    real_server: GrpcServer,
    real_repository: Path,
    stubs: Path,
    inputs: dict[str, str],
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, dict[str, Any]]:
    """What the seeds' clients answered from the real server."""
    faces = face_model_exported(real_repository)
    calls = real_calls(target(real_server), inputs, PHOTOS, queue=QUEUE, faces=faces)
    return run_clients(stubs, tmp_path_factory.mktemp("seed_calls"), calls)


# --- seed 000: classify.Classifier/Predict -----------------------------------------------------------


@pytest.mark.real_model
def test_classifier_finds_the_cat_and_topk_0_means_5(seen: dict[str, dict[str, Any]]) -> None:
    topk = ok(seen["000_chelsea"])["topk"]
    assert len(topk) == 5
    assert topk[0]["label"] in CATS, topk
    probs = [p["prob"] for p in topk]
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1.0 + 1e-6


@pytest.mark.real_model
def test_classifier_topk_3_matches_the_own_api(
    seen: dict[str, dict[str, Any]], real_server: GrpcServer, inputs: dict[str, str]
) -> None:
    topk = ok(seen["000_topk3"])["topk"]
    own = own_api(real_server, Path(inputs["chelsea.png"]).read_bytes(), topk=3)
    assert isinstance(own, v1.PredictResponse), own
    assert [p["label"] for p in topk] == [p.label for p in own.topk]
    assert [p["prob"] for p in topk] == pytest.approx([p.prob for p in own.topk], abs=1e-6)


@pytest.mark.real_model
@pytest.mark.parametrize(
    ("call", "data", "topk", "fragment"),
    [
        ("000_not_image", "not_image", 0, "image"),
        ("000_empty", "empty", 0, "image"),
        ("000_topk_negative", "chelsea.png", -1, "topk"),
        ("000_topk_above", "chelsea.png", 1001, "topk"),
    ],
)
def test_bad_input_classifier_as_the_own_api(  # noqa: PLR0917 (fixtures and parameters)
    seen: dict[str, dict[str, Any]],
    real_server: GrpcServer,
    inputs: dict[str, str],
    call: str,
    data: str,
    topk: int,
    fragment: str,
) -> None:
    """INVALID_ARGUMENT with the very message the own API's Predict gives for the same input."""
    details = refused(seen[call], "INVALID_ARGUMENT", fragment)
    own = own_api(real_server, Path(inputs[data]).read_bytes(), topk=topk)
    assert isinstance(own, grpc.RpcError), own
    assert own.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
    assert details == own.details()  # type: ignore[attr-defined]


@pytest.mark.real_model
@pytest.mark.parametrize("call", ["000_too_large", "001_too_large", "003_too_large"])
def test_bad_input_message_over_the_limit(seen: dict[str, dict[str, Any]], call: str) -> None:
    refused(
        seen[call], "RESOURCE_EXHAUSTED", f"the limit is {LIMIT:,} bytes", "VISION_GRPC_MAX_MESSAGE_BYTES"
    )


# --- seed 001: InferenceServer/inference ------------------------------------------------------------


@pytest.mark.real_model
def test_inference_server_answers_the_own_apis_top1_in_order(
    seen: dict[str, dict[str, Any]], real_server: GrpcServer
) -> None:
    preds = ok(seen["001_photos"])["pred"]
    expected = []
    for name in PHOTOS:
        own = own_api(real_server, packaged_photo(name).read_bytes(), topk=1)
        assert isinstance(own, v1.PredictResponse), own
        expected.append(own.topk[0].index)
    assert preds == expected
    assert len(set(preds)) == 3  # three different photos, three different classes


@pytest.mark.real_model
def test_bad_input_inference_server(seen: dict[str, dict[str, Any]]) -> None:
    refused(seen["001_no_image"], "INVALID_ARGUMENT", "`image` is empty", "at least one image")
    refused(seen["001_one_bad"], "INVALID_ARGUMENT", "image[1]")
    refused(seen["001_too_many"], "INVALID_ARGUMENT", f"{QUEUE + 1} images", "VISION_MAX_QUEUE_SIZE", "fewer")


# --- seed 003: Pipeline/run_pipeline ---------------------------------------------------------------


def needs_face_model(seen: dict[str, dict[str, Any]]) -> None:
    if "003_astronaut" not in seen:
        pytest.skip(f"no {FACE_MODEL} model in the model repository yet (export it to run this test)")


@pytest.mark.real_model
def test_pipeline_finds_the_astronauts_happy_face(seen: dict[str, dict[str, Any]]) -> None:
    needs_face_model(seen)
    (result,) = ok(seen["003_astronaut"])["response"]
    box = result["bbox"]
    # her head, in the 512x512 photo: x about 150-260, y about 40-200 (the detector's box takes in
    # some hair: x2 was 273); the box covers her face (eyes to mouth: x 195-250, y 90-150)
    assert 130 <= box["x1"] <= 195 and 250 <= box["x2"] <= 290, box
    assert 20 <= box["y1"] <= 90 and 150 <= box["y2"] <= 220, box
    expression = result["expression"]
    assert set(expression) == {"neutral", "anger", "disgust", "fear", "happiness", "sadness", "surprise"}
    assert max(expression, key=expression.__getitem__) == "happiness", expression


@pytest.mark.real_model
def test_pipeline_answers_no_face_with_an_empty_response(seen: dict[str, dict[str, Any]]) -> None:
    needs_face_model(seen)
    assert ok(seen["003_coffee"]) == {"response": []}


@pytest.mark.real_model
@pytest.mark.parametrize(("call", "data"), [("003_not_image", "not_image"), ("003_empty", "empty")])
def test_bad_input_pipeline_as_the_own_api(
    seen: dict[str, dict[str, Any]], real_server: GrpcServer, inputs: dict[str, str], call: str, data: str
) -> None:
    needs_face_model(seen)
    details = refused(seen[call], "INVALID_ARGUMENT", "image")
    own = own_api(real_server, Path(inputs[data]).read_bytes(), model=FACE_MODEL)
    assert isinstance(own, grpc.RpcError), own
    assert details == own.details()  # type: ignore[attr-defined]


# --- fake models: model lookup, API key, reflection, health, metrics --------------------------------


@pytest.fixture(scope="module")
def fake_servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[GrpcServer, GrpcServer]]:
    """(a server with the API key whose default model is a detector and whose second is a
    classifier, a server with a detector alone); neither serves face_expression."""
    repository = tmp_path_factory.mktemp("seed_repository")
    detector, classifier = write_fake_detector(repository), write_fake_entry(repository)
    settings = GrpcSettings(host="127.0.0.1", port=0, metrics_port=0)
    security = SecuritySettings(api_key=KEY, tls_cert_file=None, tls_key_file=None)  # type: ignore[arg-type]
    server_settings = ServerSettings(preprocess_workers=1)

    def with_key() -> GrpcServer:
        detector_runtime = FakeDetectorRuntime(detector)
        return grpc_server_of(
            settings, server_settings, detector_runtime, FakeRuntime(classifier), security=security
        )

    with (
        running(with_key) as keyed,
        running(
            lambda: grpc_server_of(settings, server_settings, FakeDetectorRuntime(detector))
        ) as detector_only,
    ):
        yield keyed, detector_only


@pytest.fixture(scope="module")
def fake_seen(
    fake_servers: tuple[GrpcServer, GrpcServer],
    stubs: Path,
    inputs: dict[str, str],
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, dict[str, Any]]:
    """What the seeds' clients answered from the fake servers."""
    keyed, detector_only = (target(server) for server in fake_servers)
    calls = fake_calls(keyed, detector_only, inputs["chelsea.png"], key=KEY)
    return run_clients(stubs, tmp_path_factory.mktemp("seed_fake_calls"), calls)


def test_classifier_falls_back_to_the_first_classification_model(
    fake_servers: tuple[GrpcServer, GrpcServer], fake_seen: dict[str, dict[str, Any]]
) -> None:
    """The default model is a detector: seed 000 and 001 use the classifier served beside it; seed
    001's images are computed as one batch."""
    assert [p["label"] for p in ok(fake_seen["000_key"])["topk"]] == [f"class_{i}" for i in range(9, 4, -1)]
    assert [p["label"] for p in ok(fake_seen["000_x_api_key"])["topk"]] == ["class_9", "class_8"]
    assert ok(fake_seen["001_key"]) == {"pred": [9, 9]}
    classifier = fake_servers[0].registry.get("fake")
    assert isinstance(classifier, ServedModel) and isinstance(classifier.runtime, FakeRuntime)
    runtime = classifier.runtime
    assert (2, 3, 32, 32) in runtime.batches, runtime.batches


def test_classifier_not_served(fake_seen: dict[str, dict[str, Any]]) -> None:
    for call in ("000_no_classifier", "001_no_classifier"):
        refused(
            fake_seen[call], "NOT_FOUND", "classification model", "'fakedet' (detection)", "VISION_MODELS"
        )


def test_pipeline_not_served_says_how_to_serve_it(fake_seen: dict[str, dict[str, Any]]) -> None:
    refused(fake_seen["003_key"], "NOT_FOUND", f"model {FACE_MODEL!r}", "'fakedet', 'fake'", "VISION_MODELS")


def test_api_key_applies_to_the_seed_services(fake_seen: dict[str, dict[str, Any]]) -> None:
    for call in ("000_no_key", "000_wrong_key", "001_no_key", "003_no_key"):
        refused(fake_seen[call], "UNAUTHENTICATED")


def test_reflection_lists_and_describes_the_three_services(
    fake_servers: tuple[GrpcServer, GrpcServer],
) -> None:
    keyed, _ = fake_servers
    assert set(SEED_SERVICES) == {"classify.Classifier", "InferenceServer", "Pipeline"}
    requests = [reflection_pb2.ServerReflectionRequest(list_services="")] + [
        reflection_pb2.ServerReflectionRequest(file_containing_symbol=name) for name in SEED_SERVICES
    ]
    with grpc.insecure_channel(target(keyed)) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        listed, *described = stub.ServerReflectionInfo(
            iter(requests), metadata=(("authorization", f"Bearer {KEY}"),), timeout=30
        )
    names = {service.name for service in listed.list_services_response.service}
    assert set(SEED_SERVICES) | {"visionserve.v1.Inference", "inference.GRPCInferenceService"} <= names
    for name, answer in zip(SEED_SERVICES, described, strict=True):
        files = [
            descriptor_pb2.FileDescriptorProto.FromString(raw)
            for raw in answer.file_descriptor_response.file_descriptor_proto
        ]
        services = {f"{f.package}.{s.name}".lstrip(".") for f in files for s in f.service}
        assert name in services, (name, services)


@pytest.mark.parametrize(
    ("method", "message"),
    [
        ("/classify.Classifier/Predict", "classify.ImageRequest"),
        ("/InferenceServer/inference", "InferenceRequest"),
        ("/Pipeline/run_pipeline", "Request"),
    ],
)
def test_bad_input_bytes_that_do_not_parse(
    fake_servers: tuple[GrpcServer, GrpcServer], method: str, message: str
) -> None:
    """A request that is not the seed's message: INVALID_ARGUMENT naming it, as on every method."""
    keyed, _ = fake_servers
    with grpc.insecure_channel(target(keyed)) as channel:
        call = channel.unary_unary(method)  # raw bytes in and out
        with pytest.raises(grpc.RpcError) as info:
            call(b"\xff\xff\xff\xff not a protobuf message", metadata=(("x-api-key", KEY),), timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
    assert f"the request is not a valid {message} message" in info.value.details()  # type: ignore[attr-defined]


def test_health_serves_the_seed_services_whose_model_is_served(
    fake_servers: tuple[GrpcServer, GrpcServer],
) -> None:
    keyed, detector_only = fake_servers
    serving = health_pb2.HealthCheckResponse.SERVING
    with grpc.insecure_channel(target(keyed)) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for name in ("classify.Classifier", "InferenceServer"):
            assert health.Check(health_pb2.HealthCheckRequest(service=name), timeout=10).status == serving
        with pytest.raises(grpc.RpcError) as info:  # face_expression is not served
            health.Check(health_pb2.HealthCheckRequest(service="Pipeline"), timeout=10)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND  # type: ignore[attr-defined]
    with grpc.insecure_channel(target(detector_only)) as channel, pytest.raises(grpc.RpcError) as info:
        health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="classify.Classifier"), timeout=10
        )
    assert info.value.code() == grpc.StatusCode.NOT_FOUND  # type: ignore[attr-defined]


def test_metrics_count_the_seed_calls(
    fake_servers: tuple[GrpcServer, GrpcServer], fake_seen: dict[str, dict[str, Any]]
) -> None:
    _, detector_only = fake_servers
    url = f"http://127.0.0.1:{detector_only.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as reply:
        text = reply.read().decode()
    for method in ("/classify.Classifier/Predict", "/InferenceServer/inference"):
        assert re.search(
            rf'visionserve_requests_total\{{[^}}]*endpoint="{re.escape(method)}"[^}}]*\}} 1\.0', text
        ), f"no count of {method} in the metrics"


@pytest.mark.real_model
def test_metrics_label_each_seed_call_with_its_model(
    real_server: GrpcServer, real_repository: Path, seen: dict[str, dict[str, Any]]
) -> None:
    """The seeds' messages name no model; the metrics say which one ran each call."""
    url = f"http://127.0.0.1:{real_server.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as reply:
        text = reply.read().decode()
    expected = {"/classify.Classifier/Predict": DEFAULT_MODEL, "/InferenceServer/inference": DEFAULT_MODEL}
    if face_model_exported(real_repository):
        expected["/Pipeline/run_pipeline"] = "face_expression"
    for method, model in expected.items():
        pattern = rf'visionserve_requests_total\{{[^}}]*endpoint="{re.escape(method)}"[^}}]*model="{model}"'
        assert re.search(pattern, text), f"{method} is not labelled {model!r}"

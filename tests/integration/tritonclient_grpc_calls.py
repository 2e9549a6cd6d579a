"""Calls an unmodified tritonclient.grpc makes against a V2 gRPC server; run as a child process by
tests/integration/test_v2_tritonclient_grpc.py, printing what it saw as JSON.

NOTE: a separate process because tritonclient.grpc and visionserve's own V2 stubs cannot be
imported into one process: both register the protocol's messages (`inference.ModelInferRequest`,
...) in protobuf's default descriptor pool, and the second registration fails ("duplicate
symbol"). The test process holds the server and its stubs; this one holds only the client.

    python -m tests.integration.tritonclient_grpc_calls HOST:PORT MODEL CALLS.json
CALLS.json: {"photos": {name: path}, "tensor": path of an .npy (N, 3, H, W) float32}
"""

from __future__ import annotations

import json
import queue
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException


def top5(row: np.ndarray) -> dict[str, list[float] | list[int]]:
    order = np.argsort(-row, kind="stable")[:5]
    return {"index": [int(i) for i in order], "prob": [float(row[i]) for i in order]}


def images_input(images: list[bytes]) -> grpcclient.InferInput:
    tensor = grpcclient.InferInput("image", [len(images)], "BYTES")
    tensor.set_data_from_numpy(np.array(images, dtype=np.object_))
    return tensor


def tensor_input(batch: np.ndarray) -> grpcclient.InferInput:
    tensor = grpcclient.InferInput("input", list(batch.shape), "FP32")
    tensor.set_data_from_numpy(batch)
    return tensor


def error_of(call: Callable[[], object]) -> dict[str, str] | None:
    try:
        call()
    except InferenceServerException as exc:
        return {"status": str(exc.status()), "message": str(exc.message())}
    return None


def bad_requests(
    client: grpcclient.InferenceServerClient, model: str, batch: np.ndarray, photo: bytes
) -> dict:
    """Each bad request a user can make with the client's public API, and what the server said."""

    def reshaped(shape: list[int], data: np.ndarray = batch[:1]) -> list[grpcclient.InferInput]:
        tensor = tensor_input(data)
        tensor.set_shape(shape)
        return [tensor]

    def named(name: str, datatype: str = "FP32", data: np.ndarray = batch[:1]) -> list[grpcclient.InferInput]:
        tensor = grpcclient.InferInput(name, list(data.shape), datatype)
        tensor.set_data_from_numpy(data)
        return [tensor]

    cases: dict[str, Callable[[], list[grpcclient.InferInput]]] = {
        "unknown input name": lambda: named("pixels"),
        "wrong datatype": lambda: named("input", "FP16", batch[:1].astype(np.float16)),
        "wrong rank": lambda: reshaped([3, 224, 224]),
        "fewer bytes than the shape": lambda: reshaped([2, 3, 224, 224]),
        "more bytes than the shape": lambda: reshaped([1, 3, 224, 224], np.concatenate([batch[:1]] * 2)),
        "negative dimension": lambda: reshaped([-1, 3, 224, 224]),
        "huge dimension": lambda: reshaped([1, 3, 224, 2**40]),
        "batch above max_batch_size": lambda: [images_input([photo] * 33)],
        "two inputs": lambda: [*named("input"), images_input([photo])],
        "bytes that are not an image": lambda: [images_input([photo, b"GIF89a not really"])],
    }
    errors = {name: error_of(lambda make=make: client.infer(model, make())) for name, make in cases.items()}
    errors["unknown model"] = error_of(lambda: client.infer("resnet50", [images_input([photo])]))
    errors["classification out of range"] = error_of(
        lambda: client.infer(
            model,
            [images_input([photo])],
            outputs=[grpcclient.InferRequestedOutput("probabilities", class_count=1001)],
        )
    )
    errors["metadata of an unknown model"] = error_of(lambda: client.get_model_metadata("resnet50"))
    return errors


def stream(client: grpcclient.InferenceServerClient, model: str, photos: list[bytes]) -> list[dict[str, Any]]:
    """stream_infer: every photo, with a request that is not an image in the middle."""
    answers: queue.Queue[tuple[Any, Any]] = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    requests = [*photos, b"not an image", *photos]
    for i, image in enumerate(requests):
        client.async_stream_infer(model, [images_input([image])], request_id=str(i))
    seen = []
    for _ in requests:
        result, error = answers.get(timeout=60)
        if error is not None:
            seen.append({"error": str(error.message())})
        else:
            seen.append({"id": result.get_response().id, **top5(result.as_numpy("probabilities")[0])})
    client.stop_stream()
    return seen


def main(target: str, model: str, calls_path: str) -> dict[str, Any]:
    calls = json.loads(Path(calls_path).read_text())
    photos = {name: Path(path).read_bytes() for name, path in calls["photos"].items()}
    names = list(photos)
    batch = np.load(calls["tensor"])
    client = grpcclient.InferenceServerClient(target)
    out: dict[str, Any] = {
        "live": client.is_server_live(),
        "ready": client.is_server_ready(),
        "model_ready": client.is_model_ready(model),
        "model_ready_versions": [client.is_model_ready(model, "1"), client.is_model_ready(model, "2")],
        "unknown_model_ready": client.is_model_ready("resnet50"),
        "server_metadata": client.get_server_metadata(as_json=True),
        "model_metadata": client.get_model_metadata(model, as_json=True),
        "model_config": client.get_model_config(model, as_json=True),
    }
    result = client.infer(model, [images_input(list(photos.values()))], request_id="photos")
    logits, probabilities = result.as_numpy("logits"), result.as_numpy("probabilities")
    out["images"] = {
        "id": result.get_response().id,
        "shapes": [list(logits.shape), list(probabilities.shape)],
        "logits_argmax": [int(i) for i in logits.argmax(axis=1)],
        "top5": dict(zip(names, (top5(row) for row in probabilities), strict=True)),
    }
    result = client.infer(
        model, [tensor_input(batch)], outputs=[grpcclient.InferRequestedOutput("probabilities")]
    )
    out["tensor"] = [top5(row) for row in result.as_numpy("probabilities")]
    result = client.infer(
        model,
        [images_input(list(photos.values()))],
        outputs=[grpcclient.InferRequestedOutput("probabilities", class_count=5)],
    )
    classes = result.as_numpy("probabilities")
    out["classification"] = dict(zip(names, ([e.decode() for e in row] for row in classes), strict=True))
    done: queue.Queue[tuple[Any, Any]] = queue.Queue()
    for i, name in enumerate(names * 2):
        client.async_infer(
            model,
            [images_input([photos[name]])],
            callback=lambda result, error, name=name: done.put((name, result, error)),
            request_id=str(i),
        )
    out["async"] = []
    for _ in range(2 * len(names)):
        name, result, error = done.get(timeout=60)
        out["async"].append(
            {"name": name, "error": error and str(error), **top5(result.as_numpy("probabilities")[0])}
        )
    out["stream"] = stream(client, model, list(photos.values()))
    out["errors"] = bad_requests(client, model, batch, photos[names[0]])
    out["statistics"] = client.get_inference_statistics(model, as_json=True)
    client.close()
    return out


if __name__ == "__main__":
    print(json.dumps(main(*sys.argv[1:4])))

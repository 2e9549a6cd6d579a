"""What tests/integration/test_seed_services.py runs its seed clients and servers with: the seeds'
.proto text as their articles show it, the clients' stubs generated from protos/seeds/, a child
process making the calls (tests/integration/seed_clients.py), and a `GrpcServer` on a loop thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc

from grpc_server.server import GrpcServer
from tests.conftest import ROOT
from visionserve.photos import packaged_photo
from visionserve.v1 import inference_pb2 as v1
from visionserve.v1 import inference_pb2_grpc as v1_grpc

FACE_MODEL = "face_expression"
PROTOS = {"000": "classify.proto", "001": "inference.proto", "003": "protobuf.proto"}
"""Each seed's .proto, under protos/seeds/ (named as in its article)."""


def article_proto(article: str) -> str:
    """The .proto an article shows, its elisions resolved: its proto code blocks in order, the
    lines up to a `...` line dropped (in seed 001, "the rest of the file as above"), joined by one
    blank line; `syntax = "proto3";` first when no block declares a syntax (seed 003 shows only its
    messages and service, and protoc would read them as proto2, where they do not compile)."""
    blocks = []
    for language, body in re.findall(r"^```(\w*)\n(.*?)^```", article, flags=re.S | re.M):
        if language == "python" or not re.search(r"^(message|service) ", body, flags=re.M):
            continue
        lines = body.splitlines()
        if "..." in lines:
            lines = lines[lines.index("...") + 1 :]
        blocks.append("\n".join(lines).strip("\n") + "\n")
    text = "\n".join(blocks)
    if not re.search(r"^syntax = ", text, flags=re.M):
        text = 'syntax = "proto3";\n\n' + text
    return text


def generate_stubs(out: Path) -> Path:
    """The seeds' client stubs, generated into `out` as their articles do (`python -m
    grpc_tools.protoc -I . --python_out=. --grpc_python_out=. inference.proto`)."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            "-I.",
            f"--python_out={out}",
            f"--grpc_python_out={out}",
            *PROTOS.values(),
        ],
        cwd=ROOT / "protos" / "seeds",
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, f"protoc failed:\n{result.stdout}{result.stderr}"
    return out


def run_clients(stubs: Path, folder: Path, calls: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Make `calls` from a child process with the generated stubs; what each answered, by name."""
    calls_file = folder / "calls.json"
    calls_file.write_text(json.dumps(calls))
    result = subprocess.run(
        [sys.executable, "-m", "tests.integration.seed_clients", str(stubs), str(calls_file)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert result.returncode == 0, f"the seed clients failed:\n{result.stdout}{result.stderr}"
    answers: dict[str, dict[str, Any]] = json.loads(result.stdout)
    return answers


@contextlib.contextmanager
def running(build: Callable[[], GrpcServer]) -> Iterator[GrpcServer]:
    """The server `build` makes, started on its own event loop in a thread; yields once every
    model is ready (the clients here call it synchronously, from other processes or threads)."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="grpc-loop", daemon=True)
    thread.start()

    async def start() -> GrpcServer:
        server = build()  # NOTE: built on its loop: grpc.aio binds a server to the loop it is made on
        await server.start()
        assert server.loaded is not None
        await server.loaded
        return server

    server: GrpcServer | None = None
    try:
        server = asyncio.run_coroutine_threadsafe(start(), loop).result(timeout=300)
        yield server
    finally:
        if server is not None:
            asyncio.run_coroutine_threadsafe(server.stop(grace_s=1), loop).result(timeout=60)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=30)
        loop.close()


def target(server: GrpcServer) -> str:
    """`127.0.0.1:PORT` of a started server."""
    return f"127.0.0.1:{server.port}"


def face_model_exported(repository: Path) -> bool:
    """Whether the repository holds the face_expression model."""
    return (repository / FACE_MODEL / "config.json").is_file()


def write_inputs(folder: Path, photos: Sequence[str], limit: int) -> dict[str, str]:
    """Files for the clients' bytes fields, by name: the real `photos`, and bad input (`too_large`:
    over `limit`, the server's VISION_GRPC_MAX_MESSAGE_BYTES, and under twice it, so that the
    servicer, not gRPC core, answers)."""
    files = {name: str(packaged_photo(name)) for name in photos}
    for name, data in {
        "not_image": b"this is a text file, not an image",
        "empty": b"",
        "too_large": b"\x00" * (limit + 1024 * 1024),
        "tiny": b"x",
    }.items():
        (folder / name).write_bytes(data)
        files[name] = str(folder / name)
    return files


def own_api(
    server: GrpcServer, image: bytes, topk: int = 0, model: str = ""
) -> v1.PredictResponse | grpc.RpcError:
    """visionserve.v1 Predict on the same server: its answer, or its error."""
    with grpc.insecure_channel(target(server)) as channel:
        try:
            return v1_grpc.InferenceStub(channel).Predict(  # type: ignore[no-untyped-call]
                v1.PredictRequest(image=image, topk=topk, model=model), timeout=60
            )
        except grpc.RpcError as error:
            return error


def ok(answer: dict[str, Any]) -> dict[str, Any]:
    """The response of a call that succeeded."""
    assert answer["code"] == "OK", answer
    response: dict[str, Any] = answer["response"]
    return response


def refused(answer: dict[str, Any], code: str, *fragments: str) -> str:
    """The call failed with `code` and a message with every fragment, and nothing internal."""
    assert answer["code"] == code, answer
    details: str = answer["details"]
    assert details.strip() and "Traceback" not in details, details
    for fragment in fragments:
        assert fragment in details, f"{fragment!r} not in {details!r}"
    return details


# --- the calls -----------------------------------------------------------------------------------------


def call(
    name: str, seed: str, target: str, request: dict[str, Any], metadata: Sequence[Any] = ()
) -> dict[str, Any]:
    """One call for tests/integration/seed_clients.py (bytes fields: file paths)."""
    return {"name": name, "seed": seed, "target": target, "request": request, "metadata": list(metadata)}


def real_calls(
    at: str, inputs: dict[str, str], photos: Sequence[str], *, queue: int, faces: bool
) -> list[dict[str, Any]]:
    """The calls on the real server: good and bad input on each seed (`queue`: the server's
    VISION_MAX_QUEUE_SIZE; `faces`: whether it serves face_expression)."""
    chelsea, coffee = inputs["chelsea.png"], inputs["coffee.png"]
    calls = [
        call("000_chelsea", "000", at, {"image": chelsea}),
        call("000_topk3", "000", at, {"image": chelsea, "topk": 3}),
        call("000_not_image", "000", at, {"image": inputs["not_image"]}),
        call("000_empty", "000", at, {"image": inputs["empty"]}),
        call("000_topk_negative", "000", at, {"image": chelsea, "topk": -1}),
        call("000_topk_above", "000", at, {"image": chelsea, "topk": 1001}),
        call("000_too_large", "000", at, {"image": inputs["too_large"]}),
        call("001_photos", "001", at, {"image": [inputs[name] for name in photos]}),
        call("001_no_image", "001", at, {"image": []}),
        call("001_one_bad", "001", at, {"image": [chelsea, inputs["not_image"], coffee]}),
        call("001_too_many", "001", at, {"image": [inputs["tiny"]] * (queue + 1)}),
        call("001_too_large", "001", at, {"image": [inputs["too_large"]]}),
        call("003_too_large", "003", at, {"image": inputs["too_large"]}),
    ]
    if not faces:
        return calls
    return [
        *calls,
        call("003_astronaut", "003", at, {"image": inputs["astronaut.png"]}),
        call("003_coffee", "003", at, {"image": coffee}),
        call("003_not_image", "003", at, {"image": inputs["not_image"]}),
        call("003_empty", "003", at, {"image": inputs["empty"]}),
    ]


def fake_calls(keyed: str, detector_only: str, photo: str, *, key: str) -> list[dict[str, Any]]:
    """The calls on the fake servers: `keyed` (API key `key`; a detector, then a classifier) and
    `detector_only`."""
    bearer = [["authorization", f"Bearer {key}"]]
    wrong = [["authorization", "Bearer not-the-key-at-all-0000"]]
    return [
        call("000_key", "000", keyed, {"image": photo}, bearer),
        call("000_x_api_key", "000", keyed, {"image": photo, "topk": 2}, [["x-api-key", key]]),
        call("001_key", "001", keyed, {"image": [photo, photo]}, bearer),
        call("003_key", "003", keyed, {"image": photo}, bearer),
        call("000_no_key", "000", keyed, {"image": photo}),
        call("000_wrong_key", "000", keyed, {"image": photo}, wrong),
        call("001_no_key", "001", keyed, {"image": [photo]}),
        call("003_no_key", "003", keyed, {"image": photo}),
        call("000_no_classifier", "000", detector_only, {"image": photo}),
        call("001_no_classifier", "001", detector_only, {"image": [photo]}),
    ]

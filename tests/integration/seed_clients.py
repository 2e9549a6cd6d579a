"""The seed articles' own clients: stubs generated from protos/seeds/*.proto with grpc_tools.protoc,
unmodified, calling a server; run as a child process by tests/integration/test_seed_services.py,
printing what each call answered as JSON.

    python -m tests.integration.seed_clients STUBS_DIR CALLS_JSON

A child process because the seeds' messages (`classify.ImageRequest`, and seeds 001 and 003's
package-less `InferenceRequest`, `Request`, ...) would collide in protobuf's default descriptor pool
("duplicate symbol") with the server's copies (visionserve/seeds/) in the test's process. The three
seeds' stubs do not collide with each other, so one child runs calls on all three.

CALLS_JSON is a list of calls: `{"name", "seed": "000" | "001" | "003", "target": "HOST:PORT",
"request": {field: value}, "metadata": [[key, value], ...]}`, where a bytes field's value is a file
path (a list of paths for a `repeated bytes`). Each call's answer is `{"code": "OK", "response":
{...}}` (the response as JSON, field names as in the .proto) or `{"code": "<status>", "details"}`.
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import json_format

SEEDS = {
    # seed: (the module protoc writes, the stub class, the method, the request message)
    "000": ("classify", "ClassifierStub", "Predict", "ImageRequest"),
    "001": ("inference", "InferenceServerStub", "inference", "InferenceRequest"),
    "003": ("protobuf", "PipelineStub", "run_pipeline", "Request"),
}
BYTES_FIELDS = ("image",)


def _request_fields(request: dict[str, Any]) -> dict[str, Any]:
    """File paths -> their bytes for the bytes fields; other fields as they are."""
    fields = dict(request)
    for name in BYTES_FIELDS:
        value = fields.get(name)
        if isinstance(value, list):
            fields[name] = [Path(path).read_bytes() for path in value]
        elif isinstance(value, str):
            fields[name] = Path(value).read_bytes()
    return fields


def call(spec: dict[str, Any]) -> dict[str, Any]:
    """One call, as a seed's reader makes it: the generated stub on an insecure channel."""
    module, stub_name, method, request_name = SEEDS[spec["seed"]]
    messages = importlib.import_module(f"{module}_pb2")
    services = importlib.import_module(f"{module}_pb2_grpc")
    request = getattr(messages, request_name)(**_request_fields(spec.get("request", {})))
    metadata = [tuple(pair) for pair in spec.get("metadata", [])] or None
    options = [("grpc.max_send_message_length", 64 * 1024 * 1024)]
    with grpc.insecure_channel(spec["target"], options=options) as channel:
        stub = getattr(services, stub_name)(channel)
        try:
            response = getattr(stub, method)(request, metadata=metadata, timeout=spec.get("timeout", 120))
        except grpc.RpcError as error:
            return {"code": error.code().name, "details": error.details()}  # type: ignore[attr-defined]
    answer = json_format.MessageToDict(
        response, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    return {"code": "OK", "response": answer}


def main(stubs: str, calls_file: str) -> dict[str, dict[str, Any]]:
    """Every call of `calls_file`, by name."""
    sys.path.insert(0, stubs)
    calls = json.loads(Path(calls_file).read_text())
    return {spec["name"]: call(spec) for spec in calls}


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], sys.argv[2])))

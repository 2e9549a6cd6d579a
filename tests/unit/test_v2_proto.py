"""protos/inference/grpc_service.proto is wire-compatible with the published protocol: every message,
field, enum value and method it declares has the name, number, type and cardinality that
tritonclient's own compiled descriptors (Triton's grpc_service.proto and model_config.proto) give it.

tritonclient's descriptors are read in a child process: its stubs and ours register the same
`inference.*` names in protobuf's default descriptor pool, so they cannot load into one process.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from typing import Any

import pytest
from google.protobuf.descriptor import Descriptor, EnumDescriptor, FileDescriptor

from tests.conftest import ROOT

_DUMP = textwrap.dedent(
    """
    import json
    from tritonclient.grpc import model_config_pb2, service_pb2
    from tests.unit.test_v2_proto import describe
    out = {}
    for module in (service_pb2, model_config_pb2):
        out.update(describe(module.DESCRIPTOR))
    print(json.dumps(out))
    """
)


def _field_type(field: Any) -> str:
    if field.message_type is not None:
        return field.message_type.full_name
    if field.enum_type is not None:
        return field.enum_type.full_name
    return str(field.type)


def _message(message: Descriptor, out: dict[str, Any]) -> None:
    out[message.full_name] = {
        field.name: [field.number, _field_type(field), field.is_repeated] for field in message.fields
    }
    for nested in message.nested_types:
        _message(nested, out)
    for enum in message.enum_types:
        _enum(enum, out)


def _enum(enum: EnumDescriptor, out: dict[str, Any]) -> None:
    out[enum.full_name] = {value.name: value.number for value in enum.values}


def describe(file: FileDescriptor) -> dict[str, Any]:
    """Every message, enum and method of a compiled .proto, by full name, as plain JSON."""
    out: dict[str, Any] = {}
    for message in file.message_types_by_name.values():
        _message(message, out)
    for enum in file.enum_types_by_name.values():
        _enum(enum, out)
    for service in file.services_by_name.values():
        for method in service.methods:
            out[method.full_name] = [
                method.input_type.full_name,
                method.output_type.full_name,
                method.client_streaming,
                method.server_streaming,
            ]
    return out


@pytest.fixture(scope="module")
def published() -> dict[str, Any]:
    result = subprocess.run(
        [sys.executable, "-c", _DUMP], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    described: dict[str, Any] = json.loads(result.stdout)
    return described


def ours() -> tuple[FileDescriptor, dict[str, Any]]:
    # NOTE: imported here, not at the top: the child process imports this module for `describe`
    # beside tritonclient's stubs, and must not load ours.
    from visionserve.v2 import grpc_service_pb2

    return grpc_service_pb2.DESCRIPTOR, describe(grpc_service_pb2.DESCRIPTOR)


def test_every_declaration_is_the_published_one(published: dict[str, Any]) -> None:
    _, declared = ours()
    problems = []
    for name, value in declared.items():
        if name not in published:
            problems.append(f"{name} is not in the published protocol")
        elif isinstance(value, dict):  # a message's fields or an enum's values: ours are a subset
            for key, item in value.items():
                if key not in published[name]:
                    problems.append(f"{name}.{key} is not in the published protocol")
                elif item != published[name][key]:
                    problems.append(f"{name}.{key}: ours {item}, published {published[name][key]}")
        elif value != published[name]:
            problems.append(f"{name}: ours {value}, published {published[name]}")
    assert not problems, "\n".join(problems)
    assert len(declared) > 40  # every message, enum and method was compared


def test_the_service_and_its_methods_are_the_protocol_s() -> None:
    file, _ = ours()
    service = file.services_by_name["GRPCInferenceService"]
    assert service.full_name == "inference.GRPCInferenceService"
    assert [m.name for m in service.methods] == [
        "ServerLive",
        "ServerReady",
        "ModelReady",
        "ServerMetadata",
        "ModelMetadata",
        "ModelInfer",
        "ModelStreamInfer",
        "ModelConfig",
        "ModelStatistics",
        "RepositoryIndex",
    ]

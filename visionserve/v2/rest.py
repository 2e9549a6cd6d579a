"""The Open Inference Protocol's HTTP body: JSON tensors, the binary tensor extension, compression.

Framework-free (bytes and headers in, bytes and headers out), so that every rule is unit-tested
without a server; `visionserve.v2.http` wires it to FastAPI.

A request body is a JSON header, optionally followed by binary tensor data: the
`Inference-Header-Content-Length` header says where the JSON ends, and each input sent in binary
says its size in its `binary_data_size` parameter, in the order of `inputs`. The binary part must
hold exactly what the inputs declare: a byte more or less is an error, never shifted onto a
neighbour.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from visionserve.deadlines import microseconds_parameter
from visionserve.errors import ErrorCode, VisionError
from visionserve.v2.codec import InputTensor, ModelInput, invalid, parse_inputs, task_parameters
from visionserve.v2.outputs import (
    OutputTensor,
    RequestedOutput,
    check_output_count,
    check_outputs,
    default_outputs,
    requested_output,
)
from visionserve.v2.signature import Signature

HEADER_LENGTH = "Inference-Header-Content-Length"
"""Request and response header: the JSON part's length when binary data follows it."""

SIZE_SETTING = "VISION_MAX_REQUEST_BYTES"
_GZIP_WBITS = 31
_WBITS = {"gzip": (_GZIP_WBITS,), "x-gzip": (_GZIP_WBITS,), "deflate": (15, -15)}  # deflate: zlib, else raw


@dataclass(frozen=True)
class InferRequest:
    """A checked inference request: what to compute, and how to answer."""

    id: str | None
    model_input: ModelInput
    outputs: list[RequestedOutput]
    binary_output: bool
    """Request parameter `binary_data_output`: outputs are binary unless one says otherwise."""
    timeout_s: float | None
    """Request parameter `timeout` (microseconds, as Triton's clients send it), in seconds."""
    parameters: Mapping[str, object]
    """The request parameters that are the model's task's (e.g. `score_threshold`), unchecked."""


def decompress(body: bytes, encoding: str | None, *, limit: int) -> bytes:
    """Undo `Content-Encoding` (gzip, deflate, identity), never producing more than `limit` bytes:
    a small compressed body that inflates past the request size limit is refused, without the
    memory to inflate it (the limit applies to what the body decompresses to)."""
    name = (encoding or "identity").strip().lower()
    if name == "identity":
        return body
    if name not in _WBITS:
        raise VisionError(
            ErrorCode.UNSUPPORTED_MEDIA_TYPE,
            f"Content-Encoding {encoding!r} is not supported; send gzip, deflate or no encoding",
        )
    for wbits in _WBITS[name]:
        inflater = zlib.decompressobj(wbits)
        try:
            data = inflater.decompress(body, limit + 1)
        except zlib.error:
            continue
        parts = [data]
        size = len(data)
        while True:
            if size > limit or inflater.unconsumed_tail:
                raise VisionError(
                    ErrorCode.PAYLOAD_TOO_LARGE,
                    f"the {name} body decompresses to more than {limit:,} bytes; the limit is {limit:,} "
                    f"bytes (setting {SIZE_SETTING})",
                )
            if not inflater.eof:
                raise invalid(f"the {name} body is truncated: it ends before the compressed stream does")
            rest = inflater.unused_data
            if not rest:
                return b"".join(parts)
            # NOTE: a gzip body may hold several members, one after another (RFC 1952; what
            # `gzip.decompress` reads): each is inflated, within what is left of the limit. Any
            # other bytes after the end were silently dropped before; now they are refused.
            trailing = invalid(
                f"the {name} body has {len(rest):,} bytes after the end of its compressed data"
            )
            if wbits != _GZIP_WBITS:
                raise trailing
            inflater = zlib.decompressobj(wbits)
            try:
                data = inflater.decompress(rest, limit - size + 1)
            except zlib.error:
                raise trailing from None
            parts.append(data)
            size += len(data)
    raise invalid(f"the body is not valid {name} data (Content-Encoding: {encoding})")


def _split(body: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    """The JSON header and the binary part."""
    if header_length is None:
        return body, b""
    try:
        length = int(header_length)
    except ValueError:
        raise invalid(f"header {HEADER_LENGTH} must be a number of bytes, got {header_length!r}") from None
    if not 0 < length <= len(body):
        raise invalid(
            f"header {HEADER_LENGTH} is {length:,} but the body is {len(body):,} bytes; it must be the "
            "length of the JSON part at the start of the body"
        )
    return body[:length], body[length:]


def _object(value: object, what: str) -> Mapping[str, object]:
    if not isinstance(value, dict):
        raise invalid(f"{what} must be a JSON object, got {type(value).__name__}")
    return value


def _parameters(value: object, what: str) -> Mapping[str, object]:
    return {} if value is None else _object(value, f"{what} parameters")


def _inputs(raw_inputs: object, binary: bytes) -> list[InputTensor]:
    if not isinstance(raw_inputs, list):
        raise invalid("`inputs` must be a list of tensors ({name, datatype, shape, data})")
    tensors: list[InputTensor] = []
    offset = 0
    for index, raw in enumerate(raw_inputs):
        entry = _object(raw, f"inputs[{index}]")
        name = entry.get("name", f"inputs[{index}]")
        parameters = _parameters(entry.get("parameters"), f"input {name!r}")
        size = parameters.get("binary_data_size")
        data: bytes | Sequence[object] | None
        if size is not None:
            if isinstance(size, bool) or not isinstance(size, int) or size < 0:
                raise invalid(f"input {name!r}: binary_data_size must be a byte count, got {size!r}")
            if "data" in entry:
                raise invalid(f"input {name!r} has both `data` and binary_data_size; send one")
            if offset + size > len(binary):
                raise invalid(
                    f"input {name!r}: binary_data_size {size:,} runs past the end of the body (the "
                    f"binary part has {len(binary) - offset:,} bytes left)"
                )
            data = binary[offset : offset + size]
            offset += size
        else:
            raw_data = entry.get("data")
            if raw_data is not None and not isinstance(raw_data, list):
                raise invalid(f"input {name!r}: `data` must be a list, got {type(raw_data).__name__}")
            data = raw_data
        tensors.append(InputTensor(name, entry.get("datatype"), entry.get("shape"), data))
    if offset != len(binary):
        raise invalid(
            f"the binary part of the body is {len(binary):,} bytes but the inputs' binary_data_size "
            f"add up to {offset:,}"
        )
    return tensors


def _outputs(signature: Signature, raw_outputs: object) -> list[RequestedOutput]:
    if raw_outputs is None:
        return default_outputs(signature)
    if not isinstance(raw_outputs, list):
        raise invalid("`outputs` must be a list of {name, parameters}")
    check_output_count(signature, len(raw_outputs))
    outputs = []
    for index, raw in enumerate(raw_outputs):
        entry = _object(raw, f"outputs[{index}]")
        name = entry.get("name")
        outputs.append(
            requested_output(signature, name, _parameters(entry.get("parameters"), f"output {name!r}"))
        )
    check_outputs(outputs)
    return outputs


def _timeout(parameters: Mapping[str, object]) -> float | None:
    value = parameters.get("timeout")
    return None if value is None else microseconds_parameter(value)


def parse_request(signature: Signature, body: bytes, header_length: str | None) -> InferRequest:
    """A (decompressed) request body -> a checked `InferRequest`; a 400 names what is wrong."""
    header, binary = _split(body, header_length)
    try:
        document = json.loads(header)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        where = f" (binary data follows at byte {len(header):,})" if binary else ""
        raise invalid(f"the request's JSON is not valid: {exc}{where}") from None
    except RecursionError:  # NOTE: json.loads recurses per nesting level; 1,000 `[` (2 KB) were a 500
        raise invalid(
            "the request's JSON is nested too deeply; a tensor's data nests as deep as its shape"
        ) from None
    request = _object(document, "the request")
    parameters = _parameters(request.get("parameters"), "request")
    binary_output = parameters.get("binary_data_output", False)
    if not isinstance(binary_output, bool):
        raise invalid(f"parameter binary_data_output must be true or false, got {binary_output!r}")
    request_id = request.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise invalid(f"`id` must be a string, got {request_id!r}")
    timeout_s = _timeout(parameters)
    model_input = parse_inputs(signature, _inputs(request.get("inputs"), binary))
    return InferRequest(
        id=request_id,
        model_input=model_input,
        outputs=_outputs(signature, request.get("outputs")),
        binary_output=binary_output,
        timeout_s=timeout_s,
        parameters=task_parameters(signature, parameters),
    )


def encode_response(
    signature: Signature, request: InferRequest, outputs: Sequence[OutputTensor]
) -> tuple[bytes, dict[str, str]]:
    """The response body and its headers. Outputs asked for in binary follow the JSON, in the order
    of `outputs`, each with its `binary_data_size`; the others carry their `data` in the JSON."""
    entries: list[dict[str, object]] = []
    blobs: list[bytes] = []
    for requested, output in zip(request.outputs, outputs, strict=True):
        entry: dict[str, object] = {
            "name": output.name,
            "datatype": output.datatype,
            "shape": list(output.shape),
        }
        binary = request.binary_output if requested.binary is None else requested.binary
        if binary:
            blob = output.raw()
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = output.json_data()
        entries.append(entry)
    document: dict[str, object] = {"model_name": signature.model, "model_version": signature.version}
    if request.id is not None:
        document["id"] = request.id
    document["outputs"] = entries
    header = json.dumps(document, separators=(",", ":")).encode()
    if not blobs:
        return header, {"Content-Type": "application/json"}
    return header + b"".join(blobs), {
        "Content-Type": "application/octet-stream",
        HEADER_LENGTH: str(len(header)),
    }

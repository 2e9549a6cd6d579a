"""Requests that do not parse: INVALID_ARGUMENT naming the message type, on every method.

grpc.aio turns the bytes of a request into a message before any servicer or interceptor code
runs; when that fails it ends the call with UNKNOWN ("Unexpected <class 'DecodeError'>: ...") and
logs a traceback, as for a bug in the server. `MessageCheckInterceptor` wraps each handler's
request deserializer so that bytes that do not parse become a `Malformed` value, and the handler
so that it ends the call on one with INVALID_ARGUMENT and a message a person can act on, e.g.
"the request is not a valid visionserve.v1.PredictRequest message (Wire format was corrupt)".

Unary requests (Predict, PredictBatch, ModelInfer, ...) are refused before the servicer sees
them. On a request stream (PredictStream, ModelStreamInfer), a message that does not parse ends
the call with INVALID_ARGUMENT: it has no frame id to answer it by and means the client does not
speak this service's .proto, so nothing after it is read. The messages read before it are answered
first (the stream pipeline answers what it has read before it raises a broken request stream),
unless the servicer ends the call itself. Empty bytes are a valid empty message in proto3 and
reach the servicer, which refuses them for what they lack (no image, no inputs).
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError

Deserializer = Callable[[bytes], Any]


class Malformed:
    """What a wrapped deserializer returns for bytes that do not parse: the message to answer."""

    def __init__(self, message: str):
        self.message = message


class MalformedMessageError(Exception):
    """Raised to the servicer by a request stream on a message that does not parse."""

    def __init__(self, malformed: Malformed):
        super().__init__(malformed.message)
        self.malformed = malformed


def _type_name(deserializer: Deserializer) -> str:
    """`pkg.Message` for a generated `Message.FromString`, else a generic name."""
    descriptor = getattr(getattr(deserializer, "__self__", None), "DESCRIPTOR", None)
    return str(getattr(descriptor, "full_name", "request"))


def checked(deserializer: Deserializer | None) -> Deserializer | None:
    """`deserializer`, returning `Malformed` instead of raising `DecodeError`."""
    if deserializer is None:
        return None
    name = _type_name(deserializer)

    def deserialize(raw: bytes) -> Any:
        try:
            return deserializer(raw)
        except DecodeError as exc:
            # NOTE: upb says "Error parsing message with type '<name>': <reason>"; keep the reason.
            reason = str(exc).rpartition(": ")[2] or "it does not parse"
            return Malformed(
                f"the request is not a valid {name} message ({reason}); send a message built from "
                "this service's .proto"
            )

    return deserialize


async def _checked_stream(requests: AsyncIterator[Any], seen: list[Malformed]) -> AsyncIterator[Any]:
    async for request in requests:
        if isinstance(request, Malformed):
            seen.append(request)
            raise MalformedMessageError(request)
        yield request


async def _refuse_if_malformed(context: grpc.aio.ServicerContext, seen: list[Malformed]) -> None:  # type: ignore[type-arg]
    if seen and not context.done():
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, seen[0].message)


def _check_handler(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """`handler` with its deserializer checked and `Malformed` requests refused."""
    serializers = {
        "request_deserializer": checked(handler.request_deserializer),
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary or handler.unary_stream:
        inner = handler.unary_unary or handler.unary_stream

        async def refuse(request: Any, context: Any) -> None:
            if isinstance(request, Malformed):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)

        if handler.unary_unary or not inspect.isasyncgenfunction(inner):

            async def unary_in(request: Any, context: Any) -> Any:
                await refuse(request, context)
                return await inner(request, context)

            wrap = (
                grpc.unary_unary_rpc_method_handler
                if handler.unary_unary
                else grpc.unary_stream_rpc_method_handler
            )
            return wrap(unary_in, **serializers)

        async def unary_in_stream_out(request: Any, context: Any) -> AsyncIterator[Any]:
            await refuse(request, context)
            async for response in inner(request, context):
                yield response

        return grpc.unary_stream_rpc_method_handler(unary_in_stream_out, **serializers)

    if handler.stream_unary:
        inner_unary = handler.stream_unary

        async def stream_in(requests: AsyncIterator[Any], context: Any) -> Any:
            seen: list[Malformed] = []
            try:
                response = await inner_unary(_checked_stream(requests, seen), context)
            except Exception:
                await _refuse_if_malformed(context, seen)
                raise
            await _refuse_if_malformed(context, seen)
            return response

        return grpc.stream_unary_rpc_method_handler(stream_in, **serializers)

    inner_stream = handler.stream_stream
    if not inspect.isasyncgenfunction(inner_stream):
        return handler  # NOTE: a reader/writer-API stream handler reads `context`, not an iterator

    async def stream_in_stream_out(requests: AsyncIterator[Any], context: Any) -> AsyncIterator[Any]:
        seen: list[Malformed] = []
        try:
            async for response in inner_stream(_checked_stream(requests, seen), context):
                yield response
        except Exception:
            await _refuse_if_malformed(context, seen)
            raise
        await _refuse_if_malformed(context, seen)

    return grpc.stream_stream_rpc_method_handler(stream_in_stream_out, **serializers)


class MessageCheckInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Answers requests that do not parse with INVALID_ARGUMENT (see the module docstring).

    Install it last (innermost): the interceptors before it then see the refused call like any
    other, and one that refuses calls without reading them (the API key) answers first."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None:
            return handler
        return _check_handler(handler)

"""The optional API key on the gRPC process: a server interceptor for the gRPC calls and a WSGI
wrapper for its metrics endpoint. Health checks stay open (orchestrators probe without
credentials); every other service, reflection included, needs the key."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any

import grpc

from visionserve.errors import VisionError
from visionserve.security import API_KEY_HEADER, AUTHORIZATION_HEADER, ApiKeyCheck

OPEN_SERVICES = frozenset({"grpc.health.v1.Health"})
"""Services answered without the key."""


def _service(method: str) -> str:
    """`/package.Service/Method` -> `package.Service`."""
    return method.lstrip("/").partition("/")[0]


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Ends calls that do not carry the key (metadata `authorization: Bearer <key>` or
    `x-api-key: <key>`) with UNAUTHENTICATED, before the servicer reads a message."""

    def __init__(self, key: str):
        self.check = ApiKeyCheck(key)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or _service(details.method) in OPEN_SERVICES:
            return handler
        metadata = dict(details.invocation_metadata or ())
        try:
            self.check.check(metadata.get(AUTHORIZATION_HEADER), metadata.get(API_KEY_HEADER))
        except VisionError as error:
            return _refusal(handler, error.message)
        return handler


def _refusal(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler of `handler`'s kind that answers UNAUTHENTICATED without reading a message."""

    async def refuse(_: Any, context: grpc.aio.ServicerContext) -> None:  # type: ignore[type-arg]
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def refuse_stream(_: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:  # type: ignore[type-arg]
        # NOTE: a generator, as streaming handlers are (the logging interceptor iterates them)
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # never reached: abort raises

    serializers = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(refuse, **serializers)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(refuse_stream, **serializers)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(refuse, **serializers)
    return grpc.stream_stream_rpc_method_handler(refuse_stream, **serializers)


WsgiApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


def require_key(app: WsgiApp, key: str) -> WsgiApp:
    """`app` behind the API key (the same two headers as the HTTP API); 401 JSON otherwise."""
    check = ApiKeyCheck(key)

    def guarded(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        try:
            check.check(environ.get("HTTP_AUTHORIZATION"), environ.get("HTTP_X_API_KEY"))
        except VisionError as error:
            body = json.dumps(error.to_dict()).encode()
            start_response(
                "401 Unauthorized",
                [
                    ("Content-Type", "application/json"),
                    ("Content-Length", str(len(body))),
                    ("WWW-Authenticate", "Bearer"),
                ],
            )
            return [body]
        return app(environ, start_response)

    return guarded

"""Server interceptor: the request metrics per call (method, status, latency), and one log line
per call when the access log is on (VISION_ACCESS_LOG, as for HTTP)."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from visionserve.metrics import Metrics

logger = logging.getLogger(__name__)


def _code(context: Any, failed: BaseException | None) -> str:
    code = context.code() if hasattr(context, "code") else None
    if code is None:
        if failed is None:
            return "OK"
        return (
            "CANCELLED"
            if isinstance(failed, BaseException) and "Cancelled" in type(failed).__name__
            else "UNKNOWN"
        )
    return getattr(code, "name", str(code))


class LoggingInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Counts and times every unary and streaming call in `metrics` (when given), and logs
    `<method> <status> <ms>` at INFO for each when `access_log` is on."""

    def __init__(self, metrics: Metrics | None = None, *, access_log: bool = True):
        self.metrics = metrics
        self.access_log = access_log

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None:
            return handler
        method = details.method

        def log(context: Any, started: float, failed: BaseException | None) -> None:
            elapsed = time.perf_counter() - started
            code = _code(context, failed)
            if self.access_log:
                logger.info("%s %s %.2f ms", method, code, elapsed * 1e3)
            if self.metrics is not None:
                self.metrics.requests.labels("grpc", method, code).inc()
                self.metrics.request_latency.labels("grpc", method).observe(elapsed)

        if handler.unary_unary:
            inner = handler.unary_unary

            async def unary_unary(request: Any, context: Any) -> Any:
                started = time.perf_counter()
                failed: BaseException | None = None
                try:
                    return await inner(request, context)
                except BaseException as exc:
                    failed = exc
                    raise
                finally:
                    log(context, started, failed)

            return grpc.unary_unary_rpc_method_handler(
                unary_unary,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.stream_stream:
            inner_stream = handler.stream_stream

            async def stream_stream(requests: Any, context: Any) -> Any:
                started = time.perf_counter()
                failed: BaseException | None = None
                try:
                    async for response in inner_stream(requests, context):
                        yield response
                except BaseException as exc:
                    failed = exc
                    raise
                finally:
                    log(context, started, failed)

            return grpc.stream_stream_rpc_method_handler(
                stream_stream,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler  # unary-stream / stream-unary: none in this API (health Watch passes through)

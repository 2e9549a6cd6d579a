"""Server interceptor: the request metrics per call (method, status, model, latency), and one log
line per call when the access log is on (VISION_ACCESS_LOG, as for HTTP)."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Mapping
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


def model_of(request: Any, default: str) -> str:
    """The model a unary request is for: its `model` (empty: `default`), `model_name` or `name`
    (the Open Inference Protocol's); empty for requests about no model (health, metadata)."""
    for field in ("model", "model_name", "name"):
        value = getattr(request, field, None)
        if isinstance(value, str):
            return value or (default if field == "model" else "")
    return ""


class LoggingInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Counts and times every unary and streaming call in `metrics` (when given), and logs
    `<method> <status> <ms>` at INFO for each when `access_log` is on. A unary call is labelled
    with its request's model (`default_model` when it names none); a stream, whose frames may
    each name another, with none."""

    def __init__(
        self,
        metrics: Metrics | None = None,
        *,
        access_log: bool = True,
        default_model: str = "",
        method_models: Mapping[str, str] | None = None,
    ):
        self.metrics = metrics
        self.access_log = access_log
        self.default_model = default_model
        self.method_models = dict(method_models or {})
        """Methods whose messages name no model, and the model they run on (the seeds' services)."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None:
            return handler
        method = details.method
        fixed_model = self.method_models.get(method)

        def log(context: Any, started: float, failed: BaseException | None, model: str = "") -> None:
            elapsed = time.perf_counter() - started
            code = _code(context, failed)
            if self.access_log:
                logger.info("%s %s %.2f ms", method, code, elapsed * 1e3)
            if self.metrics is not None:
                self.metrics.requests.labels("grpc", method, code, model).inc()
                self.metrics.request_latency.labels("grpc", method, model).observe(elapsed)

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
                    log(context, started, failed, fixed_model or model_of(request, self.default_model))

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

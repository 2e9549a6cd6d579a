"""The clients of one measuring loop: HTTP clients per server and level, one gRPC channel per
target, and the senders and stream measurements made on them.

grpc.aio channels and the raw HTTP client's connections belong to the event loop they are made
on: everything here is made on `runner`'s loop and closed by `stack` when the loop is done.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Coroutine
from dataclasses import replace
from typing import Any

import grpc

from bench.access import OPEN, Access
from bench.closed_loop import SendOnce, cycling
from bench.config import BenchConfig
from bench.groups import HttpEndpoint
from bench.grpc_load import grpc_channel, grpc_sender, health_sender, v2_grpc_sender
from bench.http_load import HttpRequestSpec, http_client, http_sender
from bench.raw_http import RawHttpClient
from bench.stats import Measurement
from bench.stream_load import measure_paced, measure_stream
from bench.subjects import BenchModel


class Clients:
    """Makes the clients and senders of one loop (`runner`), closed with `stack`."""

    def __init__(self, config: BenchConfig, runner: asyncio.Runner, stack: contextlib.ExitStack):
        self.config = config
        self.runner = runner
        self.stack = stack
        self._channels: dict[str, grpc.aio.Channel] = {}

    def http(
        self,
        endpoint: HttpEndpoint,
        level: int,
        specs: dict[str, list[HttpRequestSpec]],
        access: Access = OPEN,
    ) -> dict[str, SendOnce]:
        """For each request name, one `send` cycling through its specs (one per image), over a
        client of `level` keep-alive connections to `endpoint`, with `access`'s key."""
        config = self.config
        keyed = {
            name: [replace(spec, headers={**spec.headers, **access.headers()}) for spec in group]
            for name, group in specs.items()
        }
        context = access.ssl_context() if endpoint.base_url.startswith("https://") else None
        if config.client == "raw":
            raw = RawHttpClient(
                endpoint.base_url, concurrency=level, timeout_s=config.timeout_s, ssl_context=context
            )
            self.stack.callback(self.runner.run, raw.aclose())
            return {name: cycling([raw.sender(spec) for spec in group]) for name, group in keyed.items()}
        client = http_client(
            endpoint.base_url, concurrency=level, timeout_s=config.timeout_s, verify=context or True
        )
        self.stack.callback(self.runner.run, client.aclose())
        return {name: cycling([http_sender(client, spec) for spec in group]) for name, group in keyed.items()}

    def channel(self, target: str, access: Access = OPEN) -> grpc.aio.Channel:
        """The one channel to `target` (made on first use)."""
        if target not in self._channels:
            self._channels[target] = self.runner.run(_open_channel(target, access))
            self.stack.callback(self.runner.run, self._channels[target].close())
        return self._channels[target]

    def unary(self, target: str, model: BenchModel, access: Access = OPEN) -> SendOnce:
        """`Predict` of each of `model`'s images in turn."""
        to, key = self.channel(target, access), access.metadata()
        timeout = self.config.timeout_s
        return cycling(
            [
                grpc_sender(to, data, model=model.name, params=model.params, timeout_s=timeout, metadata=key)
                for data in model.datas
            ]
        )

    def v2_unary(self, target: str, model: BenchModel, access: Access = OPEN) -> SendOnce:
        """V2 `ModelInfer` of each of `model`'s images in turn (a classification)."""
        to, key = self.channel(target, access), access.metadata()
        return cycling(
            [
                v2_grpc_sender(to, data, model.name, timeout_s=self.config.timeout_s, metadata=key)
                for data in model.datas
            ]
        )

    def health(self, target: str, access: Access = OPEN) -> SendOnce:
        """The standard health check (the gRPC floor)."""
        return health_sender(self.channel(target, access), timeout_s=self.config.timeout_s)

    def stream(self, kind: str, target: str, model: BenchModel, access: Access = OPEN) -> StreamMeasure:
        """One round of a stream row: `stream` (PredictStream, back to back within the window),
        `pacedstream` (PredictStream at `clip_fps`) or `livestream` (PredictLive at `clip_fps`)."""
        return StreamMeasure(self.config, kind, self.channel(target, access), model, access)


class StreamMeasure:
    """A `Measure` of one stream call per round over `model`'s images."""

    def __init__(
        self, config: BenchConfig, kind: str, channel: grpc.aio.Channel, model: BenchModel, access: Access
    ):
        self.config = config
        self.kind = kind
        self.channel = channel
        self.model = model
        self.access = access

    def __call__(self, frames: int | None, duration_s: float | None) -> Coroutine[Any, Any, Measurement]:
        config, model = self.config, self.model
        common: dict[str, Any] = {
            "frames": frames,
            "duration_s": duration_s,
            "model": model.name,
            "params": model.params,
            "frame_timeout_s": config.timeout_s,
            "metadata": self.access.metadata(),
        }
        if self.kind == "stream":
            return measure_stream(self.channel, model.datas, window=config.resolved_stream_window(), **common)
        return measure_paced(
            self.channel, model.datas, fps=config.clip_fps, live=self.kind == "livestream", **common
        )


async def _open_channel(target: str, access: Access) -> grpc.aio.Channel:
    return grpc_channel(target, access.grpc_credentials())

"""Real servers for the Open Inference Protocol tests, each in a background thread of the test
process, on 127.0.0.1 port 0: the FastAPI app under uvicorn, and the grpc.aio `GrpcServer`.

Both are built exactly as the deployables build them; the tests talk to them over real sockets
with clients nobody here wrote (tritonclient), so the servers must run beside the client rather
than in the test's own event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import uvicorn
from fastapi import FastAPI

from grpc_server.server import GrpcServer
from tests.fixtures import app_of, grpc_server_of
from visionserve.runtimes.base import ModelRuntime
from visionserve.serving.model import ServedModel
from visionserve.settings import GrpcSettings, ServerSettings


@dataclass
class HttpServing:
    """A started HTTP server: `url` (`127.0.0.1:PORT`, as tritonclient.http takes it) and its app."""

    url: str
    app: FastAPI

    @property
    def service(self) -> ServedModel:
        service: ServedModel = self.app.state.registry.default
        return service

    def get(self, path: str) -> tuple[int, bytes]:
        """GET `path`: the status and body."""
        try:
            with urllib.request.urlopen(f"http://{self.url}{path}", timeout=10) as reply:
                return reply.status, reply.read()
        except urllib.error.HTTPError as error:
            return error.code, error.read()


@contextlib.contextmanager
def http_serving(runtime: ModelRuntime, *more: ModelRuntime, **settings: Any) -> Iterator[HttpServing]:
    """The FastAPI app for the runtimes (the first is the default) under uvicorn in a thread;
    yields once every model is ready."""
    pipelines = settings.pop("pipelines", ())
    app = app_of(ServerSettings(**{"preprocess_workers": 2, **settings}), runtime, *more, pipelines=pipelines)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_config=None, lifespan="on"))
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 120
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.01)
        port = server.servers[0].sockets[0].getsockname()[1]
        serving = HttpServing(f"127.0.0.1:{port}", app)
        while serving.get("/v2/health/ready")[0] != 200:
            assert time.monotonic() < deadline, "the model did not become ready"
            time.sleep(0.02)
        yield serving
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@dataclass
class GrpcServing:
    """A started gRPC server: `target` (`127.0.0.1:PORT`), the server, and its event loop."""

    target: str
    server: GrpcServer
    loop: asyncio.AbstractEventLoop

    @property
    def service(self) -> ServedModel:
        return self.server.registry.default

    def metrics(self) -> str:
        """GET /metrics from the gRPC process's metrics endpoint."""
        url = f"http://127.0.0.1:{self.server.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as reply:
            return str(reply.read().decode())


@contextlib.contextmanager
def grpc_serving(runtime: ModelRuntime, *more: ModelRuntime, **settings: Any) -> Iterator[GrpcServing]:
    """A `GrpcServer` for the runtimes (the first is the default) on its own event loop in a
    thread; yields once every model is ready."""
    pipelines = settings.pop("pipelines", ())
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="grpc-loop", daemon=True)
    thread.start()

    async def start() -> GrpcServer:
        # NOTE: built on its loop: grpc.aio binds a server to the loop it is created on
        server = grpc_server_of(
            GrpcSettings(host="127.0.0.1", port=0, metrics_port=0),
            ServerSettings(**{"preprocess_workers": 2, **settings}),
            runtime,
            *more,
            pipelines=pipelines,
        )
        await server.start()
        assert server.loaded is not None
        await server.loaded
        return server

    server: GrpcServer | None = None
    try:
        server = asyncio.run_coroutine_threadsafe(start(), loop).result(timeout=120)
        yield GrpcServing(f"127.0.0.1:{server.port}", server, loop)
    finally:
        if server is not None:
            asyncio.run_coroutine_threadsafe(server.stop(grace_s=1), loop).result(timeout=30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=30)
        loop.close()

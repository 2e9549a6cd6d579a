"""An HTTP client that goes away while its request is queued: the request is never computed."""

from __future__ import annotations

import asyncio
from pathlib import Path

import uvicorn
from PIL import Image

from bench.http_load import file_request
from bench.raw_http import encode_request
from tests.conftest import encode
from tests.fixtures import SlowRuntime, app_of, write_fake_entry
from visionserve.settings import ServerSettings

IMAGE = encode(Image.new("RGB", (48, 40), (30, 60, 90)))


async def _read_response(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = int(
        next(
            line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")
        )
    )
    return head + await reader.readexactly(length)


def test_a_queued_request_whose_client_disconnects_is_dropped(tmp_path: Path) -> None:
    runtime = SlowRuntime(write_fake_entry(tmp_path), batch_s=0.4)
    app = app_of(ServerSettings(), runtime)
    request = encode_request(file_request(IMAGE, "x.png"), "127.0.0.1")

    async def scenario() -> None:
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_config=None, lifespan="on"))
        serving = asyncio.create_task(server.serve())
        while not server.started:
            await asyncio.sleep(0.01)
        port = server.servers[0].sockets[0].getsockname()[1]
        service = app.state.registry.default
        while not service.ready:
            await asyncio.sleep(0.01)
        computed_before = len(runtime.batches)
        try:
            reader_a, writer_a = await asyncio.open_connection("127.0.0.1", port)
            writer_a.write(request)  # computed at once (idle), for 0.4 s
            while service.batcher.idle:
                await asyncio.sleep(0.005)
            _, writer_b = await asyncio.open_connection("127.0.0.1", port)
            writer_b.write(request)  # queued behind A
            while service.batcher.queue_depth == 0:
                await asyncio.sleep(0.005)
            writer_b.close()  # B goes away while queued
            answer = await _read_response(reader_a)
            assert b" 200 " in answer.split(b"\r\n", 1)[0]
            await asyncio.sleep(0.6)  # B would have been computed by now
            assert len(runtime.batches) == computed_before + 1, runtime.batches
            text = service.metrics.render()[0].decode()
            assert 'visionserve_rejected_total{model="fake",reason="cancelled"} 1.0' in text
            writer_a.close()
        finally:
            server.should_exit = True
            await serving

    asyncio.run(scenario())

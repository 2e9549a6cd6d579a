"""Slow, idle and surplus clients against real servers on loopback: connections that send nothing,
trickle their headers or their body are closed in time (408 where an answer fits), normal requests
go on meanwhile, the connection cap answers 503 beyond it, idle keep-alive and idle HTTP/2
connections are closed."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Coroutine
from pathlib import Path
from typing import Any

import uvicorn

from tests.fixtures import FakeRuntime, app_of, grpc_server_of, write_fake_entry
from visionserve.http.server import bind, uvicorn_config
from visionserve.settings import GrpcSettings, SecuritySettings, ServerSettings

SLOW = 200  # slow connections held at once
TIMEOUT_S = 1.0
CLOSED_WITHIN_S = TIMEOUT_S + 3.0  # the timeout, and slack for a busy 2-core CI machine
GET = b"GET /health/live HTTP/1.1\r\nHost: x\r\n\r\n"


def run(scenario: Coroutine[Any, Any, None], timeout_s: float = 60.0) -> None:
    """One scenario in a fresh event loop, bounded so that a hang fails instead of stalling."""

    async def bounded() -> None:
        await asyncio.wait_for(scenario, timeout_s)

    asyncio.run(bounded())


@contextlib.asynccontextmanager
async def http_server(tmp_path: Path, **settings: Any) -> AsyncIterator[tuple[int, Any]]:
    """The app over a fake model, served by uvicorn with the project's config on 127.0.0.1:0."""
    server_settings = ServerSettings(host="127.0.0.1", port=0, **settings)
    app = app_of(server_settings, FakeRuntime(write_fake_entry(tmp_path)))
    registry = app.state.registry
    config = uvicorn_config(app, registry, server_settings, SecuritySettings())
    sock = bind("127.0.0.1", 0)
    server = uvicorn.Server(config)
    serving = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        while not server.started:
            await asyncio.sleep(0.01)
        yield sock.getsockname()[1], registry.metrics
    finally:
        server.should_exit = True
        await serving


async def until_closed(reader: asyncio.StreamReader) -> bytes:
    """Everything the server sends until it closes the connection."""
    data = b""
    with contextlib.suppress(ConnectionError):
        while chunk := await reader.read(65536):
            data += chunk
    return data


async def timed_get(port: int) -> tuple[bytes, float]:
    """A normal request on a fresh connection: its status line and its latency."""
    started = time.monotonic()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(GET)
    head = await reader.readuntil(b"\r\n\r\n")
    writer.close()
    return head.split(b"\r\n", 1)[0], time.monotonic() - started


async def slow_client(port: int, kind: str) -> tuple[bytes, float]:
    """A connection that sends nothing, trickles its headers, or trickles a promised body (read by
    the app, or never read); returns what it got and when the server closed it."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    started = time.monotonic()
    head = {
        "silent": b"",
        "headers": b"POST /predict/file HTTP/1.1\r\nHost: x\r\n",
        "body": b"POST /predict/file HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; "
        b"boundary=b\r\nContent-Length: 100000\r\n\r\n--b\r\n",
        "unread": b"GET /health/live HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n",
    }[kind]
    writer.write(head)

    async def trickle() -> None:
        with contextlib.suppress(ConnectionError):
            while kind != "silent":
                await asyncio.sleep(0.25)  # more often than the timeout: only a deadline stops it
                writer.write(b"X" if kind != "headers" else b"X-Slow: 1\r\n")
                await writer.drain()

    trickling = asyncio.create_task(trickle())
    try:
        data = await until_closed(reader)
    finally:
        trickling.cancel()
        writer.close()
    return data, time.monotonic() - started


def test_slow_connections_are_closed_in_time_while_normal_requests_go_on(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with http_server(tmp_path, header_timeout_s=TIMEOUT_S, body_timeout_s=TIMEOUT_S) as (
            port,
            metrics,
        ):
            kinds = ["silent", "headers", "body", "unread"]
            slow = [asyncio.create_task(slow_client(port, kinds[i % 4])) for i in range(SLOW)]
            await asyncio.sleep(0.3)
            normal = [await timed_get(port) for _ in range(5)]  # while the slow ones are held
            assert all(status == b"HTTP/1.1 200 OK" for status, _ in normal), normal
            assert max(latency for _, latency in normal) < 1.0, normal
            results = await asyncio.gather(*slow)
            for i, (data, held_s) in enumerate(results):
                kind = kinds[i % 4]
                assert TIMEOUT_S - 0.1 <= held_s < CLOSED_WITHIN_S, (kind, held_s)
                if kind in ("silent", "headers", "body"):
                    assert data.startswith(b"HTTP/1.1 408 "), (kind, data)
                    assert b"request_timeout" in data and b"_TIMEOUT_S" in data
                else:  # answered 200 at once, then cut while its body trickles
                    assert data.startswith(b"HTTP/1.1 200 ") and data.count(b"HTTP/1.1") == 1, data
            text = metrics.render()[0].decode()
            assert f'visionserve_connections_closed_total{{reason="header_timeout"}} {SLOW // 2}.0' in text
            assert f'visionserve_connections_closed_total{{reason="body_timeout"}} {SLOW // 2}.0' in text
            assert (await timed_get(port))[0] == b"HTTP/1.1 200 OK"

    run(scenario())


def test_a_fast_body_is_not_cut_by_the_body_timeout(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with http_server(tmp_path, body_timeout_s=TIMEOUT_S, keep_alive_s=5) as (port, _):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            for _ in range(3):  # keep-alive: each request gets its own deadlines
                writer.write(b"POST /health/live HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\nabcd")
                head = await reader.readuntil(b"\r\n\r\n")
                assert not head.startswith(b"HTTP/1.1 408"), head
                length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                await reader.readexactly(length)
                await asyncio.sleep(TIMEOUT_S * 1.5)  # idle between requests: the keep-alive's
            writer.close()

    run(scenario())


def test_the_connection_cap_answers_503_beyond_it(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with http_server(tmp_path, max_connections=5, header_timeout_s=30) as (port, metrics):
            idle = [await asyncio.open_connection("127.0.0.1", port) for _ in range(4)]
            await asyncio.sleep(0.1)
            assert (await timed_get(port))[0] == b"HTTP/1.1 200 OK"  # the 5th connection
            idle.append(await asyncio.open_connection("127.0.0.1", port))
            await asyncio.sleep(0.1)
            reader, writer = await asyncio.open_connection("127.0.0.1", port)  # the 6th
            writer.write(GET)
            answer = await asyncio.wait_for(until_closed(reader), 5)
            writer.close()
            assert answer.startswith(b"HTTP/1.1 503 "), answer
            assert b"connection: close" in answer.lower()
            text = metrics.render()[0].decode()
            assert 'visionserve_connections_closed_total{reason="connection_limit"} 1.0' in text
            for _, idle_writer in idle:
                idle_writer.close()
            await asyncio.sleep(0.2)
            assert (await timed_get(port))[0] == b"HTTP/1.1 200 OK"

    run(scenario())


def test_an_idle_keep_alive_connection_is_closed(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with http_server(tmp_path, keep_alive_s=TIMEOUT_S) as (port, _):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(GET)
            await reader.readuntil(b"\r\n\r\n")
            started = time.monotonic()
            await asyncio.wait_for(until_closed(reader), CLOSED_WITHIN_S)
            assert TIMEOUT_S - 0.1 <= time.monotonic() - started < CLOSED_WITHIN_S
            writer.close()

    run(scenario())


HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
EMPTY_SETTINGS = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"  # length 0, type SETTINGS, no flags, stream 0
SETTINGS, GOAWAY = 4, 7
SETTINGS_MAX_CONCURRENT_STREAMS = 3


def test_grpc_closes_silent_and_idle_connections(tmp_path: Path) -> None:
    async def scenario() -> None:
        settings = GrpcSettings(
            host="127.0.0.1",
            port=0,
            metrics=False,
            max_connection_idle_s=TIMEOUT_S,
            handshake_timeout_s=TIMEOUT_S,
            max_concurrent_streams=7,
        )
        server = grpc_server_of(settings, ServerSettings(), FakeRuntime(write_fake_entry(tmp_path)))
        port = await server.start()
        try:

            async def held(payload: bytes) -> tuple[bytes, float]:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                started = time.monotonic()
                writer.write(payload)
                data = await asyncio.wait_for(until_closed(reader), CLOSED_WITHIN_S + 2)
                writer.close()
                return data, time.monotonic() - started

            results = await asyncio.gather(
                *(held(payload) for payload in (b"", HTTP2_PREFACE, HTTP2_PREFACE + EMPTY_SETTINGS) * 20)
            )
            for i, (data, held_s) in enumerate(results):
                assert TIMEOUT_S * 0.8 <= held_s < CLOSED_WITHIN_S + 2, (i, held_s)  # core rounds timers
                frames = _frames(data)
                assert (SETTINGS, 0) in frames and frames[-1][0] == GOAWAY, (i, data)
                # no SETTINGS from the client: the handshake's timeout (or the idle one, both
                # 1 s here); with SETTINGS, the idle one
                reasons = (b"connection idle",) + (
                    (b"settings before handshake timeout",) if i % 3 < 2 else ()
                )
                assert data.endswith(reasons), (i, data)
            advertised = _settings(data)
            assert advertised[SETTINGS_MAX_CONCURRENT_STREAMS] == 7, advertised
        finally:
            await server.stop(grace_s=0)

    run(scenario())


def _frames(data: bytes) -> list[tuple[int, int]]:
    """(type, flags) of the HTTP/2 frames in `data` (the server's side of a connection)."""
    frames = []
    while len(data) >= 9:
        length = int.from_bytes(data[:3], "big")
        frames.append((data[3], data[4]))
        data = data[9 + length :]
    return frames


def _settings(data: bytes) -> dict[int, int]:
    """The parameters of the first SETTINGS frame in `data` (it opens the server's side)."""
    length = int.from_bytes(data[:3], "big")
    assert data[3] == SETTINGS
    payload = data[9 : 9 + length]
    return {
        int.from_bytes(payload[i : i + 2], "big"): int.from_bytes(payload[i + 2 : i + 6], "big")
        for i in range(0, length, 6)
    }

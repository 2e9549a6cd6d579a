"""A minimal HTTP/1.1 keep-alive client for load generation (the `--client raw` default).

A load generator should cost the machine as little as possible: on a 2-core machine every
millisecond the client spends is taken from the server it measures. A general client (httpx2)
spends about 1 ms of CPU per request and 2 ms per 240 KB upload here; this one sends bytes
encoded once and reads only the status line, the headers it needs and the body, like `wrk` does.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

from bench.closed_loop import RequestFailed, SendOnce
from bench.http_load import HttpRequestSpec

_HEADER_END = b"\r\n\r\n"


@dataclass(frozen=True)
class RawResponse:
    """One response as read: the status, the headers (names lower-case) and the body."""

    status: int
    headers: dict[str, str]
    body: bytes


CheckResponse = Callable[[RawResponse], None]
"""Called with every response before its status is counted; it may raise `RequestFailed` to count
the request as a failure of its own kind (e.g. a wrong answer, a 503 without Retry-After)."""


def encode_request(spec: HttpRequestSpec, host: str) -> bytes:
    """The whole request as bytes: request line, headers, body."""
    lines = [f"{spec.method} {spec.path} HTTP/1.1", f"Host: {host}", "Connection: keep-alive"]
    lines += [f"{name}: {value}" for name, value in spec.headers.items()]
    if spec.body or spec.method in ("POST", "PUT"):
        lines.append(f"Content-Length: {len(spec.body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + spec.body


def _default_context() -> ssl.SSLContext:
    return ssl.create_default_context()


class _Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader = reader
        self.writer = writer

    async def exchange(self, request: bytes) -> RawResponse:
        """Send one request, read the whole response."""
        self.writer.write(request)
        head = await self.reader.readuntil(_HEADER_END)
        status_line, _, header_block = head.partition(b"\r\n")
        status = int(status_line.split(b" ", 2)[1])
        length: int | None = None
        chunked = False
        keep_alive = True
        headers: dict[str, str] = {}
        for line in header_block.split(b"\r\n"):
            name, _, value = line.partition(b":")
            key = name.strip().lower()
            if key:
                headers[key.decode("latin-1")] = value.strip().decode("latin-1")
            if key == b"content-length":
                length = int(value)
            elif key == b"transfer-encoding" and b"chunked" in value.lower():
                chunked = True
            elif key == b"connection" and value.strip().lower() == b"close":
                keep_alive = False
        body = b""
        if chunked:
            while True:
                size = int((await self.reader.readline()).split(b";")[0], 16)
                body += (await self.reader.readexactly(size + 2))[:size]
                if size == 0:
                    break
        elif length is not None:
            body = await self.reader.readexactly(length)
        else:
            body = await self.reader.read()
            keep_alive = False
        if not keep_alive:
            self.close()
            raise ConnectionResetError("the server closed the connection")
        return RawResponse(status, headers, body)

    def close(self) -> None:
        self.writer.close()


class RawHttpClient:
    """Up to `concurrency` keep-alive connections to one server, handed to senders in turn; over
    TLS for an `https://` URL (checked with `ssl_context`, else the system CAs)."""

    def __init__(
        self,
        base_url: str,
        *,
        concurrency: int = 1,
        timeout_s: float = 30.0,
        ssl_context: ssl.SSLContext | None = None,
    ):
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname or not parts.port:
            raise ValueError(f"the raw client needs an http(s)://host:port URL, got {base_url!r}")
        self.host, self.port = parts.hostname, parts.port
        self.ssl: ssl.SSLContext | None = None
        if parts.scheme == "https":
            self.ssl = ssl_context or _default_context()
        self.timeout_s = timeout_s
        self._idle: asyncio.Queue[_Connection | None] = asyncio.Queue()
        for _ in range(concurrency):
            self._idle.put_nowait(None)  # a slot; connected on first use

    def sender(self, spec: HttpRequestSpec, *, check: CheckResponse | None = None) -> SendOnce:
        """A `send` for `run_closed_loop`: one request of `spec`; non-2xx raises RequestFailed.
        `check`, if given, sees every response first (a test verifies answers with it)."""
        request = encode_request(spec, f"{self.host}:{self.port}")

        async def send() -> None:
            connection = await self._idle.get()
            try:
                if connection is not None:
                    try:
                        response = await asyncio.wait_for(connection.exchange(request), self.timeout_s)
                    except (asyncio.IncompleteReadError, ConnectionError):
                        # NOTE: the server may have closed an idle keep-alive connection (uvicorn
                        # does after its keep-alive timeout); retry once on a fresh one, as
                        # pooling clients do.
                        connection.close()
                        connection = None
                if connection is None:
                    reader, writer = await asyncio.open_connection(self.host, self.port, ssl=self.ssl)
                    connection = _Connection(reader, writer)
                    response = await asyncio.wait_for(connection.exchange(request), self.timeout_s)
            except BaseException:
                if connection is not None:
                    connection.close()
                self._idle.put_nowait(None)
                raise
            self._idle.put_nowait(connection)
            if check is not None:
                check(response)
            if not 200 <= response.status < 300:
                raise RequestFailed(f"HTTP {response.status}")

        return send

    async def aclose(self) -> None:
        """Close every idle connection (and wait for it to close: a TLS connection's shutdown
        must end before its loop does)."""
        while not self._idle.empty():
            connection = self._idle.get_nowait()
            if connection is not None:
                with contextlib.suppress(Exception):
                    connection.close()
                    await asyncio.wait_for(connection.writer.wait_closed(), self.timeout_s)

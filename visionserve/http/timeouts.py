"""Slow and idle HTTP clients: read timeouts for headers and bodies, on uvicorn's own protocol.

uvicorn (0.54, httptools protocol) arms no timer on a new connection, and its keep-alive timer is
cancelled by every byte that arrives: a client that connects and sends nothing, or trickles its
headers or body a byte at a time (slowloris), holds its connection and file descriptor forever.

`SlowClientProtocol` is uvicorn's httptools protocol with one timer per connection:

- headers: from the connection's start (after the TLS handshake) for its first request, from its
  first byte for later ones, until the request line and headers are in (VISION_HEADER_TIMEOUT_S);
- body: from the end of the headers until the whole body is in (VISION_BODY_TIMEOUT_S), counting
  no time while the server itself has stopped reading (flow control: the app is busy). A whole-body
  deadline, not one between chunks: a byte a second would reset a timer between chunks forever.

Late, the client gets 408 (when no answer has begun) and the connection is closed; each is counted
in `visionserve_connections_closed_total{reason}`.

NOTE: why at the protocol, not in ASGI middleware: only the protocol sees a connection before its
headers are complete, and a body the app never reads (an early 401/413, a route without a body) is
still fed to the protocol after the answer, each byte cancelling uvicorn's keep-alive timer; one
timer here covers every case. The cap on open connections is uvicorn's `limit_concurrency` (see
`connection_limit`), counted here too.

The protocol also answers, without the app, the refusals an `EarlyRefusal` decides from the headers
(`visionserve.http.refusal`: an overloaded model's 503, byte for byte the route's), written at once
when the headers are in; the body that follows is read and discarded (uvicorn drops the body of a
request already answered) and the connection stays open for the next request.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from typing import Any, Literal

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol, RequestResponseCycle
from uvicorn.protocols.utils import get_client_addr, get_path_with_query_string

from visionserve.http.refusal import Refusal
from visionserve.metrics import Metrics

logger = logging.getLogger(__name__)

Phase = Literal["headers", "body"]
PAUSED_RECHECK_S = 1.0  # reading paused by the server: look again this much later
SETTING = {"headers": "VISION_HEADER_TIMEOUT_S", "body": "VISION_BODY_TIMEOUT_S"}


def connection_limit(max_connections: int) -> int | None:
    """uvicorn's `limit_concurrency` for at most `max_connections` open connections (0: no cap).

    uvicorn answers 503 (`Connection: close`) to a request once its headers are in when the open
    connections, idle keep-alive ones and the request's own included, reach `limit_concurrency`:
    one more than the connections to serve.
    """
    return max_connections + 1 if max_connections > 0 else None


def timeout_answer(phase: Phase, timeout_s: float, default_headers: list[tuple[bytes, bytes]]) -> bytes:
    """The 408 written to a client whose headers or body did not arrive in time."""
    message = f"the request's {phase} did not arrive within {timeout_s:g} s (setting {SETTING[phase]})"
    body = json.dumps({"error": {"code": "request_timeout", "message": message}}).encode()
    head = [b"HTTP/1.1 408 Request Timeout"]
    head += [name + b": " + value for name, value in default_headers]
    head += [
        b"content-type: application/json",
        b"content-length: " + str(len(body)).encode(),
        b"connection: close",
    ]
    return b"\r\n".join(head) + b"\r\n\r\n" + body


class SlowClientProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with header and body read timeouts (see the module's text).

    Configured by subclassing (`slow_client_protocol`): uvicorn builds one instance per connection
    from the class given as its `http` option.
    """

    header_timeout_s: float = 10.0
    body_timeout_s: float = 60.0
    metrics: Metrics | None = None
    early_refusal: Callable[[Any], Refusal | None] | None = None
    """Decides, from a request's scope once its headers are in, a refusal to answer without the app."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._read_timer: asyncio.TimerHandle | None = None
        self._phase: Phase = "headers"
        self._at_headers = False

    # -- the timer
    def _arm(self, phase: Phase, delay_s: float) -> None:
        self._cancel()
        self._phase = phase
        self._read_timer = self.loop.call_later(delay_s, self._expired)

    def _cancel(self) -> None:
        if self._read_timer is not None:
            self._read_timer.cancel()
            self._read_timer = None

    def _idle_between_requests(self) -> bool:
        return self.cycle is None or self.cycle.response_complete

    # -- uvicorn's protocol, with the timer
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm("headers", self.header_timeout_s)

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._read_timer is None and self._idle_between_requests():
            # the first bytes of a next request (or more of a body nobody reads): uvicorn cancels
            # its keep-alive timer on them; the headers' timer takes over
            self._arm("headers", self.header_timeout_s)
        super().data_received(data)

    def on_headers_complete(self) -> None:
        self._cancel()
        limit = self.limit_concurrency
        if limit is not None and (len(self.connections) >= limit or len(self.tasks) >= limit):
            self._count("connection_limit")  # uvicorn answers 503 in super()
        self._at_headers = True
        try:
            super().on_headers_complete()  # starts the request: `_start_asgi_task`
        finally:
            self._at_headers = False
        if not self.parser.should_upgrade():
            self._arm("body", self.body_timeout_s)  # cancelled at once when there is no body

    def _start_asgi_task(self, cycle: RequestResponseCycle, app: Any) -> None:
        # NOTE: only a request started as its headers arrive (not a pipelined one, started when the
        # previous answer ends), for the app (not uvicorn's connection-limit 503), while the client
        # reads its answers (writing not paused: a client that does not read is left to the app,
        # which waits for it)
        early = self.early_refusal
        if (
            early is not None
            and self._at_headers
            and app is self.app
            and not self.flow.write_paused
            and not self.transport.is_closing()
        ):
            refusal = early(cycle.scope)
            if refusal is not None:
                self._answer_now(cycle, refusal)
                return
        super()._start_asgi_task(cycle, app)

    def _answer_now(self, cycle: RequestResponseCycle, refusal: Refusal) -> None:
        """Write `refusal` as uvicorn's `send` would have written the app's answer, and end the
        request: the body still to come is discarded (`on_body` drops it: the answer is complete)."""
        scope = cycle.scope
        if cycle.access_log:
            cycle.access_logger.info(
                '%s - "%s %s HTTP/%s" %d',
                get_client_addr(scope),
                scope["method"],
                get_path_with_query_string(scope),
                scope["http_version"],
                refusal.status,
            )
        content = [STATUS_LINE[refusal.status]]
        for name, value in self.server_state.default_headers:
            content += [name, b": ", value, b"\r\n"]
        for name, value in refusal.headers:
            content += [name, b": ", value, b"\r\n"]
        close = refusal.close or not cycle.keep_alive
        if close:
            content.append(b"connection: close\r\n")
        content += [b"\r\n", refusal.body]
        cycle.response_started = cycle.response_complete = True
        cycle.waiting_for_100_continue = False
        self.transport.write(b"".join(content))
        if close:
            cycle.keep_alive = False
            self.transport.close()
        cycle.on_response()  # uvicorn's end of a request: keep-alive timer, reading resumed

    def on_message_complete(self) -> None:
        self._cancel()
        super().on_message_complete()
        if self._idle_between_requests() and not self.transport.is_closing():
            # the answer went out before the body was in: idle from now, as uvicorn would have
            # been after the answer, had the body's bytes not cancelled its keep-alive timer
            self._unset_keepalive_if_required()
            self.timeout_keep_alive_task = self.loop.call_later(
                self.timeout_keep_alive, self.timeout_keep_alive_handler
            )

    def _expired(self) -> None:
        self._read_timer = None
        if self.transport is None or self.transport.is_closing():
            return
        cycle = self.cycle
        if self._phase == "headers" and not self._idle_between_requests():
            # a pipelined request's headers, behind an answer still being made: close after it
            self._count("header_timeout")
            cycle.keep_alive = False
            self.flow.pause_reading()
            return
        reading_body = cycle is not None and cycle.more_body
        if reading_body and self.flow.read_paused:  # the server is not reading: not the client's delay
            self._read_timer = self.loop.call_later(PAUSED_RECHECK_S, self._expired)
            return
        phase: Phase = "body" if reading_body else "headers"
        self._count("body_timeout" if reading_body else "header_timeout")
        answer = b""
        if not reading_body:
            answer = timeout_answer(phase, self.header_timeout_s, self.server_state.default_headers)
        elif not cycle.response_started:
            # the app waits for the body: it sees the client leave, and answers nothing itself
            answer = timeout_answer(phase, self.body_timeout_s, self.server_state.default_headers)
            cycle.disconnected = True
            cycle.message_event.set()
        # else an answer has begun (or is done) while the body trickles: only close
        logger.debug("closing the connection of %s: %s timeout", self.client, phase)
        if answer:
            self.transport.write(answer)
        self.transport.close()

    def _count(self, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.connections_closed.labels(reason=reason).inc()


def slow_client_protocol(
    header_timeout_s: float,
    body_timeout_s: float,
    metrics: Metrics | None = None,
    early_refusal: Callable[[Any], Refusal | None] | None = None,
) -> type[SlowClientProtocol]:
    """A `SlowClientProtocol` class with these timeouts, counting in `metrics`, answering what
    `early_refusal` refuses from the headers; for uvicorn's `http`."""
    return type(
        "SlowClientProtocol",
        (SlowClientProtocol,),
        {
            "header_timeout_s": header_timeout_s,
            "body_timeout_s": body_timeout_s,
            "metrics": metrics,
            "early_refusal": staticmethod(early_refusal) if early_refusal is not None else None,
        },
    )

"""Closed-loop load over any protocol: N senders, each sending its next request when the last is
answered, until a request count and/or a duration runs out.

The protocol is a `send` coroutine function (one request per call): HTTP lives in `http_load`,
and a gRPC sender only has to provide another `send`. A `send` that returns counts as a success,
one that raises as a failure of the kind the exception names; failures are counted apart and never
enter the latencies.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence

from bench.stats import Measurement

SendOnce = Callable[[], Awaitable[None]]
OnAnswer = Callable[[bool], None]
"""Called after each request with whether it succeeded (a progress display counts them)."""


class RequestFailed(Exception):  # noqa: N818 - an outcome to count, named as one
    """A request answered unsuccessfully; `kind` (e.g. "HTTP 503") is its key in the error counts."""

    def __init__(self, kind: str):
        super().__init__(kind)
        self.kind = kind


async def run_closed_loop(
    send: SendOnce,
    *,
    concurrency: int = 1,
    requests: int | None = None,
    duration_s: float | None = None,
    on_answer: OnAnswer | None = None,
    backoff_s: float = 0.0,
) -> Measurement:
    """Run `concurrency` closed-loop senders of `send` and measure every request.

    Stops starting requests after `requests` in all, or once `duration_s` has passed, whichever
    comes first (at least one bound is required); requests in flight at the deadline are awaited
    and counted. Wall time runs from the start to the last answer, so throughput is
    completed / wall time. Failures that were answered (`RequestFailed`, e.g. a 503) keep their
    latency apart, by kind; transport errors keep none. A sender whose request was refused
    (`RequestFailed`) waits `backoff_s` before its next one, as a client honouring the refusal's
    Retry-After would (0: it retries at once, a flood). Cancelling the caller cancels every sender.
    """
    if concurrency < 1:
        raise ValueError(f"concurrency must be at least 1, got {concurrency}")
    if requests is None and duration_s is None:
        raise ValueError("bound the run: give a number of requests, a duration, or both")
    if requests is not None and requests < 0:
        raise ValueError(f"requests must not be negative, got {requests}")
    if backoff_s < 0:
        raise ValueError(f"backoff must not be negative, got {backoff_s}")

    remaining = math.inf if requests is None else requests
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    error_latencies: dict[str, list[float]] = {}
    started = time.perf_counter()
    deadline = math.inf if duration_s is None else started + duration_s

    async def sender() -> None:
        nonlocal remaining
        # NOTE: no await between the checks and the decrement, so senders on one event loop never
        # claim the same ticket.
        while remaining > 0 and time.perf_counter() < deadline:
            remaining -= 1
            sent_at = time.perf_counter()
            try:
                await send()
            except RequestFailed as exc:
                errors[exc.kind] += 1
                error_latencies.setdefault(exc.kind, []).append(time.perf_counter() - sent_at)
                ok = False
            except Exception as exc:  # transport errors, timeouts: counted by type
                errors[type(exc).__name__] += 1
                ok = False
            else:
                latencies.append(time.perf_counter() - sent_at)
                ok = True
            if on_answer is not None:
                on_answer(ok)
            if not ok and backoff_s:
                await asyncio.sleep(backoff_s)

    async with asyncio.TaskGroup() as group:
        for _ in range(concurrency):
            group.create_task(sender())
    wall_s = time.perf_counter() - started
    return Measurement(
        latencies_s=tuple(latencies),
        wall_s=wall_s,
        errors=dict(errors),
        error_latencies_s={kind: tuple(values) for kind, values in error_latencies.items()},
    )


def cycling(sends: Sequence[SendOnce]) -> SendOnce:
    """One `send` that sends each of `sends` in turn (e.g. one per image), whichever sender asks."""
    if not sends:
        raise ValueError("nothing to send: give at least one sender")
    if len(sends) == 1:
        return sends[0]
    turns = itertools.cycle(sends)

    def send() -> Awaitable[None]:
        return next(turns)()

    return send

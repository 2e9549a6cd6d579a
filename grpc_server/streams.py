"""Bidirectional streams answered in order, with a bounded number of requests in flight.

Shared by `visionserve.v1.Inference/PredictStream` and the Open Inference Protocol's
`ModelStreamInfer`: both read requests ahead (up to a window), compute them concurrently, and
answer them in the order they came.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import TypeVar

RequestT = TypeVar("RequestT")
ResultT = TypeVar("ResultT")


async def answered_in_order(
    requests: AsyncIterator[RequestT],
    start: Callable[[RequestT], Awaitable[ResultT]],
    window: int,
) -> AsyncGenerator[tuple[RequestT, ResultT | Exception], None]:
    """Yield `(request, result or the exception it raised)` for each request, in request order.

    At most `window` requests are started and unanswered: reading waits while the window is
    full, so a fast sender cannot make the server buffer an unbounded stream. A request that
    fails is yielded with its exception and the stream goes on; a broken request stream is
    raised after what was read is answered. Close the generator (`contextlib.aclosing`) when the
    call ends early: the requests still in flight are cancelled then.
    """
    pending: asyncio.Queue[tuple[RequestT, asyncio.Task[ResultT]] | None] = asyncio.Queue(maxsize=window)

    async def read() -> None:
        try:
            async for request in requests:
                task = asyncio.ensure_future(start(request))
                try:
                    await pending.put((request, task))  # waits while the window is full
                except asyncio.CancelledError:
                    task.cancel()  # NOTE: not in the window yet, so not cancelled with it below
                    raise
        except asyncio.CancelledError:
            raise
        except BaseException:
            await pending.put(None)
            raise
        await pending.put(None)  # the client half-closed: answer what is pending, then end

    reader = asyncio.create_task(read())
    try:
        while (item := await pending.get()) is not None:
            request, task = item
            try:
                result = await task
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                yield request, exc
            else:
                yield request, result
        await reader  # surfaces a broken request stream
    finally:
        reader.cancel()
        while not pending.empty():
            left = pending.get_nowait()
            if left is not None:
                left[1].cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await reader


class Skipped:
    """A live stream's frame that was not computed because a newer one was (see `answered_live`)."""

    def __repr__(self) -> str:
        return "SKIPPED"


SKIPPED = Skipped()
_Slot = asyncio.Future[asyncio.Task[ResultT] | Skipped]


async def answered_live(
    requests: AsyncIterator[RequestT],
    start: Callable[[RequestT], Awaitable[ResultT]],
    in_flight: int,
    *,
    backlog: int = 64,
) -> AsyncGenerator[tuple[RequestT, ResultT | Exception | Skipped], None]:
    """Live video: yield `(request, result, exception or SKIPPED)` for each request, in request
    order, computing only the newest request whenever fewer than `in_flight` are computing.

    Requests are read as fast as the client sends them. One that arrives while `in_flight` others
    compute waits as the newest; a newer arrival supersedes it, and the superseded one is yielded
    as SKIPPED. So a sender faster than the model gets every frame answered, most of them
    skipped, and the latency of those computed stays bounded by about `in_flight` computations
    instead of growing with a queue. At most `backlog` answers wait for a client that does not read
    them; then reading waits (so at most that many requests are held). Close the generator
    (`contextlib.aclosing`) when the call ends early: what is computing is cancelled.
    """
    answers: asyncio.Queue[tuple[RequestT, _Slot[ResultT]] | None] = asyncio.Queue(maxsize=backlog)
    computing: set[asyncio.Task[ResultT]] = set()
    waiting: tuple[RequestT, _Slot[ResultT]] | None = None
    closing = False

    def launch(request: RequestT, slot: _Slot[ResultT]) -> None:
        task = asyncio.ensure_future(start(request))
        computing.add(task)
        task.add_done_callback(finished)
        slot.set_result(task)

    def finished(task: asyncio.Task[ResultT]) -> None:
        nonlocal waiting
        computing.discard(task)
        if waiting is not None and not closing and len(computing) < in_flight:
            request, slot = waiting
            waiting = None
            launch(request, slot)

    async def read() -> None:
        nonlocal waiting
        try:
            async for request in requests:
                slot: _Slot[ResultT] = asyncio.get_running_loop().create_future()
                if waiting is None and len(computing) < in_flight:
                    launch(request, slot)
                else:
                    if waiting is not None:
                        waiting[1].set_result(SKIPPED)  # superseded: answered as skipped, in order
                    waiting = (request, slot)
                await answers.put((request, slot))
        finally:
            with contextlib.suppress(asyncio.CancelledError):
                await answers.put(None)

    reader = asyncio.create_task(read())
    try:
        while (item := await answers.get()) is not None:
            request, slot = item
            outcome = await slot
            if isinstance(outcome, Skipped):
                yield request, SKIPPED
                continue
            try:
                result = await outcome
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                yield request, exc
            else:
                yield request, result
        await reader  # surfaces a broken request stream
    finally:
        closing = True
        reader.cancel()
        for task in list(computing):
            task.cancel()
        if waiting is not None and not waiting[1].done():
            waiting[1].cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await reader

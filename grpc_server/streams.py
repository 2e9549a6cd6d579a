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

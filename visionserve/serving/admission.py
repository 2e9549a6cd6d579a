"""Admission: whether one more request fits, decided before any work is spent on it.

A request is refused at once (OVERLOADED: 503 / UNAVAILABLE with Retry-After) when the model's
queue, counting the requests still being decoded on their way to it, has no room; a request of
more images than the queue can ever hold is refused as bad input (it could never be answered
otherwise). Front doors call `check` before reading a request's body, so that an overloaded
server refuses for the price of the headers.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from visionserve.batching import DynamicBatcher
from visionserve.errors import ErrorCode, VisionError
from visionserve.serving.lifecycle import Lifecycle


class Admission:
    """Counts the requests being decoded for one model and checks room in its queue. Event loop
    only."""

    def __init__(self, lifecycle: Lifecycle, batcher: DynamicBatcher):
        self.lifecycle = lifecycle
        self.batcher = batcher
        self.preparing = 0
        """Items being decoded and preprocessed, not yet queued."""

    @property
    def idle(self) -> bool:
        """Nothing being prepared, nothing queued, an instance and the cores free: a request may
        take the fast path (decode and compute in one hand-off)."""
        return self.preparing == 0 and self.batcher.idle

    def check(self) -> None:
        """Raise now what a request would meet before any work: not ready, or no room."""
        self.lifecycle.check_ready()
        if not self.idle:
            self.batcher.check_capacity(incoming=self.preparing)

    def check_count(self, count: int) -> None:
        """Refuse a request of more items than the queue can ever hold: it would only ever be
        answered "at capacity", however long the client retried."""
        limit = self.batcher.max_queue_size
        if count > limit:
            raise VisionError(
                ErrorCode.INVALID_ARGUMENT,
                f"a request of {count:,} images can never be queued: the queue holds {limit} (setting "
                "VISION_MAX_QUEUE_SIZE); send fewer at once",
            )

    def check_room(self, count: int = 1) -> None:
        """Raise OVERLOADED unless the queue has room for `count` more items now.

        NOTE: items being preprocessed count against the queue's bound: one that could not be
        queued is refused now, in microseconds, not after a decode in a backlogged pool.
        """
        self.batcher.check_capacity(incoming=self.preparing + count - 1)

    @contextlib.contextmanager
    def preparing_items(self, count: int = 1) -> Iterator[None]:
        """Count `count` items as on their way to the queue while they are decoded."""
        self.preparing += count
        try:
            yield
        finally:
            self.preparing -= count

"""`ComputeBudget`: the cores of one process, shared by every model's batches.

Each served model is sized to the whole machine (its runtime's intra-op threads may take every
core), so two models computing at once would run twice as many threads as there are cores, each
slower, both late. Every batch (and every idle-path request) takes units from one budget of
`units` (the usable cores) for as long as it computes: `threads` units for a runtime instance of
`threads` intra-op threads. Waiters are served first come, first served, whatever their model, so
a busy model cannot starve another; a model that sends nothing takes nothing, so an idle model
costs no CPU. The same idea as Triton's rate limiter, with cores as the one resource.

A model with an adaptive layout reads the budget to pick a session per batch: its wide session
(all the units) when the budget is idle, a narrow one (its threads' units) when other work
computes or waits (`DynamicBatcher`); the budget is never oversubscribed either way.
"""

from __future__ import annotations

import asyncio
import collections
import time

from visionserve.metrics import Metrics


class ComputeBudget:
    """A FIFO counting semaphore of `units`, taken `n` at a time. Event loop only."""

    def __init__(self, units: int, *, metrics: Metrics | None = None):
        if units < 1:
            raise ValueError(f"units must be >= 1, got {units}")
        self.units = units
        self.metrics = metrics
        self._free = units
        self._waiters: collections.deque[tuple[int, asyncio.Future[None]]] = collections.deque()

    @property
    def free(self) -> int:
        """Units not taken now."""
        return self._free

    @property
    def waiting(self) -> int:
        """Batches waiting for units."""
        return len(self._waiters)

    def clamp(self, units: int) -> int:
        """`units`, at most the whole budget (a runtime with more threads than cores, allowed by
        the settings on a larger machine, takes all of it)."""
        return max(1, min(units, self.units))

    @property
    def idle(self) -> bool:
        """Nothing computing and nobody waiting: every unit free."""
        return self._free == self.units and not self._waiters

    def try_acquire(self, units: int) -> bool:
        """Take `units` now if they are free and nobody is waiting (the order `acquire` keeps);
        else take nothing and say so."""
        units = self.clamp(units)
        if self._waiters or self._free < units:
            return False
        self._free -= units
        return True

    async def acquire(self, units: int, model: str = "") -> None:
        """Wait until `units` are free and nobody queued earlier is waiting, then take them."""
        if self.try_acquire(units):
            return
        units = self.clamp(units)
        started = time.perf_counter()
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (units, future)
        self._waiters.append(entry)
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self.release(units)  # granted just as it was cancelled: give it back
            else:
                self._waiters.remove(entry)
                self._wake()
            raise
        if self.metrics is not None:
            self.metrics.budget_wait.labels(model).observe(time.perf_counter() - started)

    def release(self, units: int) -> None:
        """Give back what `acquire(units)` took."""
        self._free += self.clamp(units)
        self._wake()

    def _wake(self) -> None:
        # NOTE: strictly first come, first served: a batch needing the whole budget is not
        # overtaken forever by smaller ones that would fit in the gaps.
        while self._waiters:
            units, future = self._waiters[0]
            if future.done():
                self._waiters.popleft()
                continue
            if self._free < units:
                return
            self._waiters.popleft()
            self._free -= units
            future.set_result(None)

"""Progress on stderr while a run goes: a one-line bar on a terminal, one line per row otherwise.

On a terminal the current row redraws itself in place (`\\r`): its name, requests done of its
total and req/s so far, at most every `REDRAW_S` (so the client spends nearly nothing on it).
Elsewhere (a log file, CI, a notebook's pipe) a line is printed when each row's round finishes,
so the log stays readable.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

REDRAW_S = 0.1


class ProgressBar:
    """Reports notes and row progress to `stream`; `live` (default: whether `stream` is a TTY)
    chooses the redrawn bar over one line per finished row."""

    def __init__(self, stream: TextIO | None = None, *, live: bool | None = None):
        self.stream = stream if stream is not None else sys.stderr
        self.live = self.stream.isatty() if live is None else live
        self._name = ""
        self._total: int | None = None
        self._done = 0
        self._failed = 0
        self._started = 0.0
        self._drawn = 0.0
        self._width = 0

    def note(self, message: str) -> None:
        """A line of its own (e.g. `starting servers`), above the bar."""
        self._clear()
        print(f"bench: {message}", file=self.stream, flush=True)

    def start(self, name: str, total: int | None) -> None:
        """A row begins: `total` requests (None: bounded by time)."""
        self._name = name
        self._total = total
        self._done = self._failed = 0
        self._started = self._drawn = time.perf_counter()
        if self.live:
            self._draw()

    def advance(self, ok: bool = True) -> None:
        """One request of the current row answered (`ok` False: it failed); ignored between rows
        (warm-up requests)."""
        if not self._name:
            return
        self._done += 1
        if not ok:
            self._failed += 1
        if self.live:
            now = time.perf_counter()
            if now - self._drawn >= REDRAW_S:
                self._drawn = now
                self._draw()

    def finish(self, summary: str) -> None:
        """The current row's round is over; `summary` says what it measured."""
        if self.live:
            self._clear()
        print(f"bench: {self._name}: {summary}", file=self.stream, flush=True)
        self._name = ""

    def _draw(self) -> None:
        elapsed = time.perf_counter() - self._started
        rate = self._done / elapsed if elapsed > 0 else 0.0
        total = "?" if self._total is None else str(self._total)
        failed = f", {self._failed} failed" if self._failed else ""
        text = f"bench: {self._name}  {self._done}/{total}{failed}  {rate:.1f} req/s"
        padding = " " * max(0, self._width - len(text))
        self._width = len(text)
        self.stream.write("\r" + text + padding)
        self.stream.flush()

    def _clear(self) -> None:
        if self.live and self._width:
            self.stream.write("\r" + " " * self._width + "\r")
            self.stream.flush()
            self._width = 0

"""`UIError`: what went wrong, in words for the person at the browser, and the status to answer."""

from __future__ import annotations

import enum


class Problem(enum.StrEnum):
    """The kinds of failure the pages tell apart (each has its own wording and status)."""

    BAD_INPUT = "bad_input"
    TOO_LARGE = "too_large"
    NOT_READY = "not_ready"
    BUSY = "busy"
    UNREACHABLE = "unreachable"
    TIMEOUT = "timeout"
    API_ERROR = "api_error"


# Status the UI answers with for each kind: the browser's request was fine when the API failed,
# so those are gateway errors (502/503/504), not the API's own status.
_STATUS = {
    Problem.BAD_INPUT: 400,
    Problem.TOO_LARGE: 413,
    Problem.NOT_READY: 503,
    Problem.BUSY: 503,
    Problem.UNREACHABLE: 503,
    Problem.TIMEOUT: 504,
    Problem.API_ERROR: 502,
}


class UIError(Exception):
    """A failure to show on the page: a short `title`, a `message` saying what to do, and the
    HTTP `status` the UI answers with."""

    def __init__(self, problem: Problem, title: str, message: str):
        super().__init__(f"{title}: {message}")
        self.problem = problem
        self.title = title
        self.message = message

    @property
    def status(self) -> int:
        """The UI's HTTP status for this failure."""
        return _STATUS[self.problem]

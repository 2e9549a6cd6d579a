"""Request deadlines, one rule for every protocol: the earliest of the timeouts that apply, from
the request's arrival, on the monotonic clock. A request still queued for its model at its
deadline is dropped uncomputed (504 / DEADLINE_EXCEEDED)."""

from __future__ import annotations

import math

from visionserve.errors import ErrorCode, VisionError


def deadline_after(arrived: float, *timeouts_s: float | None) -> float | None:
    """`arrived` (time.monotonic()) plus the shortest of the timeouts given (None: no timeout);
    None when none applies."""
    given = [t for t in timeouts_s if t is not None]
    return arrived + min(given) if given else None


def positive_seconds(text: str, *, what: str) -> float:
    """A timeout sent as text (an HTTP header) -> seconds; a 400 names `what` unless it is a
    positive finite number."""
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds > 0):
        raise VisionError(
            ErrorCode.INVALID_ARGUMENT,
            f"{what} must be a positive number of seconds (e.g. 2.5); got {text!r}",
        )
    return seconds


_UINT64_MAX = 2**64 - 1


def microseconds_parameter(value: object, *, what: str = "parameter timeout") -> float:
    """The Open Inference Protocol's `timeout` parameter (microseconds, as Triton's clients send
    it) -> seconds; a 400 unless it is a positive integer that fits the protocol's uint64."""
    # NOTE: a larger JSON integer overflowed the division (a 500) before this bound
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= _UINT64_MAX:
        raise VisionError(
            ErrorCode.INVALID_ARGUMENT,
            f"{what} must be a positive number of microseconds (at most {_UINT64_MAX}), got {value!r}",
        )
    return value / 1e6


def expired(remaining_s: float | None) -> None:
    """Raise DEADLINE_EXCEEDED when a call's remaining time (None: no deadline) is already gone."""
    if remaining_s is not None and remaining_s <= 0:
        raise VisionError(ErrorCode.DEADLINE_EXCEEDED, "the call's deadline passed before it was computed")

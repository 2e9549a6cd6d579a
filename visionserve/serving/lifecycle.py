"""A served model's life: created -> loading -> ready -> stopping -> stopped (or failed), and
whether it takes new requests, with the error each refusal answers."""

from __future__ import annotations

import enum

from visionserve.errors import ErrorCode, VisionError


class ServiceState(enum.StrEnum):
    """Where a served model (or the whole server) is in its life."""

    CREATED = "created"
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"
    STOPPING = "stopping"
    STOPPED = "stopped"


class Lifecycle:
    """The state of one served model and its admission switch. Event loop only.

    Shutdown has two steps (`begin_shutdown`, then `refuse_new_requests`) so that readiness can
    turn before requests are refused: load balancers stop routing here while what they still send
    during the drain delay (VISION_SHUTDOWN_DELAY_S) is served.
    """

    def __init__(self, model: str):
        self.model = model
        self.state = ServiceState.CREATED
        self.failure: str | None = None
        """Why loading failed (for the server log only: it may hold internals)."""
        self._admitting = False

    @property
    def ready(self) -> bool:
        """True once loaded and warmed, until shutdown begins."""
        return self.state is ServiceState.READY

    @property
    def admitting(self) -> bool:
        """True while inference requests are taken: when ready, and during a shutdown's drain delay
        (`begin_shutdown`) until `refuse_new_requests`."""
        return self._admitting

    def loading(self) -> None:
        """Loading has begun."""
        self.state = ServiceState.LOADING

    def loaded(self) -> bool:
        """Loading has ended well: ready and admitting, unless shutdown began meanwhile (False)."""
        if self.state is not ServiceState.LOADING:
            return False
        self.state = ServiceState.READY
        self._admitting = True
        return True

    def failed(self, exc: BaseException) -> None:
        """Loading failed with `exc`."""
        self.state = ServiceState.FAILED
        self.failure = str(exc) or type(exc).__name__

    def begin_shutdown(self) -> None:
        """Readiness turns not-ready (STOPPING); requests still arriving are served.

        NOTE: during the drain delay a load balancer may still route requests here (Kubernetes
        removes a terminating pod's endpoints a few seconds late); refusing them would fail
        requests that this process can still answer.
        """
        if self.state in (ServiceState.CREATED, ServiceState.LOADING, ServiceState.READY):
            self.state = ServiceState.STOPPING

    def refuse_new_requests(self) -> None:
        """New inference requests are refused (NOT_READY "shutting down": 503 / UNAVAILABLE);
        those already admitted run to their answers."""
        self.begin_shutdown()
        self._admitting = False

    def stopped(self) -> None:
        """Everything is released."""
        self._admitting = False
        self.state = ServiceState.STOPPED

    def check_ready(self) -> None:
        """Raise NOT_READY unless requests are taken, saying why and when to retry."""
        if self._admitting:
            return
        if self.state in (ServiceState.STOPPING, ServiceState.STOPPED):
            raise VisionError(
                ErrorCode.NOT_READY, "the server is shutting down; retry on another instance", retry_after_s=1
            )
        if self.state is ServiceState.FAILED:
            raise VisionError(
                ErrorCode.NOT_READY, f"the model {self.model!r} failed to load; the server log says why"
            )
        retry = 5 if self.state in (ServiceState.CREATED, ServiceState.LOADING) else None
        raise VisionError(
            ErrorCode.NOT_READY,
            f"the model {self.model!r} is not ready ({self.state.value}); retry shortly",
            retry_after_s=retry,
        )

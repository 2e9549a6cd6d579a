"""What a benchmark run measured, row by row: the kinds of rows and the two row types.

A `ResultRow` is a latency measurement of one model (in-process stages, or a served endpoint at
one concurrency level, batching mode and scenario); a `LayoutRow` is one thread layout of a
model's in-process limit (images per second).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from bench.layouts import Layout, LayoutMeasurement
from bench.server_metrics import ServerFigures
from bench.stats import Measurement

IN_PROCESS = "in-process"
HTTP = "HTTP"
GRPC = "gRPC"
"""Unary gRPC calls (Predict)."""
GRPC_STREAM = "gRPC stream"
"""Frames of one PredictStream or PredictLive call: req/s is the frames/s computed."""
BASELINE = "HTTP baseline"
"""The naive reference server of seed 004 (`bench.baseline`), over HTTP."""

DEPLOYED = "as deployed"
"""The batching of a deployment the harness did not start (`--url`, `--grpc-target`): whatever it
was configured with."""

REJECTIONS = ("HTTP 503", "gRPC UNAVAILABLE")
"""Failure kinds that are an overloaded server's refusal (answered at once, retry later)."""


@dataclass(frozen=True)
class ResultRow:
    """One measured row: which runtime, how it was reached, and what was measured."""

    runtime: str
    """`onnx`, `torch compiled` or `torch eager`: the runtime and its settings."""
    mode: str
    """`in-process`, `HTTP`, `gRPC` (unary) or `gRPC stream`."""
    target: str
    """What was measured, e.g. the pipeline's stages or `POST /predict/file (multipart)`."""
    concurrency: int
    measurement: Measurement
    stages_s: Mapping[str, tuple[float, ...]] = field(default_factory=dict)
    """In-process rows: each stage's latencies (seconds) of the same passes."""
    model_work: bool = True
    """False for the HTTP floor (a request that runs no model)."""
    batching: str | None = None
    """Served rows: `on` / `off` (the server's batcher; off = `VISION_MAX_BATCH_SIZE=1`), `as
    deployed` for a deployment the harness did not start, `none` for the baseline (it has no
    batcher); None in-process."""
    overload_queue_size: int | None = None
    """Overload rows: the served process's `VISION_MAX_QUEUE_SIZE`; None otherwise."""
    server: ServerFigures | None = None
    """What the server's /metrics saw during the row (rounds added up); None where not scraped."""
    model: str = ""
    """The model measured (empty: not known, e.g. a deployment reached over gRPC only)."""
    alone: bool = False
    """Served by processes that load this model only (the run's other rows: every model of the
    run loaded): what the other models cost this one while they are idle."""
    image: str = ""
    """The one image every request of the row sent instead of the model's images (e.g. a
    pipeline's group image, for its faces/s); such a row is held against no limit. Empty: the
    model's images."""

    @property
    def scenario(self) -> str:
        """`in-process`, `sweep` (served, closed loop), `alone` (the same, the model served alone),
        `stream`, `baseline`, `overload` or `image` (one image only, in-process or served)."""
        if self.overload_queue_size is not None:
            return "overload"
        if self.alone:
            return "alone"
        if self.image:
            return "image"
        return {IN_PROCESS: "in-process", BASELINE: "baseline", GRPC_STREAM: "stream"}.get(self.mode, "sweep")

    @property
    def described_target(self) -> str:
        """The target, and the one image sent where the row has one (`..., group-8-faces.jpg only`)."""
        return f"{self.target}, {self.image} only" if self.image else self.target

    @property
    def rejected(self) -> int:
        """Requests refused as overload (503 / UNAVAILABLE)."""
        return sum(count for kind, count in self.measurement.errors.items() if kind in REJECTIONS)

    @property
    def lost(self) -> int:
        """Failures other than an overload refusal (timeouts, transport errors, other statuses)."""
        return self.measurement.failed - self.rejected


@dataclass(frozen=True)
class LayoutRow:
    """One thread layout of the in-process limit, for one runtime and model."""

    runtime: str
    layout: Layout
    measurement: LayoutMeasurement
    max_batch_size: int
    model: str = ""

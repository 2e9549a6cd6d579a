"""Triton's statistics extension (`GET /v2/models/{name}/stats`, gRPC ModelStatistics), read from
the metrics every protocol already counts; nothing extra is measured for it.

The figures cover the model's whole traffic (the project's own API and the V2 protocol, on this
process): `inference_count` images computed, `execution_count` runtime calls, `queue` the time
items waited in the batcher, `compute_infer` the runtime's time per batch, `success` both together
(decode and preprocessing are not counted), `fail` requests dropped before they were computed
(queue full, deadline, cancelled), `batch_stats` the sizes of the batches the batcher formed.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from visionserve.batching import REJECTION_REASONS

if TYPE_CHECKING:
    from visionserve.serving.registry import AnyModel


def _duration(count: float, seconds: float) -> dict[str, int]:
    return {"count": int(count), "ns": int(seconds * 1e9)}


def model_statistics(models: Iterable[AnyModel]) -> dict[str, object]:
    """`{"model_stats": [...]}` for `models`, in Triton's JSON form."""
    return {"model_stats": [_one(model) for model in models]}


def _one(model: AnyModel) -> dict[str, object]:
    registry = model.metrics.registry
    labels = {"model": model.name}

    def sample(name: str, extra: dict[str, str] | None = None) -> float:
        return registry.get_sample_value(name, labels | (extra or {})) or 0.0

    images = sample("visionserve_batch_size_sum")
    batches = sample("visionserve_batch_size_count")
    queue_s = sample("visionserve_queue_time_seconds_sum")
    compute_s = sample("visionserve_compute_time_seconds_sum")
    failed = sum(sample("visionserve_rejected_total", {"reason": reason}) for reason in REJECTION_REASONS)
    return {
        "name": model.name,
        "version": str(model.entry.config.version),
        "last_inference": 0,
        "inference_count": int(images),
        "execution_count": int(batches),
        "inference_stats": {
            "success": _duration(images, queue_s + compute_s),
            "fail": _duration(failed, 0.0),
            "queue": _duration(sample("visionserve_queue_time_seconds_count"), queue_s),
            "compute_input": _duration(0, 0.0),
            "compute_infer": _duration(sample("visionserve_compute_time_seconds_count"), compute_s),
            "compute_output": _duration(0, 0.0),
        },
        "batch_stats": [
            {"batch_size": size, "compute_infer": _duration(count, 0.0)}
            # NOTE: a pipeline has no batcher of its own: its stages' statistics show their batches
            for size, count in sorted(getattr(getattr(model, "batcher", None), "batch_sizes", {}).items())
        ],
    }

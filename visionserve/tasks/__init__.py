"""Tasks: what differs between classification, detection and what comes next (input spec and
preprocessing, postprocessing, the result type)."""

from __future__ import annotations

from visionserve.repository import ModelEntry
from visionserve.tasks.base import ALL_PARAMETERS, PARAMETERS_BY_TASK, Prepared, Task

__all__ = ["ALL_PARAMETERS", "PARAMETERS_BY_TASK", "Prepared", "Task", "create_task"]


def create_task(entry: ModelEntry, *, max_image_pixels: int, default_topk: int = 5) -> Task[object, object]:
    """The task that `entry`'s config.json names."""
    if entry.config.task == "detection":
        from visionserve.tasks.detection import DetectionTask

        return DetectionTask(entry, max_image_pixels=max_image_pixels)  # type: ignore[return-value]
    from visionserve.tasks.classification import ClassificationTask

    task = ClassificationTask(entry, max_image_pixels=max_image_pixels, default_topk=default_topk)
    return task  # type: ignore[return-value]

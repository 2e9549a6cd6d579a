"""The face models of seed 003: RetinaFace-MobileNet0.25 (faces, landmarks), Mini-Xception
(expressions), and the `face_expression` pipeline that names them as its stages."""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from export.errors import ExportError
from export.sources import ModelSource
from visionserve import __version__
from visionserve.errors import ConfigurationError
from visionserve.repository import (
    CONFIG_FILE,
    DetectionDefaults,
    FaceDefaults,
    InputSpec,
    ModelRepository,
    PipelineConfig,
)
from visionserve.tasks.faces import EXPRESSIONS

logger = logging.getLogger(__name__)

FACE_DETECTOR = "retinaface_mnet025"
EXPRESSION_CLASSIFIER = "mini_xception"
FACE_PIPELINE = "face_expression"

FACE_DETECTOR_MAX_BATCH = 4
"""RetinaFace at 640 on ONNX Runtime, 2 CPU cores, per image: see docs/models.md (the per-image
cost stops falling past batch 4 and grows at 16)."""
EXPRESSION_MAX_BATCH = 64
"""Mini-Xception on 64x64 crops is tiny: batches of faces cost far less per face (docs/models.md)."""

# NOTE: the padding of the letterbox becomes grey 117 x 1/255 in [0, 1]; the graph maps it back to
# 117 and subtracts the BGR mean (104, 117, 123): padding lands at (13, 0, -6), close to the
# zero-mean input the network saw around real images, rather than YOLO's 114.
FACE_PAD_VALUE = 117


def retinaface_source(input_size: int = 640) -> ModelSource:
    """The face detector: letterboxed RGB in [0, 1] -> (N, priors, 15) boxes, face probability,
    five landmarks."""
    from export.retinaface import build_retinaface

    module, provenance = build_retinaface(input_size)
    return ModelSource(
        module=module,
        input=InputSpec(
            name="images",
            size=(input_size, input_size),
            fit="letterbox",
            pad_value=FACE_PAD_VALUE,
            mean=(0.0, 0.0, 0.0),
            std=(1.0, 1.0, 1.0),
        ),
        labels=["face"],
        provenance=provenance,
        task="detection",
        output_name="predictions",
        output_kind="boxes",
        detection=DetectionDefaults(score_threshold=0.5, iou_threshold=0.4, max_detections=100),
        landmarks=5,
        max_batch_size=FACE_DETECTOR_MAX_BATCH,
    )


def mini_xception_source() -> ModelSource:
    """The expression classifier: a 64x64 RGB face crop in [0, 1] -> seven probabilities."""
    from export.xception import EXPRESSION_LABELS, INPUT_SIZE, build_mini_xception

    module, provenance = build_mini_xception()
    return ModelSource(
        module=module,
        input=InputSpec(
            name="input",
            size=(INPUT_SIZE, INPUT_SIZE),
            fit="center_crop",
            resize=INPUT_SIZE,
            mean=(0.0, 0.0, 0.0),
            std=(1.0, 1.0, 1.0),
        ),
        labels=list(EXPRESSION_LABELS),
        provenance=provenance,
        output_name="probabilities",
        output_kind="probabilities",
        max_batch_size=EXPRESSION_MAX_BATCH,
    )


def _check_stages(repository: ModelRepository) -> dict[str, object]:
    """The stages' entries fit the pipeline: a face detector with landmarks, a classifier over the
    seven expressions. Their provenance, for the pipeline's."""
    try:
        detector = repository.get(FACE_DETECTOR)
        classifier = repository.get(EXPRESSION_CLASSIFIER)
    except ConfigurationError as exc:
        raise ExportError(f"a stage of {FACE_PIPELINE} cannot be read: {exc}") from exc
    if detector.config.task != "detection" or detector.config.output.landmarks != 5:
        raise ExportError(f"{detector.root} is not a face detector with 5 landmarks; re-export it")
    if sorted(classifier.labels) != sorted(EXPRESSIONS):
        raise ExportError(
            f"{classifier.root} has classes {', '.join(classifier.labels)}; the pipeline needs the seven "
            f"expressions {', '.join(EXPRESSIONS)}: re-export it"
        )
    return {
        stage: {
            "model": entry.name,
            "weights_sha256": entry.config.provenance.get("weights_sha256"),
            "exported_at": entry.config.provenance.get("exported_at"),
        }
        for stage, entry in (("detector", detector), ("classifier", classifier))
    }


def export_face_pipeline(
    repository: Path,
    *,
    force: bool,
    export_stage: Callable[[str], int],
    out: Callable[[str], None] = print,
) -> Path:
    """Write `<repository>/face_expression/config.json` (no artefacts: it names its stages).

    Stages missing from the repository are exported first, through `export_stage(name)` (exit
    code 0 on success); stages present are used as they are."""
    final = repository / FACE_PIPELINE
    if (final / CONFIG_FILE).exists() and not force:
        raise ExportError(f"{final} already exists; pass --force to replace it")
    for stage in (FACE_DETECTOR, EXPRESSION_CLASSIFIER):
        if not (repository / stage / CONFIG_FILE).is_file():
            out(f"{FACE_PIPELINE} needs {stage}, which is not in {repository}: exporting it first")
            if export_stage(stage) != 0:
                raise ExportError(f"exporting {stage}, a stage of {FACE_PIPELINE}, failed (see above)")
    stages = _check_stages(ModelRepository(repository))
    config = PipelineConfig(
        name=FACE_PIPELINE,
        stages={"detector": FACE_DETECTOR, "classifier": EXPRESSION_CLASSIFIER},  # type: ignore[arg-type]
        faces=FaceDefaults(score_threshold=0.5, min_face_size=0, max_faces=32, margin=0.2),
        provenance={
            "source": f"embedded:{FACE_PIPELINE}",
            "stages": stages,
            "exported_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "exporter": f"visionserve {__version__}",
        },
    )
    final.mkdir(parents=True, exist_ok=True)
    text = json.dumps(config.model_dump(mode="json"), indent=2) + "\n"
    # NOTE: written beside the target and renamed, so a server never reads half a config
    fd, tmp = tempfile.mkstemp(dir=final, prefix=f".{CONFIG_FILE}.", suffix=".part")
    with os.fdopen(fd, "w") as stream:
        stream.write(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, final / CONFIG_FILE)
    # the check every server makes when it loads the repository
    try:
        ModelRepository(repository).get_pipeline(FACE_PIPELINE)
    except ConfigurationError as exc:
        raise ExportError(f"the written {final / CONFIG_FILE} does not validate: {exc}") from exc
    return final

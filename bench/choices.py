"""The names a run can be asked for, and what it measures when it names none: the endpoints,
the models, the runtimes, the batching modes, the image sets, the HTTP clients."""

from __future__ import annotations

from bench.grpc_load import GRPC_ENDPOINTS
from bench.http_load import REQUESTS
from visionserve.repository import Backend

ENDPOINTS = [*REQUESTS, *GRPC_ENDPOINTS]
"""Every endpoint name the CLI knows: HTTP (`http_load.REQUESTS`), then gRPC (`grpc`, the streams, ...)."""

DEFAULT_MODELS = ("efficientnet_lite0", "yolo11n", "yolo11n_320", "face_expression")
"""What a run measures when it names no model (`make bench`): the classifier, the detector, the
detector exported at 320x320 (`variants` exports it if the repository lacks it), and the
face_expression pipeline (its stages are served with it)."""

DEFAULT_ENDPOINTS = ("json", "grpc", "stream", "pacedstream", "livestream")
"""What a run measures when it names no endpoint: HTTP JSON, gRPC unary and the three streams."""

DEFAULT_BACKENDS: tuple[Backend, ...] = ("onnx",)
"""The runtime a run measures when it names none (torch: `--backends onnx,torch`; its compiling
takes minutes per model here)."""

BATCHING_MODES = ("on", "off")
"""`on`: the server's batcher as configured; `off`: `VISION_MAX_BATCH_SIZE=1` (one image per batch)."""

IMAGE_SETS = ("auto", "photos", "clip")
"""`photos`: every packaged photo as a 600 px JPEG; `clip`: the frames of `clip.make_clip`;
`auto`: the clip for a detector, the photos and a group image of 8 faces for a face_expression
pipeline (`face_images`), the photos for any other model."""

OVERLOAD_ENDPOINTS = ("json", "file", "grpc")
"""The endpoints an overload run loads (HTTP JSON, HTTP multipart and gRPC unary), where they are
measured."""

HTTP_CLIENTS = {
    "raw": "minimal HTTP/1.1 client (bench.raw_http)",
    "httpx2": "httpx2 AsyncClient",
}
"""Client name -> description for reports."""

"""`python -m bench.baseline`: the naive reference server that `--baseline` measures.

The plain endpoint of seed 004 ("Preparing an endpoint in FastAPI"), for the same `model.onnx`:
a synchronous `def` FastAPI route `POST /predict` taking `{"image": <base64>}`, which decodes the
image with Pillow, resizes it straight to the model's input size, normalises it, runs the model
once per request at batch 1 and answers `{"prediction": label, "probability": p}` after a softmax.
No batcher, no thread pool of its own: FastAPI runs the `def` route in its worker threads, and
every request runs the session by itself.

ONNX Runtime is set up as the best "plain endpoint" configuration the issue cites: intra-op
threads = the usable cores, thread spinning off (`OnnxRuntime` does both). It is a measuring
stick, not a product: it exists so that the gain over it is measured in the same run, on the
same machine, with the same client. `GET /health/ready` (not in the seed) lets the harness wait
for it like for the other servers; the model is loaded before the port is announced.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import io
import logging
import signal
import socket
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import uvicorn
from fastapi import FastAPI, HTTPException
from PIL import Image
from pydantic import BaseModel, Field

from visionserve.cpu import available_cpus
from visionserve.errors import ConfigurationError
from visionserve.repository import ModelEntry, ModelRepository
from visionserve.runtimes.onnx import OnnxRuntime

logger = logging.getLogger(__name__)

BANNER_TITLE = "visionserve baseline (seed 004 plain endpoint"


class ImageRequest(BaseModel):
    """The seed's request: one base64-encoded image."""

    image: str


class PredictionResponse(BaseModel):
    """The seed's answer: the top class and its probability."""

    prediction: str
    probability: float = Field(..., ge=0, le=1)


class PlainClassifier:
    """The seed's pipeline on this project's model entry: Pillow decode, resize to the input size
    (no aspect-preserving crop), scale to [0, 1], normalise, one `predict_batch` at batch 1,
    softmax, top class."""

    def __init__(self, entry: ModelEntry, *, threads: int):
        self.entry = entry
        spec = entry.config.input
        self.height, self.width = spec.size
        self.mean = np.asarray(spec.mean, dtype=np.float32).reshape(1, 1, 3)
        self.std = np.asarray(spec.std, dtype=np.float32).reshape(1, 1, 3)
        self.labels = entry.labels
        self.runtime = OnnxRuntime(entry, threads=threads, allow_spinning=False)

    def load(self) -> None:
        """Create the ONNX Runtime session and run it once."""
        self.runtime.load()
        self.runtime.warmup()

    def preprocess(self, data: bytes) -> np.ndarray:
        """Encoded image -> float32 (1, 3, H, W)."""
        image = Image.open(io.BytesIO(data)).convert("RGB")
        resized = image.resize((self.width, self.height), Image.Resampling.BILINEAR)
        pixels = np.asarray(resized, dtype=np.float32) / 255.0
        normalised = (pixels - self.mean) / self.std
        return np.ascontiguousarray(normalised.transpose(2, 0, 1)[np.newaxis])

    def classify(self, data: bytes) -> tuple[str, float]:
        """The top class of one encoded image and its probability."""
        scores = self.runtime.predict_batch(self.preprocess(data))[0].astype(np.float64)
        exp = np.exp(scores - scores.max())
        probabilities = exp / exp.sum()
        best = int(np.argmax(probabilities))
        return self.labels[best], float(probabilities[best])


def create_baseline_app(classifier: PlainClassifier) -> FastAPI:
    """The seed's app around a loaded `classifier`."""
    app = FastAPI(title="seed 004 plain endpoint (baseline)", version="1.0.0")

    @app.post("/predict", response_model=PredictionResponse)
    def predict(request: ImageRequest) -> PredictionResponse:  # a sync def, as in the seed
        try:
            data = base64.b64decode(request.image, validate=True)
            label, probability = classifier.classify(data)
        except (binascii.Error, OSError, ValueError) as exc:
            # NOTE: the seed answers 200 with {"error": ...}; a 400 keeps failures countable.
            raise HTTPException(
                status_code=400, detail="the image is not a base64 image Pillow can open"
            ) from exc
        return PredictionResponse(prediction=label, probability=probability)

    @app.get("/health/ready")
    def ready() -> dict[str, str]:
        return {"status": "ready"}

    return app


def build_parser() -> argparse.ArgumentParser:
    """The command line's options."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.baseline",
        description="Serve the naive reference endpoint of seed 004 (POST /predict, batch 1, no "
        "batcher) for a model of the repository, on ONNX Runtime.",
    )
    parser.add_argument("--model-repository", type=Path, default=Path("model_repository"))
    parser.add_argument(
        "--model", default="efficientnet_lite0", help="model name (default efficientnet_lite0)"
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8010, help="0 picks a free port (default 8010)")
    parser.add_argument("--threads", type=int, help="intra-op threads (default: the usable cores)")
    return parser


class _StopSignal(Exception):  # noqa: N818 - a signal, not an error
    pass


def _stop(signum: int, frame: object) -> None:
    raise _StopSignal


def main(argv: Sequence[str] | None = None) -> int:
    """Load the model, print `... on http://HOST:PORT`, serve until SIGTERM/Ctrl-C."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    if args.threads is not None and args.threads < 1:
        print("--threads must be at least 1", file=sys.stderr)
        return 2
    try:
        entry = ModelRepository(args.model_repository).get(args.model)
        classifier = PlainClassifier(entry, threads=args.threads or available_cpus())
        classifier.load()
        family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((args.host, args.port))
    except (ConfigurationError, OSError) as exc:
        print(f"baseline: cannot start: {exc}", file=sys.stderr)
        return 2
    config = uvicorn.Config(
        create_baseline_app(classifier), log_config=None, log_level="warning", access_log=False
    )
    server = uvicorn.Server(config)
    port = sock.getsockname()[1]
    threads = classifier.runtime.threads
    print(
        f"\n{BANNER_TITLE}: onnx, model {entry.name}, {threads} intra-op threads, no spinning) "
        f"on http://{args.host}:{port}\n",
        flush=True,
    )
    # NOTE: uvicorn re-raises SIGTERM after its graceful shutdown; this turns it into exit 0.
    previous = signal.signal(signal.SIGTERM, _stop)
    try:
        server.run(sockets=[sock])
    except (KeyboardInterrupt, _StopSignal):
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`python -m grpc_server.client IMAGE...`: a small command-line client of visionserve.v1.Inference.

    python -m grpc_server.client photo.jpg other.png          # one Predict per image
    python -m grpc_server.client *.jpg --batch                # one PredictBatch with all of them
    python -m grpc_server.client clip.gif --stream --every 2  # the frames of a GIF (or a folder,
                                                              # or several files) as one stream
    python -m grpc_server.client street.jpg --model yolo11n --score-threshold 0.5   # a detector
    python -m grpc_server.client group.jpg --model face_expression --max-faces 8   # faces
    python -m grpc_server.client clip.gif --live --model yolo11n   # live: stale frames skipped

The target is `--target`, else VISION_GRPC_TARGET, else 127.0.0.1:50051. Exit status: 0; 1 when the
server answered with an error (its status code and details are printed) or an image, batch slot or
frame failed; 2 when an input cannot be read.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import sys
import time
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc
from PIL import Image, ImageSequence

from visionserve.v1 import inference_pb2 as pb
from visionserve.v1 import inference_pb2_grpc as pb_grpc

DEFAULT_TARGET = "127.0.0.1:50051"
MAX_MESSAGE_BYTES = 32 * 1024 * 1024
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"}
SINGLE_CALL_TIMEOUT_S = 30.0


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m grpc_server.client",
        description="Classify images, or find the objects in them, with a visionserve gRPC server.",
    )
    parser.add_argument(
        "images", nargs="+", type=Path, metavar="IMAGE", help="image files, or folders of them"
    )
    parser.add_argument("--model", default="", help="the model to use (default: the server's default)")
    parser.add_argument(
        "--topk", type=int, help="a classifier's classes per image (default: the server's, 5)"
    )
    parser.add_argument("--score-threshold", type=float, help="a detector's lowest score kept")
    parser.add_argument("--classes", help="a detector's classes to keep, comma-separated labels")
    parser.add_argument("--min-face-size", type=float, help="face_expression: smallest face kept, in pixels")
    parser.add_argument("--max-faces", type=int, help="face_expression: most faces per image")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--batch", action="store_true", help="one PredictBatch call with every image")
    mode.add_argument("--stream", action="store_true", help="the inputs' frames as one PredictStream")
    mode.add_argument(
        "--live", action="store_true", help="the frames as one PredictLive: stale frames are skipped"
    )
    parser.add_argument("--every", type=int, default=1, metavar="N", help="--stream: send every Nth frame")
    parser.add_argument(
        "--target",
        default=os.environ.get("VISION_GRPC_TARGET", DEFAULT_TARGET),
        help=f"host:port (default: VISION_GRPC_TARGET or {DEFAULT_TARGET})",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        help=f"seconds per call (default {SINGLE_CALL_TIMEOUT_S:g}; none for --stream)",
    )
    parser.add_argument(
        "--api-key",
        default=os.environ.get("VISION_API_KEY") or None,
        help="the server's API key, sent as 'authorization: Bearer' metadata (default: VISION_API_KEY)",
    )
    parser.add_argument("--tls", action="store_true", help="connect over TLS (the system's trusted CAs)")
    parser.add_argument(
        "--tls-ca",
        type=Path,
        metavar="PEM",
        help="connect over TLS trusting these certificates (implies --tls)",
    )
    args = parser.parse_args(argv)
    args.metadata = (("authorization", f"Bearer {args.api_key}"),) if args.api_key else None
    if args.every < 1:
        parser.error("--every must be at least 1")
    if args.topk is not None and args.topk < 1:
        parser.error("--topk must be at least 1")
    args.streaming = args.stream or args.live
    return args


def task_fields(args: argparse.Namespace) -> dict[str, Any]:
    """The request fields of the model and its task's parameters given on the command line."""
    fields: dict[str, Any] = {"model": args.model, "topk": args.topk or 0}
    if args.score_threshold is not None:
        fields["score_threshold"] = args.score_threshold
    if args.min_face_size is not None:
        fields["min_face_size"] = args.min_face_size
    if args.max_faces is not None:
        fields["max_faces"] = args.max_faces
    if args.classes:
        fields["classes"] = [name.strip() for name in args.classes.split(",") if name.strip()]
    return fields


def expand(paths: Iterable[Path]) -> Iterator[Path]:
    """Files as given; a folder as its image files, sorted by name."""
    for path in paths:
        if path.is_dir():
            yield from (p for p in sorted(path.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES)
        else:
            yield path


def frames(paths: Iterable[Path]) -> Iterator[bytes]:
    """Encoded frames of the inputs, in order: a folder's images sorted by name, every frame of an
    animated image (re-encoded as PNG), other files as they are."""
    for path in expand(paths):
        data = path.read_bytes()
        try:
            with Image.open(io.BytesIO(data)) as image:
                if getattr(image, "n_frames", 1) > 1:
                    for frame in ImageSequence.Iterator(image):
                        buffer = io.BytesIO()
                        frame.convert("RGB").save(buffer, format="PNG")
                        yield buffer.getvalue()
                    continue
        except OSError:
            pass  # not an image Pillow knows: sent as is, the server says what is wrong with it
        yield data


def describe(predictions: Iterable[pb.Prediction]) -> str:
    return ", ".join(f"{p.label}:{p.prob:.3f}" for p in predictions)


def describe_objects(detections: Sequence[pb.Detection]) -> str:
    """`label:score [x1,y1,x2,y2], ...`, or a word when nothing was found."""
    if not detections:
        return "no objects"
    return ", ".join(
        f"{d.label}:{d.score:.3f} [{d.box.x1:.0f},{d.box.y1:.0f},{d.box.x2:.0f},{d.box.y2:.0f}]"
        for d in detections
    )


def describe_faces(faces: Sequence[pb.Face]) -> str:
    """`top:probability [x1,y1,x2,y2], ...` per face, or a word when there is none."""
    if not faces:
        return "no faces"
    return ", ".join(
        f"{f.top}:{getattr(f.expression, f.top):.3f} "
        f"[{f.box.x1:.0f},{f.box.y1:.0f},{f.box.x2:.0f},{f.box.y2:.0f}]"
        for f in faces
    )


def answer_text(answer: pb.PredictResponse | pb.FramePrediction) -> str:
    """What a classifier's, a detector's or the face pipeline's answer says."""
    if answer.task == "detection":
        return describe_objects(answer.detections)
    if answer.task == "face_expression":
        return describe_faces(answer.faces)
    return describe(answer.topk)


def show_result(name: str, result: pb.PredictResponse) -> None:
    print(f"{name}  {answer_text(result)}  (server {result.latency_ms:.1f} ms)")


def show_error(name: str, error: pb.Error) -> None:
    print(f"{name}  error {error.code}: {error.message}")


async def predict_each(stub: pb_grpc.InferenceStub, args: argparse.Namespace) -> int:
    for path in args.images:
        image = path.read_bytes()
        reply = await stub.Predict(
            pb.PredictRequest(image=image, **task_fields(args)), timeout=args.timeout, metadata=args.metadata
        )
        show_result(path.name, reply)
    return 0


async def predict_batch(stub: pb_grpc.InferenceStub, args: argparse.Namespace) -> int:
    request = pb.PredictBatchRequest(images=[p.read_bytes() for p in args.images], **task_fields(args))
    reply = await stub.PredictBatch(request, timeout=args.timeout, metadata=args.metadata)
    for path, slot in zip(args.images, reply.results, strict=True):
        if slot.HasField("error"):
            show_error(path.name, slot.error)
        else:
            show_result(path.name, slot.result)
    return 1 if any(slot.HasField("error") for slot in reply.results) else 0


async def predict_stream(stub: pb_grpc.InferenceStub, args: argparse.Namespace) -> int:
    fields = task_fields(args)

    async def requests() -> AsyncIterator[pb.Frame]:
        for frame_id, image in enumerate(frames(args.images)):
            if frame_id % args.every == 0:
                yield pb.Frame(image=image, frame_id=frame_id, **fields)

    answered = failed = skipped = 0
    started = time.perf_counter()
    call = stub.PredictLive if args.live else stub.PredictStream
    async for answer in call(requests(), timeout=args.timeout, metadata=args.metadata):
        answered += 1
        if answer.HasField("error"):
            failed += 1
            show_error(f"frame {answer.frame_id}", answer.error)
        elif answer.skipped:
            skipped += 1
            print(f"frame {answer.frame_id}  skipped (a newer frame was computed)")
        else:
            print(f"frame {answer.frame_id}  {answer_text(answer)}  (server {answer.latency_ms:.1f} ms)")
    elapsed = time.perf_counter() - started
    rate = (answered - skipped) / elapsed if elapsed > 0 else 0.0
    print(
        f"{answered} frames ({failed} failed, {skipped} skipped) in {elapsed:.2f} s: "
        f"{rate:.1f} frames/s computed"
    )
    return 1 if failed else 0


async def run(args: argparse.Namespace) -> int:
    """One call (or one per image) to `args.target`; the exit status."""
    for path in args.images:
        path.stat()  # a missing input fails here, before any call
    if not args.streaming:
        args.images = list(expand(args.images))
        if not args.images:
            print("error: no image files in the folders given", file=sys.stderr)
            return 2
    if args.timeout is None and not args.streaming:
        args.timeout = SINGLE_CALL_TIMEOUT_S
    call = predict_stream if args.streaming else predict_batch if args.batch else predict_each
    if args.tls or args.tls_ca:
        roots = args.tls_ca.read_bytes() if args.tls_ca else None
        credentials = grpc.ssl_channel_credentials(root_certificates=roots)
        channel = grpc.aio.secure_channel(args.target, credentials, options=CHANNEL_OPTIONS)
    else:
        channel = grpc.aio.insecure_channel(args.target, options=CHANNEL_OPTIONS)
    async with channel:
        return await call(pb_grpc.InferenceStub(channel), args)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return asyncio.run(run(args))
    except grpc.aio.AioRpcError as exc:
        print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"error: cannot read {exc.filename or 'an input'}: {exc.strerror or exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

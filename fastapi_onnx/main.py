"""ONNX Runtime-backed HTTP service: `python -m fastapi_onnx.main` (settings: VISION_* env)."""

import sys

from visionserve.http.server import serve


def main() -> int:
    """Serve the configured model on ONNX Runtime."""
    return serve("onnx")


if __name__ == "__main__":
    sys.exit(main())

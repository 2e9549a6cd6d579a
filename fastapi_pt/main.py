"""PyTorch-backed HTTP service: `python -m fastapi_pt.main` (settings: VISION_* env)."""

import sys

from visionserve.http.server import serve


def main() -> int:
    """Serve the configured model on PyTorch."""
    return serve("torch")


if __name__ == "__main__":
    sys.exit(main())

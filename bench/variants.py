"""The model repository a run serves: `--model-repository` itself when it holds every model the
run names; otherwise a repository of the run's own, `OUTPUT/repository/`, that links to the
entries `--model-repository` has (a pipeline's stages too) and holds the ones the harness exported.

A name the repository lacks can be exported when it is an embedded detector at another input
size, `<detector>_<size>` (`yolo11n_320`): `python -m export --model yolo11n --input-size 320
--name yolo11n_320 --repository OUTPUT/repository` (about 15 s here, the parity check on real
photos included). The export stays there, so the next run with the same `--output` reuses it; a
model the repository holds under that name is measured as it is.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from visionserve.repository import ModelRepository

EXPORTABLE = {"yolo11n": (320, 480, 640)}
"""Embedded detectors `python -m export --model NAME` can make, and the letterbox sizes it takes."""
_VARIANT = re.compile(r"^(?P<base>[a-z0-9]+)_(?P<size>\d+)$")
_SOURCE_ROOT = Path(__file__).resolve().parent.parent

Exporter = Callable[["Variant", Path, Path], None]


class ExportError(RuntimeError):
    """A model the run needs could not be exported; the message ends with the export's log."""


"""Exports a variant into a repository, writing its log to a file: (variant, repository, log)."""


@dataclass(frozen=True)
class Variant:
    """An embedded detector exported at another input size, under its own name."""

    name: str
    base: str
    size: int

    def command(self, repository: Path) -> list[str]:
        """The export's command line."""
        return [
            sys.executable,
            "-m",
            "export",
            "--model",
            self.base,
            "--input-size",
            str(self.size),
            "--name",
            self.name,
            "--repository",
            str(repository),
        ]


def parse_variant(name: str) -> Variant | None:
    """`yolo11n_320` -> the variant; None for a name that is not one the harness can export."""
    match = _VARIANT.match(name)
    if match is None or match["base"] not in EXPORTABLE:
        return None
    size = int(match["size"])
    return Variant(name, match["base"], size) if size in EXPORTABLE[match["base"]] else None


def run_export(variant: Variant, repository: Path, log: Path) -> None:
    """Export `variant` into `repository` with `python -m export`; ExportError quoting the end of
    its log when it fails."""
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(_SOURCE_ROOT), os.environ.get("PYTHONPATH")])),
    }
    with log.open("wb") as out:
        status = subprocess.run(
            variant.command(repository),
            cwd=_SOURCE_ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            check=False,
        ).returncode
    if status != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
        raise ExportError(f"exporting {variant.name} failed (exit {status}); last lines of {log}:\n{tail}")


def prepare_repository(
    repository: Path,
    names: Sequence[str],
    workdir: Path,
    *,
    note: Callable[[str], None],
    exporter: Exporter = run_export,
) -> Path:
    """The repository that holds every model of `names`: `repository` when it does; else
    `workdir/repository`, with links to `repository`'s entries and the missing variants exported
    into it (kept from an earlier run when there). ValueError naming a model that is neither in
    `repository` nor exportable."""
    present = set(ModelRepository(repository).names()) if repository.is_dir() else set()
    missing = [name for name in names if name not in present]
    if not missing:
        return repository
    variants = {name: parse_variant(name) for name in missing}
    unknown = [name for name, variant in variants.items() if variant is None]
    if unknown:
        exportable = ", ".join(f"{base}_{size}" for base, sizes in EXPORTABLE.items() for size in sizes)
        raise ValueError(
            f"no model {', '.join(unknown)} in {repository} (it has {', '.join(sorted(present)) or 'none'}); "
            f"export it (python -m export), or name one the harness exports itself: {exportable}"
        )
    own = workdir / "repository"
    own.mkdir(parents=True, exist_ok=True)
    source = ModelRepository(repository)
    linked = list(names)
    for name in names:  # a pipeline's stages are served with it: linked too
        if name in present and source.is_pipeline(name):
            stages = source.get_pipeline(name).config.stages
            linked += [stages.detector, stages.classifier]
    for name in dict.fromkeys(linked):
        if name in present:
            link = own / name
            if link.is_symlink() or link.exists():
                if link.is_symlink() and link.resolve() == (repository / name).resolve():
                    continue
                if not link.is_symlink():
                    raise ValueError(f"{link} is in the way of a link to {repository / name}: remove it")
                link.unlink()
            link.symlink_to((repository / name).resolve(), target_is_directory=True)
    for name, variant in variants.items():
        assert variant is not None
        if (own / name / "config.json").is_file():
            note(f"{name}: exported by an earlier run, in {own}")
            continue
        note(f"{name}: not in {repository}; exporting it into {own} ({' '.join(variant.command(own)[1:])})")
        started = time.monotonic()
        exporter(variant, own, workdir / f"export-{name}.log")
        note(f"{name}: exported in {time.monotonic() - started:.0f} s")
    return own

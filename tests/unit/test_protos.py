"""The committed gRPC stubs (visionserve/v1/, visionserve/v2/) are exactly what `make protos`
generates from protos/."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import ROOT


@dataclass(frozen=True)
class Stubs:
    """One .proto (under protos/), the include mapping `make protos` compiles it with, and where
    its stubs are committed."""

    proto: str
    include: str
    folder: str
    stem: str

    def generated(self) -> tuple[str, str, str]:
        return (f"{self.stem}_pb2.py", f"{self.stem}_pb2.pyi", f"{self.stem}_pb2_grpc.py")


STUBS = (
    Stubs("visionserve/v1/inference.proto", "protos", "visionserve/v1", "inference"),
    Stubs(
        "inference/grpc_service.proto", "visionserve/v2=protos/inference", "visionserve/v2", "grpc_service"
    ),
    *(
        Stubs(f"seeds/{stem}.proto", "visionserve/seeds=protos/seeds", "visionserve/seeds", stem)
        for stem in ("classify", "inference", "protobuf")
    ),
)


@pytest.fixture(scope="module", params=STUBS, ids=lambda stubs: stubs.proto)
def generated(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Stubs, Path]:
    """The stubs freshly generated, as `make protos` does, into a temporary folder."""
    stubs: Stubs = request.param
    out = tmp_path_factory.mktemp("protos")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{stubs.include}",
            f"--python_out={out}",
            f"--pyi_out={out}",
            f"--grpc_python_out={out}",
            f"protos/{stubs.proto}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, f"protoc failed:\n{result.stdout}{result.stderr}"
    return stubs, out / stubs.folder


def test_committed_stubs_match_the_proto(generated: tuple[Stubs, Path]) -> None:
    stubs, folder = generated
    for name in stubs.generated():
        fresh = (folder / name).read_bytes()
        committed_path = ROOT / stubs.folder / name
        assert committed_path.is_file(), f"{stubs.folder}/{name} is missing: run `make protos`"
        assert committed_path.read_bytes() == fresh, (
            f"{stubs.folder}/{name} differs from what protos/{stubs.proto} generates: run `make protos` "
            "and commit the result"
        )


def test_every_proto_is_checked() -> None:
    """`make protos` and this test compile these files; another .proto would go unchecked."""
    protos = sorted(str(p.relative_to(ROOT / "protos")) for p in (ROOT / "protos").rglob("*.proto"))
    assert protos == sorted(stubs.proto for stubs in STUBS), (
        f"new .proto files {protos}: add them to `make protos` and to this test"
    )

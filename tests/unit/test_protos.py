"""The committed gRPC stubs (visionserve/v1/) are exactly what `make protos` generates from protos/."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

PROTO = "visionserve/v1/inference.proto"
GENERATED = ("inference_pb2.py", "inference_pb2.pyi", "inference_pb2_grpc.py")


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The stubs freshly generated, as `make protos` does, into a temporary folder."""
    out = tmp_path_factory.mktemp("protos")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            "-Iprotos",
            f"--python_out={out}",
            f"--pyi_out={out}",
            f"--grpc_python_out={out}",
            f"protos/{PROTO}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, f"protoc failed:\n{result.stdout}{result.stderr}"
    return out / "visionserve" / "v1"


@pytest.mark.parametrize("name", GENERATED)
def test_committed_stubs_match_the_proto(generated: Path, name: str) -> None:
    fresh = (generated / name).read_bytes()
    committed_path = ROOT / "visionserve" / "v1" / name
    assert committed_path.is_file(), f"visionserve/v1/{name} is missing: run `make protos`"
    assert committed_path.read_bytes() == fresh, (
        f"visionserve/v1/{name} differs from what protos/{PROTO} generates: run `make protos` "
        "and commit the result"
    )


def test_every_proto_is_checked() -> None:
    """`make protos` and this test compile one file; a second .proto would go unchecked."""
    protos = sorted(str(p.relative_to(ROOT / "protos")) for p in (ROOT / "protos").rglob("*.proto"))
    assert protos == [PROTO], f"new .proto files {protos}: add them to `make protos` and to this test"

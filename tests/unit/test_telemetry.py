"""ONNX Runtime's telemetry stays off in every process that serves through visionserve."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT


def _run(home: Path, code: str, **env: str) -> None:
    clean = {k: v for k, v in os.environ.items() if k != "ORT_DISABLE_TELEMETRY"}
    # ONNX Runtime writes under $XDG_CACHE_HOME when it is set (the CI runner sets it), else under
    # $HOME/.cache: both point into the test's directory, so what it writes is seen wherever it runs
    done = subprocess.run(
        [sys.executable, "-c", code],
        check=False,
        cwd=ROOT,
        env={**clean, "HOME": str(home), "XDG_CACHE_HOME": str(home / ".cache"), **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr


SESSION = (
    "import onnxruntime as ort, onnx, io\n"
    "from onnx import helper, TensorProto\n"
    "g = helper.make_graph([helper.make_node('Relu', ['x'], ['y'])], 'g',\n"
    "    [helper.make_tensor_value_info('x', TensorProto.FLOAT, [1])],\n"
    "    [helper.make_tensor_value_info('y', TensorProto.FLOAT, [1])])\n"
    "m = helper.make_model(g, opset_imports=[helper.make_opsetid('', 18)]); m.ir_version = 9\n"
    "ort.InferenceSession(m.SerializeToString(), providers=['CPUExecutionProvider'])\n"
)


def _telemetry_files(home: Path) -> list[Path]:
    return [p for p in home.rglob("*") if p.is_file()]


def test_importing_visionserve_first_keeps_onnx_runtime_from_writing_telemetry(tmp_path: Path) -> None:
    off, default = tmp_path / "off", tmp_path / "default"
    off.mkdir()
    default.mkdir()
    _run(off, "import visionserve\n" + SESSION)
    assert _telemetry_files(off) == []
    # the control: without visionserve (and with the user's explicit 0) ONNX Runtime writes them
    _run(default, SESSION, ORT_DISABLE_TELEMETRY="0")
    assert _telemetry_files(default), "ONNX Runtime wrote nothing: the test proves nothing here"

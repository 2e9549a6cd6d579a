"""ONNX Runtime's telemetry stays off in every process that serves through visionserve."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

# ONNX Runtime 1.31 turns its telemetry off by itself when the environment names a CI service (the
# names below are read from its library; CI=true, TF_BUILD and JENKINS_URL were each measured to stop
# it). The project's CI runner is one such environment: the control wrote nothing there. They are
# removed so that the control is a control wherever the suite runs.
CI_MARKERS = {
    "CI",
    "TF_BUILD",
    "GITHUB_ACTIONS",
    "GITLAB_CI",
    "CIRCLECI",
    "TRAVIS",
    "JENKINS_URL",
    "CODEBUILD_BUILD_ID",
    "BUILDKITE",
    "TEAMCITY_VERSION",
    "APPVEYOR",
    "BITBUCKET_BUILD_NUMBER",
}


def _python(code: str, env: dict[str, str]) -> str:
    """`code` in a fresh interpreter with this environment, less the CI markers and the user's
    ORT_DISABLE_TELEMETRY, plus `env`; its standard output."""
    dropped = CI_MARKERS | {"ORT_DISABLE_TELEMETRY"}
    clean = {k: v for k, v in os.environ.items() if k not in dropped}
    done = subprocess.run(
        [sys.executable, "-c", code],
        check=False,
        cwd=ROOT,
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def _run(home: Path, code: str, **env: str) -> None:
    # ONNX Runtime writes under $XDG_CACHE_HOME when it is set (the CI runner sets it), else under
    # $HOME/.cache: both point into the test's directory, so what it writes is seen wherever it runs
    _python(code, {"HOME": str(home), "XDG_CACHE_HOME": str(home / ".cache"), **env})


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
    # the control first: without visionserve (and with the user's explicit 0) ONNX Runtime writes them
    _run(default, SESSION, ORT_DISABLE_TELEMETRY="0")
    if not _telemetry_files(default):
        # some environments turn ORT's telemetry off by other means than the CI markers removed
        # above; the setting itself is still checked by the next test
        pytest.skip("ONNX Runtime wrote no telemetry here even at its default: nothing to switch off")
    _run(off, "import visionserve\n" + SESSION)
    assert _telemetry_files(off) == []


def test_importing_visionserve_sets_the_switch_and_keeps_the_users_own_value() -> None:
    show = "import os, visionserve, onnxruntime\nprint(os.environ['ORT_DISABLE_TELEMETRY'])\n"
    for given, expected in ((None, "1"), ("0", "0"), ("1", "1")):
        env = {} if given is None else {"ORT_DISABLE_TELEMETRY": given}
        assert _python(show, env).strip() == expected, given

"""The benchmark notebooks (`notebooks/*.ipynb`) run headless with nbclient, end to end, against
servers this test starts (the real deployables on free ports, standing in for `make run`), with a
few requests per row; any cell error fails the test, and each notebook must draw its figures.
The committed notebooks carry no outputs."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from bench.servers import GrpcServerProcess, ServerProcess, model_env
from tests.conftest import ROOT
from visionserve.settings import ModelSettings

NOTEBOOKS = ROOT / "notebooks"
NAMES = ("01_latency.ipynb", "02_concurrency.ipynb", "03_export_and_parity.ipynb")
CELL_TIMEOUT_S = 240
TINY = {"VISION_BENCH_REQUESTS": "4", "VISION_BENCH_WARMUP": "1", "VISION_TORCH_COMPILE": "false"}
"""What every run here shares: a few requests per row, one warm-up request, PyTorch eager."""


def test_the_notebooks_are_committed_without_outputs() -> None:
    assert sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")) == sorted(NAMES)
    for name in NAMES:
        notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
        nbformat.validate(notebook)
        for number, cell in enumerate(notebook.cells):
            if cell.cell_type == "code":
                assert cell.outputs == [] and cell.execution_count is None, (
                    f"{name} cell {number} has outputs: clear them before committing "
                    f"(.venv/bin/jupyter nbconvert --clear-output --inplace notebooks/{name})"
                )


def _pins(name: str) -> dict[str, str]:
    found = {}
    for line in (ROOT / "requirements" / name).read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9_.\-]+)(\[[^\]]*\])?==(\S+)", line)
        if match:
            found[match.group(1).lower()] = match.group(3)
    return found


def test_the_notebook_requirements_pin_what_dev_pins_alike() -> None:
    notebooks, dev = _pins("notebooks.txt"), _pins("dev.txt")
    assert "jupyterlab" in notebooks and "jupyterlab" not in dev  # JupyterLab: `make notebooks` only
    shared = set(notebooks) & set(dev)
    assert {"ipykernel", "pandas", "matplotlib"} <= shared
    assert {name: notebooks[name] for name in shared} == {name: dev[name] for name in shared}


@dataclass(frozen=True)
class Deployment:
    """The addresses a notebook is given, as the `make run` defaults would be."""

    url: str
    grpc_target: str
    grpc_metrics_url: str


@pytest.fixture(scope="module")
def deployment(real_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    """The HTTP and gRPC deployables (ONNX Runtime, one thread) as processes on free ports."""
    logs = tmp_path_factory.mktemp("deployment")
    env = model_env(ModelSettings(backend="onnx", model_repository=real_repository, threads=1))
    http = ServerProcess("onnx", env=env, log_path=logs / "http.log")
    grpc = GrpcServerProcess("onnx", env=env, log_path=logs / "grpc.log")
    with contextlib.ExitStack() as stack:
        for process in (http, grpc):
            stack.callback(process.stop)
            process.launch()
        http.wait_until_ready()
        grpc.wait_until_ready()
        assert grpc.metrics_url is not None
        yield Deployment(http.base_url, grpc.address, grpc.metrics_url)


def execute(
    name: str, env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> nbformat.NotebookNode:
    """Run every cell of `notebooks/name` in a fresh kernel whose environment has `env` (the
    project importable, as `make notebooks` makes it), in `tmp_path`; return the executed notebook.
    A cell error raises nbclient's CellExecutionError with the cell and its traceback."""
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    client = NotebookClient(
        notebook,
        timeout=CELL_TIMEOUT_S,
        kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},
    )
    client.execute()
    return notebook


def figures(notebook: nbformat.NotebookNode) -> int:
    """PNG images the notebook's cells displayed."""
    return sum(
        "image/png" in output.get("data", {})
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.outputs
    )


def text(notebook: nbformat.NotebookNode) -> str:
    """Everything the cells printed or displayed as text."""
    parts = []
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            parts.append(output.get("text", ""))
            parts.append(output.get("data", {}).get("text/plain", ""))
    return "\n".join(parts)


def deployment_env(deployment: Deployment, real_repository: Path) -> dict[str, str]:
    return {
        **TINY,
        "VISION_API_URL": deployment.url,
        "VISION_GRPC_TARGET": deployment.grpc_target,
        "VISION_GRPC_METRICS_URL": deployment.grpc_metrics_url,
        "VISION_MODEL_REPOSITORY": str(real_repository),
    }


@pytest.mark.slow
@pytest.mark.real_model
def test_the_latency_notebook_measures_the_deployment_and_both_runtimes(
    deployment: Deployment, real_repository: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = {**deployment_env(deployment, real_repository), "VISION_BENCH_BACKENDS": "onnx,torch"}
    notebook = execute("01_latency.ipynb", env, tmp_path, monkeypatch)
    assert figures(notebook) == 2  # percentiles, histograms
    shown = text(notebook)
    for expected in ("deployment", "harness", "torch eager", "in-process", "Inference/Predict (unary)"):
        assert expected in shown, expected
    assert "batching as deployed" in shown  # the deployment's rows


@pytest.mark.slow
@pytest.mark.real_model
def test_the_concurrency_notebook_sweeps_with_batching_on_and_off(
    deployment: Deployment, real_repository: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = {**deployment_env(deployment, real_repository), "VISION_BENCH_CONCURRENCY": "1,2"}
    notebook = execute("02_concurrency.ipynb", env, tmp_path, monkeypatch)
    assert figures(notebook) == 3  # throughput and p99, queueing delay, batch sizes
    shown = text(notebook)
    for expected in ("batching as deployed", "batching on", "batching off", "throughput.png"):
        assert expected in shown, expected


@pytest.mark.slow
def test_the_export_notebook_exports_and_compares_the_runtimes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    labels = tmp_path / "labels.txt"
    labels.write_text("red\ngreen\nblue\nother\n")
    # NOTE: the tiny test model exports in seconds; the embedded default (the notebook's default)
    # takes ~25 s, and `make test` exports it before the tests anyway
    args = f"--factory tests.integration.tiny_models:tiny --labels {labels} --input-size 64 --name tiny"
    notebook = execute(
        "03_export_and_parity.ipynb", {**TINY, "VISION_EXPORT_ARGS": args}, tmp_path, monkeypatch
    )
    assert figures(notebook) == 2  # probabilities onnx vs torch, the photos with their top-k
    shown = text(notebook)
    assert "top-4 identical: True" in shown and "passed: True" in shown
    assert "chelsea.png" in shown

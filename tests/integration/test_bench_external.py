"""`python -m bench --url ... --grpc-target ...`: the harness measures a deployment it
did not start. The deployments are real servers on 127.0.0.1, port 0, started here: the HTTP app
under uvicorn and the grpc.aio `GrpcServer`, each in a thread, over fake runtimes (fast, and able
to never get ready); and, for the in-process rows, the real deployables as processes
(`ServerProcess`, `GrpcServerProcess`) on the real model."""

from __future__ import annotations

import asyncio
import contextlib
import csv
import json
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import uvicorn

from bench import BenchConfig, run_benchmark
from bench.__main__ import main
from bench.csvfile import COLUMNS
from bench.servers import GrpcServerProcess, ServerProcess, model_env
from grpc_server.server import GrpcServer
from tests.fixtures import FailingRuntime, FakeRuntime, app_of, grpc_server_of, write_fake_entry
from tests.tls import Tls, make_tls
from visionserve.repository import ModelEntry
from visionserve.runtimes.base import ModelRuntime
from visionserve.settings import GrpcSettings, ModelSettings, SecuritySettings, ServerSettings

REQUESTS = 6
LEVELS = (1, 2)
SHORT = ["--requests", str(REQUESTS), "--warmup", "1", "--rounds", "2", "--progress", "lines"]
NO_LOCAL_MODEL = "in-process limit: not measured (no local model repository)"


class DeployedFake(FakeRuntime):
    """A fake that says it is ONNX Runtime, as a real deployment would (GET /models)."""

    backend = "onnx"

    def predict_batch(self, batch: np.ndarray) -> np.ndarray:
        time.sleep(0.001)  # long enough for concurrent requests to share a batch now and then
        return super().predict_batch(batch)


class NeverReady(FailingRuntime):
    """Fails to load: the server answers, and is never ready."""

    backend = "onnx"

    def __init__(self, model: ModelEntry):
        super().__init__(model, fail_on_load=True)


@contextlib.contextmanager
def http_deployment(
    runtime: ModelRuntime, *, api_key: str | None = None, tls: Tls | None = None
) -> Iterator[str]:
    """The HTTP app over `runtime` under uvicorn in a thread, on 127.0.0.1 port 0 (with the API
    key on and HTTPS, if given); yields its URL once it listens (not waiting for the model: the
    harness must do that)."""
    app = app_of(ServerSettings(preprocess_workers=1), runtime, api_key=api_key)
    files = {} if tls is None else {"ssl_certfile": str(tls.cert_file), "ssl_keyfile": str(tls.key_file)}
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=0, log_config=None, lifespan="on", **files)  # type: ignore[arg-type]
    )
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.01)
        scheme = "http" if tls is None else "https"
        yield f"{scheme}://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@dataclass(frozen=True)
class GrpcDeployment:
    """A started gRPC server: `host:port` and its metrics URL."""

    target: str
    metrics_url: str


@contextlib.contextmanager
def grpc_deployment(
    runtime: ModelRuntime, *, api_key: str | None = None, tls: Tls | None = None
) -> Iterator[GrpcDeployment]:
    """`GrpcServer` over `runtime` on an event loop of its own in a thread, on 127.0.0.1 port 0
    (metrics too; with the API key on and TLS, if given); yields once it listens (loading in the
    background, as deployed)."""
    security = SecuritySettings(
        api_key=api_key,
        tls_cert_file=None if tls is None else tls.cert_file,
        tls_key_file=None if tls is None else tls.key_file,
    )
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="grpc-loop", daemon=True)
    thread.start()

    async def start() -> GrpcServer:
        # NOTE: built on its loop: grpc.aio binds a server to the loop it is created on
        server = grpc_server_of(
            GrpcSettings(host="127.0.0.1", port=0, metrics_port=0),
            ServerSettings(preprocess_workers=1),
            runtime,
            security=security,
        )
        await server.start()
        return server

    server: GrpcServer | None = None
    try:
        server = asyncio.run_coroutine_threadsafe(start(), loop).result(timeout=30)
        scheme = "http" if tls is None else "https"
        yield GrpcDeployment(
            f"127.0.0.1:{server.port}", f"{scheme}://127.0.0.1:{server.metrics_port}/metrics"
        )
    finally:
        if server is not None:
            asyncio.run_coroutine_threadsafe(_stop(server), loop).result(timeout=30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=30)
        loop.close()


async def _stop(server: GrpcServer) -> None:
    loaded = server.loaded
    if loaded is not None and loaded.done() and not loaded.cancelled():
        loaded.exception()  # a failed load is what some tests want: seen here, not logged at exit
    await server.stop(grace_s=1)


@pytest.fixture
def fake_deployment(tmp_path: Path) -> Iterator[tuple[str, GrpcDeployment]]:
    """A deployment of the fake model: (HTTP URL, gRPC server)."""
    entry = write_fake_entry(tmp_path / "deployed")
    with http_deployment(DeployedFake(entry)) as url, grpc_deployment(DeployedFake(entry)) as grpc:
        yield url, grpc


def _results(output: Path) -> tuple[dict[str, object], list[dict[str, object]], list[dict[str, str]]]:
    data = json.loads((output / "bench.json").read_text())
    with (output / "bench.csv").open(newline="") as file:
        records = list(csv.DictReader(file))
    return data, data["results"], records


def test_a_deployment_is_measured_at_every_level_with_its_server_figures(
    fake_deployment: tuple[str, GrpcDeployment], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url, grpc = fake_deployment
    output = tmp_path / "out"
    status = main(
        [
            "--url",
            url + "/",
            "--grpc-target",
            grpc.target,
            "--grpc-metrics-url",
            grpc.metrics_url,
            "--model-repository",
            str(tmp_path / "nowhere"),
            "--endpoints",
            "json,file,live,grpc,health,stream",
            "--concurrency",
            ",".join(map(str, LEVELS)),
            "--output",
            str(output),
            *SHORT,
        ]
    )
    printed = capsys.readouterr()
    assert status == 0, printed.err
    assert sorted(p.name for p in output.iterdir()) == [
        "bench.csv",
        "bench.json",
        "bench.md",
        "streams.png",
        "throughput.png",
    ]
    assert printed.out == (output / "bench.md").read_text()
    assert (
        "no servers started" in printed.err and "round 2/2" in printed.err and "starting" not in printed.err
    )

    data, results, records = _results(output)
    assert [r["endpoint"] for r in records] == [r["target"] for r in results]
    assert not [r for r in results if r["scenario"] in ("in-process", "baseline", "overload")]
    sweep = [r for r in results if r["scenario"] == "sweep"]
    assert sorted((r["mode"], r["concurrency"]) for r in sweep) == sorted(
        (mode, level) for level in LEVELS for mode in ("HTTP",) * 3 + ("gRPC",) * 2
    )
    (stream,) = [r for r in results if r["scenario"] == "stream"]
    for row in [*sweep, stream]:
        assert (row["runtime"], row["batching"]) == ("onnx", "as deployed")
        assert (row["sent"], row["completed"], row["failed"]) == (REQUESTS, REQUESTS, 0), row["errors"]
        assert row["ratio_to_in_process_limit"] is None
        server = row["server"]  # both metrics endpoints were given
        assert server is not None
        if row["model_work"]:
            assert server["batches"] >= 1 and sum(server["batch_size_counts"].values()) == server["batches"]
    assert data["layouts"] == [] and data["in_process_limit"] == []
    assert NO_LOCAL_MODEL in data["notes"]
    assert data["settings"]["deployment"].startswith(f"HTTP API {url}, gRPC API {grpc.target}")
    assert data["settings"]["model"] == "fake (GET /models)"
    assert all(r["ratio_to_in_process_limit"] == "" and r["batching"] == "as deployed" for r in records)

    report = (output / "bench.md").read_text()
    assert f"- {NO_LOCAL_MODEL}" in report
    assert "- batching: as deployed (max batch 8" in report
    assert "Server figures" in report


def test_a_grpc_target_without_metrics_has_no_server_figures_and_says_so(
    fake_deployment: tuple[str, GrpcDeployment], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, grpc = fake_deployment
    output = tmp_path / "out"
    status = main(
        [
            "--grpc-target",
            grpc.target,
            "--endpoints",
            "file,json,live,grpc,health,stream",
            "--concurrency",
            "2",
            "--output",
            str(output),
            *SHORT,
        ]
    )
    printed = capsys.readouterr()
    assert status == 0, printed.err
    data, results, _ = _results(output)
    assert sorted(r["target"] for r in results) == sorted(
        ["Inference/Predict (unary)", "Health/Check (gRPC floor)", "Inference/PredictStream (1 stream)"]
    )
    for row in results:
        assert row["server"] is None and row["runtime"] == "unknown"  # no --url, no --backends
        assert row["completed"] == REQUESTS
    assert "gRPC rows have no server figures: no --grpc-metrics-url" in " ".join(data["notes"])
    assert "not measured: file, json, live (no --url)" in data["notes"]
    assert "in-process limit: not measured (the served model is unknown" in printed.out


def test_the_python_entry_point_measures_a_deployment_from_a_running_event_loop(
    fake_deployment: tuple[str, GrpcDeployment], tmp_path: Path
) -> None:
    url, _ = fake_deployment
    config = BenchConfig(
        url=url,
        endpoints=("json",),
        concurrency=(1, 3),
        requests=REQUESTS,
        warmup=1,
        rounds=1,
        model_repository=tmp_path / "nowhere",
    )

    async def in_a_notebook() -> list[dict[str, object]]:  # a kernel runs an event loop
        return run_benchmark(config).to_records()

    records = asyncio.run(in_a_notebook())
    assert [list(record) for record in records] == [list(COLUMNS)] * 2
    assert [(r["endpoint"], r["concurrency"], r["ok"], r["errors"]) for r in records] == [
        ("POST /predict (JSON base64)", 1, REQUESTS, 0),
        ("POST /predict (JSON base64)", 3, REQUESTS, 0),
    ]
    for record in records:
        assert isinstance(record["p99_ms"], float) and isinstance(record["req_per_s"], float)
        assert isinstance(record["mean_batch"], float)  # from GET {url}/metrics
        assert record["ratio_to_in_process_limit"] is None and record["batching"] == "as deployed"


# --- a deployment with the API key on (and TLS) -------------------------------------------------

KEY = "bench-key-" + "k3y" * 8
"""A key long enough for the servers; the reports must never contain it."""


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> Tls:
    return make_tls(tmp_path_factory.mktemp("tls"))


@pytest.fixture
def keyed_deployment(tmp_path: Path) -> Iterator[tuple[str, GrpcDeployment]]:
    """A deployment of the fake model with the API key on, plain HTTP and gRPC."""
    entry = write_fake_entry(tmp_path / "deployed")
    with (
        http_deployment(DeployedFake(entry), api_key=KEY) as url,
        grpc_deployment(DeployedFake(entry), api_key=KEY) as grpc,
    ):
        yield url, grpc


def _secured_run(url: str, grpc: GrpcDeployment, output: Path, *extra: str) -> list[str]:
    return [
        "--url",
        url,
        "--grpc-target",
        grpc.target,
        "--grpc-metrics-url",
        grpc.metrics_url,
        "--endpoints",
        "json,file,live,grpc,health,stream",
        "--concurrency",
        "2",
        "--ready-timeout",
        "10",
        "--output",
        str(output),
        *extra,
        *SHORT,
    ]


def _check_every_row_served_with_figures(output: Path) -> dict[str, object]:
    data, results, _ = _results(output)
    assert sorted(r["target"] for r in results) == sorted(
        [
            "POST /predict (JSON base64)",
            "POST /predict/file (multipart)",
            "GET /health/live (HTTP floor)",
            "Inference/Predict (unary)",
            "Health/Check (gRPC floor)",
            "Inference/PredictStream (1 stream)",
        ]
    )
    for row in results:
        assert (row["sent"], row["completed"], row["failed"]) == (REQUESTS, REQUESTS, 0), row
        assert row["server"] is not None, row  # both /metrics read with the key
        if row["model_work"]:
            assert row["server"]["batches"] >= 1
    return data


def _check_no_key_in(output: Path, *texts: str) -> None:
    for path in output.iterdir():
        if path.suffix in (".md", ".json", ".csv"):
            assert KEY not in path.read_text(), path.name
    for text in texts:
        assert KEY not in text


def test_without_the_key_a_secured_deployment_is_refused_before_any_row_naming_the_option(
    keyed_deployment: tuple[str, GrpcDeployment],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    url, grpc = keyed_deployment
    monkeypatch.delenv("VISION_API_KEY", raising=False)
    output = tmp_path / "out"
    assert main(_secured_run(url, grpc, output)) == 2
    err = capsys.readouterr().err
    assert f"bench: {url} (GET {url}/models answered HTTP 401) needs an API key: give the " in err
    assert "--api-key or the VISION_API_KEY variable" in err
    assert not output.exists()

    # gRPC alone: the health check is open, so the key is checked with one call
    assert main(["--grpc-target", grpc.target, "--ready-timeout", "10", "--output", str(output), *SHORT]) == 2
    err = capsys.readouterr().err
    assert f"bench: gRPC {grpc.target} (Predict answered UNAUTHENTICATED) needs an API key" in err
    assert not output.exists()


def test_a_wrong_key_is_refused_before_any_row_and_never_printed(
    keyed_deployment: tuple[str, GrpcDeployment],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    url, grpc = keyed_deployment
    wrong = "not-the-key-" + "x" * 16
    monkeypatch.setenv("VISION_API_KEY", wrong)
    output = tmp_path / "out"
    assert main(_secured_run(url, grpc, output)) == 2
    err = capsys.readouterr().err
    assert "refused the API key given (--api-key or VISION_API_KEY): it is not the deployment's key" in err
    assert wrong not in err
    assert not output.exists()


def test_with_the_key_from_the_environment_every_row_is_served_and_no_report_holds_it(
    keyed_deployment: tuple[str, GrpcDeployment],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    url, grpc = keyed_deployment
    monkeypatch.setenv("VISION_API_KEY", KEY)  # as the notebooks and make bench pass it
    output = tmp_path / "out"
    status = main(_secured_run(url, grpc, output))
    printed = capsys.readouterr()
    assert status == 0, printed.err
    data = _check_every_row_served_with_figures(output)
    assert data["settings"]["credentials"].startswith("API key sent (Authorization: Bearer")
    _check_no_key_in(output, printed.out, printed.err)


def test_over_tls_with_a_private_ca_and_the_key_option_every_row_is_served(
    tls: Tls, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("VISION_API_KEY", raising=False)
    entry = write_fake_entry(tmp_path / "deployed")
    with (
        http_deployment(DeployedFake(entry), api_key=KEY, tls=tls) as url,
        grpc_deployment(DeployedFake(entry), api_key=KEY, tls=tls) as grpc,
    ):
        assert url.startswith("https://") and grpc.metrics_url.startswith("https://")
        output = tmp_path / "out"
        status = main(_secured_run(url, grpc, output, "--api-key", KEY, "--tls-ca", str(tls.ca_file)))
        printed = capsys.readouterr()
        assert status == 0, printed.err
        data = _check_every_row_served_with_figures(output)
        assert data["settings"]["credentials"].endswith(f"TLS trusting {tls.ca_file}")
        _check_no_key_in(output, printed.out, printed.err)

        # the httpx2 client too
        other = tmp_path / "httpx2"
        run = _secured_run(
            url, grpc, other, "--api-key", KEY, "--tls-ca", str(tls.ca_file), "--client", "httpx2"
        )
        assert main([*run, "--endpoints", "json"]) == 0
        (row,) = _results(other)[1]
        assert (row["completed"], row["failed"], row["server"] is not None) == (REQUESTS, 0, True), row
        capsys.readouterr()

        # without the CA, the HTTPS certificate is not trusted: refused, not measured
        status = main(
            _secured_run(url, grpc, tmp_path / "untrusted", "--api-key", KEY, "--ready-timeout", "1")
        )
        assert status == 2
        assert "CERTIFICATE_VERIFY_FAILED" in capsys.readouterr().err


# --- targets that are not ready ------------------------------------------------------------------


def _unused_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_a_url_where_nothing_listens_is_refused_with_its_address(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"http://127.0.0.1:{_unused_port()}"
    status = main(["--url", url, "--ready-timeout", "0.5", "--output", str(tmp_path / "out"), *SHORT])
    err = capsys.readouterr().err
    assert status == 2
    assert f"bench: {url} is not ready: GET {url}/health/ready answered no answer (ConnectError" in err
    assert not (tmp_path / "out").exists()


def test_a_server_that_never_gets_ready_is_refused_with_what_it_answered(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    entry = write_fake_entry(tmp_path / "deployed")
    with http_deployment(NeverReady(entry)) as url:
        status = main(["--url", url, "--ready-timeout", "1", "--output", str(tmp_path / "out"), *SHORT])
    err = capsys.readouterr().err
    assert status == 2
    assert f"{url} is not ready: GET {url}/health/ready answered HTTP 503" in err
    assert '"status":"failed"' in err


def test_a_grpc_target_that_is_not_serving_is_refused_with_its_status(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    entry = write_fake_entry(tmp_path / "deployed")
    with grpc_deployment(NeverReady(entry)) as grpc:
        status = main(["--grpc-target", grpc.target, "--ready-timeout", "1", *SHORT])
    err = capsys.readouterr().err
    assert status == 2
    assert (
        f"gRPC {grpc.target} is not ready: the health check of visionserve.v1.Inference answered NOT_SERVING"
        in err
    )


def test_a_metrics_url_that_does_not_answer_is_refused(
    fake_deployment: tuple[str, GrpcDeployment], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, grpc = fake_deployment
    wrong = f"http://127.0.0.1:{_unused_port()}/metrics"
    status = main(["--grpc-target", grpc.target, "--grpc-metrics-url", wrong, *SHORT])
    assert status == 2
    assert f"--grpc-metrics-url {wrong}: not a Prometheus endpoint that answers" in capsys.readouterr().err


def test_the_served_model_must_match_model_and_backends(
    fake_deployment: tuple[str, GrpcDeployment], capsys: pytest.CaptureFixture[str]
) -> None:
    url, _ = fake_deployment
    assert main(["--url", url, "--model", "efficientnet_lite0", *SHORT]) == 2
    assert f"--model efficientnet_lite0, but {url} serves fake" in capsys.readouterr().err
    assert main(["--url", url, "--backends", "torch", *SHORT]) == 2
    assert f"--backends torch, but {url} serves fake on onnx" in capsys.readouterr().err


def test_the_baseline_needs_the_model_here(
    fake_deployment: tuple[str, GrpcDeployment], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url, _ = fake_deployment
    status = main(["--url", url, "--baseline", "--model-repository", str(tmp_path / "nowhere"), *SHORT])
    assert status == 2
    err = capsys.readouterr().err
    assert "--baseline starts seed 004's plain endpoint on this machine from the model repository" in err
    assert "no model 'fake' in repository" in err


# --- the real model: in-process rows beside a real deployment ------------------------------------


@pytest.mark.real_model
@pytest.mark.slow
def test_with_the_model_here_the_in_process_rows_the_limit_and_the_baseline_are_measured(
    real_repository: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    env = model_env(ModelSettings(backend="onnx", model_repository=real_repository, threads=1))
    http = ServerProcess("onnx", env=env, log_path=tmp_path / "http.log")
    grpc = GrpcServerProcess("onnx", env=env, log_path=tmp_path / "grpc.log")
    output = tmp_path / "out"
    with contextlib.ExitStack() as stack:
        for process in (http, grpc):
            stack.callback(process.stop)
            process.launch()
        http.wait_until_ready()
        grpc.wait_until_ready()  # metrics on a port it announces, as make run's on 8002
        status = main(
            [
                "--url",
                http.base_url,
                "--grpc-target",
                grpc.target,
                "--grpc-metrics-url",
                str(grpc.metrics_url),
                "--model-repository",
                str(real_repository),
                "--endpoints",
                "json,grpc",
                "--concurrency",
                "1",
                "--layouts",
                "1x1",
                "--limit-cap",
                "5",
                "--baseline",
                "--output",
                str(output),
                *SHORT,
            ]
        )
    printed = capsys.readouterr()
    assert status == 0, printed.err
    data, results, records = _results(output)
    (in_process,) = [r for r in results if r["scenario"] == "in-process"]
    assert in_process["runtime"] == "onnx" and in_process["completed"] == REQUESTS
    served = [r for r in results if r["scenario"] == "sweep"]
    assert sorted(r["mode"] for r in served) == ["HTTP", "gRPC"]
    for row in served:
        assert row["completed"] == REQUESTS and row["batching"] == "as deployed"
        assert row["ratio_to_in_process_limit"] > 0 and row["server"]["batches"] >= 1
    (baseline,) = [r for r in results if r["scenario"] == "baseline"]  # started here, from the repository
    assert (baseline["completed"], baseline["batching"]) == (REQUESTS, "none")
    assert (output / "server-baseline.log").is_file()
    assert [entry["layout"] for entry in data["layouts"]] == ["1x1"]
    (limit,) = data["in_process_limit"]
    assert (limit["runtime"], limit["model"]) == ("onnx", "efficientnet_lite0") and limit["images_per_s"] > 0
    assert data["settings"]["runtime_threads"] == 1  # as deployed, and so in-process
    assert not [note for note in data["notes"] if note.startswith("in-process limit")]
    assert all(r["ratio_to_in_process_limit"] for r in records if r["scenario"] == "sweep")
    assert "- in-process limit, onnx, efficientnet_lite0:" in printed.out

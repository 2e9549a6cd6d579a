"""A deployment the harness did not start (`--url`, `--grpc-target`): its addresses, checked
before anything is measured, and what it says about its model.

`python -m bench --url http://HOST:PORT --grpc-target HOST:PORT` measures services
that are already running (`make run`, a container, another machine). Before the first request
`connect` waits (up to `--ready-timeout`) for `GET {url}/health/ready` to answer 200 and for the
standard gRPC health check of `visionserve.v1.Inference` to answer SERVING, reads the served
model from `GET {url}/models`, and makes sure the metrics endpoints answer; a target that does
not get there is a `DeploymentError` naming its address and what it answered. A deployment with
the API key on refuses `GET /models`, the metrics and (checked with one empty `Predict`) the gRPC
calls without the key: that is a `DeploymentError` naming `--api-key` / `VISION_API_KEY` before
any row runs, not a run full of 401s (`access`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import grpc
import httpx2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.access import KEY_HINT, OPEN, Access
from bench.progress import ProgressBar
from bench.server_metrics import scrape
from visionserve.v1 import inference_pb2 as pb
from visionserve.v1 import inference_pb2_grpc as pb_grpc

GRPC_SERVICE = "visionserve.v1.Inference"
"""The service whose health the gRPC target must report SERVING."""
POLL_S = 0.25
"""Pause between two readiness probes."""
_PROBE_TIMEOUT_S = 5.0


class DeploymentError(RuntimeError):
    """A target is not ready, not reachable or not a visionserve API; the message names it and
    says what it answered."""


def normalise_url(url: str) -> str:
    """`http(s)://HOST:PORT` (a trailing `/` dropped); ValueError saying how to write it otherwise."""
    text = url.strip().rstrip("/")
    parts = urlsplit(text)
    example = "e.g. http://127.0.0.1:8000 (make run's HTTP API)"
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"--url {url!r}: give the HTTP API as http(s)://HOST:PORT, {example}")
    try:
        port = parts.port
    except ValueError:
        port = None
    if not parts.hostname or port is None:
        raise ValueError(f"--url {url!r}: give the host and the port, {example}")
    if parts.path or parts.query or parts.fragment:
        raise ValueError(f"--url {url!r}: give the API's root, with no path, {example}")
    return text


def normalise_metrics_url(url: str) -> str:
    """An `http(s)://HOST:PORT/PATH` Prometheus endpoint; ValueError saying how to write it otherwise."""
    text = url.strip()
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(
            f"--grpc-metrics-url {url!r}: give the gRPC process's Prometheus endpoint as "
            "http(s)://HOST:PORT/metrics, e.g. http://127.0.0.1:8002/metrics (make run's)"
        )
    return text


def normalise_grpc_target(target: str) -> str:
    """`HOST:PORT` as grpc takes it; ValueError saying how to write it otherwise."""
    text = target.strip()
    host, sep, port = text.rpartition(":")
    if "://" in text or not sep or not host or not port.isdigit():
        raise ValueError(
            f"--grpc-target {target!r}: give HOST:PORT without a scheme, e.g. 127.0.0.1:50051 "
            "(make run's gRPC API)"
        )
    return text


@dataclass(frozen=True)
class ExternalHttp:
    """The HTTP API of a deployment: its root URL and where its metrics are (None: unreadable)."""

    base_url: str
    metrics_url: str | None


@dataclass(frozen=True)
class ExternalGrpc:
    """The gRPC API of a deployment: `host:port` and its metrics URL (None: not given)."""

    target: str
    metrics_url: str | None


def server_only_options(
    *,
    batching: tuple[str, ...],
    server_env: Mapping[str, str],
    overload: bool,
    backends: tuple[str, ...],
    threads: int | None,
    device: str | None,
) -> dict[str, str]:
    """The options given that only configure servers the harness starts -> why they do not apply
    to a deployment (empty when none are set)."""
    found: dict[str, str] = {}
    if "off" in batching:
        found["--batching off"] = (
            "batching is as deployed; measure batching off against a deployment started with "
            "VISION_MAX_BATCH_SIZE=1"
        )
    if server_env:
        found["--server-env " + ",".join(server_env)] = "set VISION_* variables on the deployment"
    if overload:
        found["--overload"] = (
            "it needs servers started with a small queue; start the deployment with a small "
            "VISION_MAX_QUEUE_SIZE and raise --concurrency instead"
        )
    if len(backends) > 1:
        found["--backends " + ",".join(backends)] = (
            "a deployment serves one runtime; give at most one, the one it serves"
        )
    if threads is not None:
        found["--threads"] = (
            "threads are as deployed (GET /models shows them; the in-process rows use the same)"
        )
    if device is not None:
        found["--device"] = (
            "the device is as deployed (GET /models shows it; the in-process rows use the same)"
        )
    return found


def refuse_server_only_options(conflicts: Mapping[str, str]) -> None:
    """ValueError naming `conflicts` (from `server_only_options`), if there are any."""
    if conflicts:
        raise ValueError(
            "with --url/--grpc-target the harness starts no servers and measures the deployment "
            "as it is, so these options do not apply: "
            + "; ".join(f"{option} ({why})" for option, why in conflicts.items())
            + ". Configure the deployment itself, or leave out --url/--grpc-target to let the "
            "harness start its own servers."
        )


@dataclass(frozen=True)
class DeployedModel:
    """What `GET /models` says about the model measured: the one named, else the default."""

    name: str
    runtime: str
    device: str
    threads: int | None = None
    instances: int | None = None
    max_batch_size: int | None = None
    preprocess_workers: int | None = None
    task: str = "classification"
    served: tuple[str, ...] = ()
    """Every model the deployment serves, as listed."""

    @classmethod
    def from_models(cls, body: object, name: str | None = None) -> DeployedModel:
        """`GET /models`'s JSON -> the model called `name` (None: the default, else the first
        listed; a name not served: the default, for the caller to refuse); ValueError if it is
        not such an answer."""
        try:
            listed = list(body["models"])  # type: ignore[index]
            names = tuple(str(entry["name"]) for entry in listed)
            default = next((e for e in listed if e.get("default") is True), listed[0])
            chosen = next((e for e in listed if e["name"] == name), default)
            runtime, device = str(chosen["runtime"]), str(chosen["device"])
        except (KeyError, IndexError, TypeError, AttributeError) as exc:
            raise ValueError("not a visionserve model list") from exc

        def whole(key: str) -> int | None:
            value = chosen.get(key)
            return value if isinstance(value, int) and not isinstance(value, bool) else None

        return cls(
            name=str(chosen["name"]),
            runtime=runtime,
            device=device,
            threads=whole("threads"),
            instances=whole("instances"),
            max_batch_size=whole("max_batch_size"),
            preprocess_workers=whole("preprocess_workers"),
            task=str(chosen.get("task") or "classification"),
            served=names,
        )


@dataclass
class Deployment:
    """The targets of an external run, checked: ready, with what they said."""

    http: ExternalHttp | None
    grpc: ExternalGrpc | None
    model: DeployedModel | None = None
    """From `GET {url}/models`; None without `--url` (or when it did not answer)."""
    notes: list[str] = field(default_factory=list)
    """What the report should say about the targets (e.g. a metrics endpoint that did not answer)."""
    access: Access = OPEN
    """The key and CAs every request to it uses."""


def _answer(response: httpx2.Response) -> str:
    body = " ".join(response.text.split())
    return f"HTTP {response.status_code}" + (f" {body[:200]}" if body else "")


def _http_client(access: Access) -> httpx2.Client:
    return httpx2.Client(
        timeout=_PROBE_TIMEOUT_S, trust_env=False, verify=access.ssl_context(), headers=access.headers()
    )


def grpc_probe_channel(target: str, access: Access = OPEN) -> grpc.Channel:
    """A blocking channel to `target`: TLS when `access` has a CA, plain otherwise."""
    options = [("grpc.enable_http_proxy", 0)]
    credentials = access.grpc_credentials()
    if credentials is None:
        return grpc.insecure_channel(target, options=options)
    return grpc.secure_channel(target, credentials, options=options)


def wait_http_ready(url: str, *, deadline: float, bar: ProgressBar, access: Access = OPEN) -> None:
    """Poll `GET {url}/health/ready` until it answers 200; DeploymentError at `deadline`
    (`time.monotonic()`), or at once on a 4xx (not a visionserve API)."""
    probe = f"{url}/health/ready"
    last = "nothing"
    noted = False
    with _http_client(access) as client:
        while True:
            try:
                response = client.get(probe)
            except httpx2.HTTPError as exc:
                last = f"no answer ({type(exc).__name__}: {exc})"
            else:
                if response.status_code == 200:
                    return
                last = _answer(response)
                if 400 <= response.status_code < 500 and response.status_code not in (408, 429):
                    raise DeploymentError(f"{url} is not a visionserve HTTP API: GET {probe} answered {last}")
            if time.monotonic() >= deadline:
                raise DeploymentError(
                    f"{url} is not ready: GET {probe} answered {last} (raise --ready-timeout if it "
                    "is still starting; if it serves TLS, write https:// in --url)"
                )
            if not noted:
                bar.note(f"waiting for {url} to be ready (GET {probe}: {last})")
                noted = True
            time.sleep(POLL_S)


def wait_grpc_serving(target: str, *, deadline: float, bar: ProgressBar, access: Access = OPEN) -> None:
    """Poll the standard health check of `visionserve.v1.Inference` on `target` until SERVING;
    DeploymentError at `deadline`, or at once when the target has no such service."""
    request = health_pb2.HealthCheckRequest(service=GRPC_SERVICE)
    serving = health_pb2.HealthCheckResponse.SERVING
    last = "nothing"
    noted = False
    with grpc_probe_channel(target, access) as channel:
        check = health_pb2_grpc.HealthStub(channel).Check
        while True:
            timeout = max(0.2, min(_PROBE_TIMEOUT_S, deadline - time.monotonic()))
            try:
                status = check(request, timeout=timeout).status
            except grpc.RpcError as exc:
                code = exc.code() if isinstance(exc, grpc.Call) else None
                details = exc.details() if isinstance(exc, grpc.Call) else str(exc)
                last = f"{code.name if code else 'an error'} ({details})"
                if code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNIMPLEMENTED):
                    raise DeploymentError(
                        f"{target} is not a visionserve gRPC API: the health check of {GRPC_SERVICE} "
                        f"answered {last}"
                    ) from None
            else:
                if status == serving:
                    return
                last = health_pb2.HealthCheckResponse.ServingStatus.Name(status)
            if time.monotonic() >= deadline:
                raise DeploymentError(
                    f"gRPC {target} is not ready: the health check of {GRPC_SERVICE} answered {last} "
                    "(raise --ready-timeout if it is still starting"
                    + ("; if it serves TLS, give --tls-ca)" if access.tls_ca is None else ")")
                )
            if not noted:
                bar.note(f"waiting for gRPC {target} to be ready (health check: {last})")
                noted = True
            time.sleep(POLL_S)


def _refused(what: str, access: Access) -> DeploymentError:
    """The error of a deployment that refused the harness's key (or its lack of one)."""
    if access.api_key:
        return DeploymentError(
            f"{what} refused the API key given (--api-key or VISION_API_KEY): it is not the deployment's key"
        )
    return DeploymentError(f"{what} needs an API key: {KEY_HINT}")


def read_model(url: str, access: Access = OPEN, name: str | None = None) -> DeployedModel:
    """The model `name` (None: the default) from `GET {url}/models`; DeploymentError naming what
    it answered (on a 401: naming `--api-key`)."""
    with _http_client(access) as client:
        try:
            response = client.get(f"{url}/models")
        except httpx2.HTTPError as exc:
            raise DeploymentError(f"GET {url}/models: no answer ({type(exc).__name__}: {exc})") from None
    if response.status_code == 401:
        raise _refused(f"{url} (GET {url}/models answered HTTP 401)", access)
    try:
        if response.status_code != 200:
            raise ValueError(_answer(response))
        return DeployedModel.from_models(response.json(), name)
    except (ValueError, json.JSONDecodeError) as exc:
        raise DeploymentError(
            f"{url} is not a visionserve HTTP API: GET {url}/models answered {_answer(response)} ({exc})"
        ) from None


def check_grpc_key(target: str, access: Access = OPEN) -> None:
    """One empty `Predict` (answered INVALID_ARGUMENT, no model work): DeploymentError when the
    target answers UNAUTHENTICATED, so that a missing or wrong key fails before any row."""
    with grpc_probe_channel(target, access) as channel:
        predict = pb_grpc.InferenceStub(channel).Predict  # type: ignore[no-untyped-call]
        try:
            predict(pb.PredictRequest(), timeout=_PROBE_TIMEOUT_S, metadata=access.metadata())
        except grpc.RpcError as exc:
            if isinstance(exc, grpc.Call) and exc.code() == grpc.StatusCode.UNAUTHENTICATED:
                raise _refused(f"gRPC {target} (Predict answered UNAUTHENTICATED)", access) from None


def connect(
    *,
    url: str | None,
    grpc_target: str | None,
    grpc_metrics_url: str | None,
    ready_timeout_s: float,
    bar: ProgressBar,
    access: Access = OPEN,
    model_name: str | None = None,
) -> Deployment:
    """Wait until every target given is ready (both within `ready_timeout_s`), read the served
    model, and check the metrics endpoints: the HTTP API's `/metrics` not answering costs its rows
    their server figures (a note says so); a `grpc_metrics_url` not answering is an error (it was
    asked for by name)."""
    deadline = time.monotonic() + ready_timeout_s
    if url is not None:
        wait_http_ready(url, deadline=deadline, bar=bar, access=access)
    if grpc_target is not None:
        wait_grpc_serving(grpc_target, deadline=deadline, bar=bar, access=access)
    deployment = Deployment(http=None, grpc=None, access=access)
    if url is not None:
        deployment.model = read_model(url, access, model_name)
        metrics: str | None = f"{url}/metrics"
        try:
            scrape(f"{url}/metrics", access=access)
        except (httpx2.HTTPError, ValueError) as exc:
            deployment.notes.append(f"HTTP rows have no server figures: GET {url}/metrics failed ({exc})")
            metrics = None
        deployment.http = ExternalHttp(url, metrics)
    if grpc_target is not None:
        check_grpc_key(grpc_target, access)
        if grpc_metrics_url is not None:
            try:
                scrape(grpc_metrics_url, access=access)
            except (httpx2.HTTPError, ValueError) as exc:
                raise DeploymentError(
                    f"--grpc-metrics-url {grpc_metrics_url}: not a Prometheus endpoint that answers ({exc})"
                ) from None
        else:
            deployment.notes.append(
                "gRPC rows have no server figures: no --grpc-metrics-url (make run serves them on "
                "http://127.0.0.1:8002/metrics)"
            )
        deployment.grpc = ExternalGrpc(grpc_target, grpc_metrics_url)
    return deployment

"""`make test-docker`: the Docker Compose stack for real, end to end (docs/docker.md).

Builds the images (`docker compose build`), brings the stack up (`up -d`), waits until every health
check is healthy, then from the host: a photo classified over HTTP with every served model (the
ones `GET /models` lists), the gRPC API (health Check, Predict, a short PredictStream), the UI's
upload form answering an upload, JupyterLab's API with the token set here, optionally the
notebooks executed inside the jupyter container (nbclient), then `docker compose down` leaving
nothing running. Prints the figures docs/docker.md records (image sizes, build time, time to
healthy, idle memory, a request over each service).

Opt-in, never collected by `make test` (it lives in scripts/). Exit status: 0 passed, 1 failed,
0 with a line starting `SKIPPED:` when no Docker engine (or no Compose plugin) is reachable;
with `VISION_TEST_DOCKER_REQUIRED=1` a missing engine is exit 2 instead (CI that must run it).

Compose files: docker/docker-compose.yaml, then every file named in VISION_COMPOSE_FILES
(whitespace- or os.pathsep-separated; a leading `-f` is accepted), then those of COMPOSE_FILE
(Compose's own list; each file once), then $VISION_COMPOSE_EXTRA
(what `../shared/tools/docker-sandbox up` exports: the build network for those machines).
BACKEND=onnx|torch picks the APIs' runtime, as for `make up`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import shlex
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

T = TypeVar("T")

PROJECT = "visionserve-test"
"""Its own Compose project (and so its own model volume, removed at the end): a user's `make up`
stack keeps its volume. The ports are the compose file's, so that stack must be down."""
PORTS = {"api": 8000, "grpc": 50051, "ui": 5000, "jupyter": 8888}
CATS = {"tabby", "tiger cat", "Persian cat", "Siamese cat", "Egyptian cat", "cat"}
NOTEBOOK_ENV = {"VISION_BENCH_REQUESTS": "4", "VISION_BENCH_WARMUP": "1", "VISION_TORCH_COMPILE": "false"}


class StackError(Exception):
    pass


def log(message: str) -> None:
    print(f"[test-docker] {message}", flush=True)


def compose_files() -> list[str]:
    files = [str(ROOT / "docker" / "docker-compose.yaml")]
    for word in re.split(rf"[\s{re.escape(os.pathsep)}]+", os.environ.get("VISION_COMPOSE_FILES", "")):
        if word and word != "-f":
            files.append(word.removeprefix("-f"))
    # COMPOSE_FILE (Compose's own variable, ignored by `docker compose -f`): its files are added
    separator = os.environ.get("COMPOSE_PATH_SEPARATOR", os.pathsep)
    files += [f for f in os.environ.get("COMPOSE_FILE", "").split(separator) if f]
    extra = os.environ.get("VISION_COMPOSE_EXTRA")
    if extra:
        files.append(extra)
    unique: list[str] = []
    for path in files:
        if not Path(path).is_file():
            raise StackError(f"compose file {path} does not exist")
        if all(Path(path).resolve() != Path(u).resolve() for u in unique):
            unique.append(path)
    return unique


def compose_command(files: list[str]) -> list[str]:
    return ["docker", "compose", "-p", PROJECT, *(a for f in files for a in ("-f", f))]


def reachable() -> str | None:
    """None when a Docker engine and the Compose plugin answer; else why not."""
    try:
        info = subprocess.run(
            ["docker", "info", "--format", "{{.ServerVersion}}"],
            check=False,
            capture_output=True,
            text=True,
            timeout=30,
        )
    except FileNotFoundError:
        return "no docker command"
    except subprocess.TimeoutExpired:
        return "docker info timed out"
    if info.returncode != 0:
        reason = (info.stderr.strip().splitlines() or ["docker info failed"])[-1]
        return f"docker info: {reason}"
    version = subprocess.run(["docker", "compose", "version"], check=False, capture_output=True, text=True)
    if version.returncode != 0:
        return "the Docker Compose plugin ('docker compose') is not installed"
    return None


class Stack:
    def __init__(self, files: list[str], env: dict[str, str]) -> None:
        self.base = compose_command(files)
        self.env = env

    def run(
        self,
        *args: str,
        check: bool = True,
        capture: bool = False,
        timeout: float | None = None,
        quiet: bool = False,
    ) -> subprocess.CompletedProcess[str]:
        command = [*self.base, *args]
        if not quiet:
            log("$ " + shlex.join(["docker", "compose", "-p", PROJECT, "...", *args]))
        done = subprocess.run(
            command, check=False, env=self.env, text=True, capture_output=capture, timeout=timeout
        )
        if check and done.returncode != 0:
            raise StackError(f"{shlex.join(command)} exited {done.returncode}\n{done.stderr or ''}")
        return done

    def services(self) -> list[dict[str, object]]:
        out = self.run("ps", "--all", "--format", "json", capture=True, quiet=True).stdout.strip()
        if not out:
            return []
        if out.startswith("["):
            return list(json.loads(out))
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def logs(self, service: str, tail: int = 80) -> str:
        return self.run("logs", "--no-color", "--tail", str(tail), service, check=False, capture=True).stdout


def wait_healthy(stack: Stack, timeout_s: float) -> float:
    """Seconds until every long-running service is healthy and `export` exited 0."""
    started = time.monotonic()
    expected = {"api", "grpc", "ui", "jupyter"}
    last = ""
    while True:
        rows = {str(r["Service"]): r for r in stack.services()}
        export = rows.get("export")
        if export and export.get("State") == "exited" and export.get("ExitCode") not in (0, None):
            print(stack.logs("export"))
            raise StackError(f"export exited {export.get('ExitCode')}")
        health = {
            name: str(rows[name].get("Health") or rows[name].get("State")) if name in rows else "absent"
            for name in sorted(expected)
        }
        line = ", ".join(f"{k}={v}" for k, v in health.items())
        if line != last:
            log(f"{time.monotonic() - started:5.1f} s  {line}")
            last = line
        if all(v == "healthy" for v in health.values()):
            return time.monotonic() - started
        if time.monotonic() - started > timeout_s:
            for name, state in health.items():
                if state != "healthy":
                    print(f"----- logs of {name} ({state}) -----\n{stack.logs(name)}", flush=True)
            raise StackError(f"not all healthy after {timeout_s:.0f} s: {line}")
        time.sleep(1)


def timed(fn: Callable[[], T], repeat: int = 5) -> tuple[T, float]:
    """The first result and the median wall time in ms over `repeat` calls."""
    times: list[float] = []
    for i in range(repeat):
        t = time.perf_counter()
        value = fn()
        times.append((time.perf_counter() - t) * 1000)
        if i == 0:
            result = value
    assert times
    return result, statistics.median(times)


def check_http(photos: dict[str, bytes], figures: dict[str, float]) -> list[str]:
    import requests

    base = f"http://127.0.0.1:{PORTS['api']}"
    models = requests.get(f"{base}/models", timeout=10).json()["models"]
    names = [m["name"] for m in models]
    log(f"HTTP GET /models: {names}")
    if not names:
        raise StackError("GET /models lists no model")
    for model in models:
        name, task = model["name"], model["task"]
        # the cat for the ImageNet and COCO models; the astronaut for the face models
        faces = task == "face_expression" or (task == "detection" and model["labels_count"] != 80)
        photo = "astronaut.png" if faces else "chelsea.png"

        def call(name: str = name, photo: str = photo) -> dict[str, Any]:
            r = requests.post(
                f"{base}/predict/file",
                params={"model": name},
                files={"file": (photo, photos[photo], "image/png")},
                timeout=60,
            )
            if r.status_code != 200:
                raise StackError(f"HTTP /predict/file?model={name}: {r.status_code} {r.text[:300]}")
            return dict(r.json())

        body, ms = timed(call)
        if task == "classification":
            top = str(body["prediction"])
            # an ImageNet classifier names a cat; another one (the expression classifier) answers
            ok = top in CATS or model["labels_count"] != 1000
            what = f"{top} ({float(body['probability']):.2f})"
        elif task == "detection":
            labels = [str(d["label"]) for d in body["detections"]]
            ok = bool(labels) if faces else "cat" in labels
            what = f"detections {labels}"
        elif task == "face_expression":
            faces = body["faces"]
            ok = len(faces) >= 1
            what = f"{len(faces)} face(s)"
        else:
            ok, what = True, f"task {task}"
        log(f"HTTP {name} on {photo}: {what}, median {ms:.1f} ms")
        if not ok:
            raise StackError(f"HTTP {name} on {photo}: unexpected answer {json.dumps(body)[:400]}")
        if model.get("default"):
            figures["HTTP POST /predict/file (default model, chelsea.png)"] = ms
    return names


def check_grpc(photo: bytes, figures: dict[str, float]) -> None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from visionserve.v1 import inference_pb2 as pb
    from visionserve.v1 import inference_pb2_grpc as pb_grpc

    with grpc.insecure_channel(f"127.0.0.1:{PORTS['grpc']}") as channel:
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10).status
        if status != health_pb2.HealthCheckResponse.SERVING:
            raise StackError(f"gRPC health: {status}")
        stub = pb_grpc.InferenceStub(channel)  # type: ignore[no-untyped-call]
        reply, ms = timed(lambda: stub.Predict(pb.PredictRequest(image=photo, topk=5), timeout=60))
        top = reply.topk[0].label if reply.topk else reply.prediction
        log(f"gRPC health SERVING; Predict: {top}, median {ms:.1f} ms")
        if top not in CATS:
            raise StackError(f"gRPC Predict: {top!r}")
        figures["gRPC Predict (default model, chelsea.png)"] = ms

        def frames() -> Iterator[pb.Frame]:
            for i in range(5):
                yield pb.Frame(image=photo, frame_id=i, topk=3)

        answers = list(stub.PredictStream(frames(), timeout=120))
        ids = [a.frame_id for a in answers]
        bad = [a for a in answers if a.HasField("error") or not a.topk or a.topk[0].label not in CATS]
        log(f"gRPC PredictStream: {len(answers)} answers, frames {ids}")
        if sorted(ids) != list(range(5)) or bad:
            raise StackError(f"gRPC PredictStream: ids {ids}, bad {bad[:1]}")


def check_ui(photo: bytes, figures: dict[str, float]) -> None:
    import requests

    base = f"http://127.0.0.1:{PORTS['ui']}"
    page = requests.get(f"{base}/", timeout=10)
    if page.status_code != 200:
        raise StackError(f"UI GET /: {page.status_code}")

    def upload() -> str:
        r = requests.post(f"{base}/", files={"file": ("chelsea.png", photo, "image/png")}, timeout=60)
        if r.status_code != 200:
            raise StackError(f"UI POST /: {r.status_code} {r.text[:300]}")
        return r.text

    html, ms = timed(upload)
    named = sorted(c for c in CATS if c in html and c != "cat")
    log(f"UI POST / (upload form): answer names {named}, median {ms:.1f} ms")
    if not named:
        raise StackError("UI answer page names no cat class:\n" + html[:1500])
    figures["UI POST / (upload form, chelsea.png)"] = ms


def check_jupyter(token: str, figures: dict[str, float]) -> None:
    import requests

    base = f"http://127.0.0.1:{PORTS['jupyter']}"
    headers = {"Authorization": f"token {token}"}
    denied = requests.get(f"{base}/api/contents", timeout=10)
    if denied.status_code not in (401, 403):
        raise StackError(
            f"JupyterLab /api/contents without the token: {denied.status_code} (expected 401/403)"
        )

    def contents() -> list[str]:
        r = requests.get(f"{base}/api/contents", headers=headers, timeout=10)
        if r.status_code != 200:
            raise StackError(f"JupyterLab /api/contents: {r.status_code}")
        return [c["name"] for c in r.json()["content"]]

    names, ms = timed(contents)
    status = requests.get(f"{base}/api/status", headers=headers, timeout=10).json()
    log(f"JupyterLab /api/contents: {names}; /api/status: {status}; median {ms:.1f} ms")
    if not any(str(n).endswith(".ipynb") for n in names):
        raise StackError(f"JupyterLab lists no notebook: {names}")
    figures["JupyterLab GET /api/contents"] = ms


NOTEBOOK_RUNNER = """
import sys, time, nbformat
from nbclient import NotebookClient
name = sys.argv[1]
nb = nbformat.read('/app/notebooks/' + name, as_version=4)
t = time.monotonic()
NotebookClient(nb, timeout=300, kernel_name='python3', resources={'metadata': {'path': '/tmp'}}).execute()
images = sum('image/png' in o.get('data', {}) for c in nb.cells if c.cell_type == 'code' for o in c.outputs)
print(f'{name}: executed in {time.monotonic() - t:.0f} s, {images} figure(s)')
"""


def run_notebooks(stack: Stack, names: list[str]) -> None:
    env = [a for k, v in NOTEBOOK_ENV.items() for a in ("-e", f"{k}={v}")]
    for name in names:
        done = stack.run(
            "exec",
            "-T",
            *env,
            "jupyter",
            "python",
            "-c",
            NOTEBOOK_RUNNER,
            name,
            check=False,
            capture=True,
            timeout=900,
        )
        if done.returncode != 0:
            tail = f"{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
            raise StackError(f"notebook {name} inside the jupyter container failed:\n{tail}")
        log(done.stdout.strip())


def image_sizes(backend: str) -> dict[str, str]:
    names = ["export", f"fastapi-{backend}", f"grpc-{backend}", "ui", "jupyter"]
    sizes = {}
    for name in names:
        out = subprocess.run(
            ["docker", "image", "ls", f"visionserve/{name}:latest", "--format", "{{.Size}}"],
            check=False,
            capture_output=True,
            text=True,
        ).stdout.strip()
        sizes[name] = out or "?"
    return sizes


def idle_memory() -> dict[str, str]:
    ids = subprocess.run(
        ["docker", "ps", "-q", "--filter", f"label=com.docker.compose.project={PROJECT}"],
        check=False,
        capture_output=True,
        text=True,
    ).stdout.split()
    out = subprocess.run(
        ["docker", "stats", "--no-stream", "--format", "{{.Name}}\t{{.MemUsage}}", *ids],
        check=False,
        capture_output=True,
        text=True,
    ).stdout
    return dict(line.split("\t", 1) for line in out.strip().splitlines() if "\t" in line)


def ports_free() -> None:
    busy = []
    for service, port in PORTS.items():
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                busy.append(f"{port} ({service})")
    if busy:
        raise StackError(
            f"ports already in use: {', '.join(busy)} (a `make up` or `make run` stack? stop it first)"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--no-build", action="store_true", help="use the images already built")
    parser.add_argument(
        "--notebooks",
        default="all",
        help="notebooks run in the jupyter container: comma-separated names, 'all' (default) or 'none'",
    )
    parser.add_argument(
        "--healthy-timeout",
        type=float,
        default=300.0,
        help="seconds for every health check to turn healthy (default 300)",
    )
    parser.add_argument("--keep", action="store_true", help="leave the stack running (no `down`)")
    args = parser.parse_args()

    why = reachable()
    if why is not None:
        if os.environ.get("VISION_TEST_DOCKER_REQUIRED") == "1":
            print(
                f"FAILED: no Docker engine reachable ({why}), and VISION_TEST_DOCKER_REQUIRED=1", flush=True
            )
            return 2
        print(
            f"SKIPPED: no Docker engine reachable ({why}); needs Docker with Compose (docs/docker.md)",
            flush=True,
        )
        return 0

    backend = os.environ.get("BACKEND", "onnx")
    token = os.environ.get("JUPYTER_TOKEN") or secrets.token_hex(16)
    env = {**os.environ, "BACKEND": backend, "JUPYTER_TOKEN": token}
    try:
        files = compose_files()
    except StackError as exc:
        print(f"FAILED: {exc}", flush=True)
        return 1
    stack = Stack(files, env)
    log(f"backend {backend}; compose files: {' '.join(files)}")
    figures: dict[str, float] = {}
    failed: str | None = None
    from visionserve.photos import packaged_photo

    photos = {name: packaged_photo(name).read_bytes() for name in ("chelsea.png", "astronaut.png")}
    try:
        ports_free()
        if not args.no_build:
            t = time.monotonic()
            stack.run("build")
            log(f"build: {time.monotonic() - t:.1f} s")
        t = time.monotonic()
        stack.run("up", "-d")
        log(f"up -d returned after {time.monotonic() - t:.1f} s")
        healthy = wait_healthy(stack, args.healthy_timeout)
        log(f"all healthy {time.monotonic() - t:.1f} s after `up` ({healthy:.1f} s of waiting)")
        time.sleep(5)
        memory = idle_memory()
        check_http(photos, figures)
        check_grpc(photos["chelsea.png"], figures)
        check_ui(photos["chelsea.png"], figures)
        check_jupyter(token, figures)
        if args.notebooks != "none":
            names = (
                sorted(p.name for p in (ROOT / "notebooks").glob("*.ipynb"))
                if args.notebooks == "all"
                else args.notebooks.split(",")
            )
            run_notebooks(stack, names)
        log("image sizes: " + ", ".join(f"{k} {v}" for k, v in image_sizes(backend).items()))
        log("idle memory: " + ", ".join(f"{k} {v}" for k, v in memory.items()))
        for what, ms in figures.items():
            log(f"latency (median of 5, from the host): {what}: {ms:.1f} ms")
    except (StackError, AssertionError, subprocess.TimeoutExpired) as exc:
        failed = str(exc) or repr(exc)
    except Exception as exc:  # reported, then the stack is brought down
        failed = f"{type(exc).__name__}: {exc}"
    finally:
        if not args.keep:
            stack.run("down", "--volumes", "--remove-orphans", check=False)
            left = stack.run("ps", "-q", "--all", check=False, capture=True).stdout.strip()
            if left:
                failed = (
                    failed + "\n" if failed else ""
                ) + f"`docker compose down` left containers: {left.split()}"
            else:
                log("down: `docker compose ps -q --all` is empty")
    if failed:
        print(f"FAILED: {failed}", flush=True)
        return 1
    print("PASSED: built, healthy, answered over HTTP, gRPC, the UI and JupyterLab, came down", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`make test-docker`: the Docker Compose stack for real, end to end (docs/docker.md).

Builds the images (`docker compose build`), brings the stack up (`up -d`), waits until every health
check is healthy, then from the host: a photo classified over HTTP with every served model (the
ones `GET /models` lists), the gRPC API (health Check, Predict, a short PredictStream), the UI's
upload form answering an upload, JupyterLab's API with the token set here, optionally the
notebooks executed inside the jupyter container (nbclient), then `docker compose down` leaving
nothing running. Prints the figures docs/docker.md records (image sizes, build time, time to
healthy, idle memory, a request over each service).

Hygiene (issue 16; `--no-hygiene` skips it), measured on the images and containers just built:
the build context (what `.dockerignore` lets through: only the Dockerfile's COPY sources, no
cache, no local state; its size); in each image: its size, the user it runs as (uid 10001), no
torch in the ONNX and UI images, no CUDA library or NVIDIA/CUDA wheel in a CPU build, no compiler
or other build tool, no apt lists, pip cache or leftovers in /tmp; ONNX Runtime's telemetry off;
and with the stack up: every container runs with a read-only root filesystem, no capabilities and
no-new-privileges as the compose file says (a write to / fails, /tmp is writable), the export
finished that way, an upload large enough to spool to /tmp works on the API and the UI, and no
service logged a read-only or temporary-directory error. Tables of the figures are printed.

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
import io
import json
import os
import re
import secrets
import shlex
import socket
import statistics
import subprocess
import sys
import tarfile
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


def check_http(photos: dict[str, bytes], figures: dict[str, float], expect_adaptive: bool) -> list[str]:
    import requests

    base = f"http://127.0.0.1:{PORTS['api']}"
    models = requests.get(f"{base}/models", timeout=10).json()["models"]
    names = [m["name"] for m in models]
    log(f"HTTP GET /models: {names}")
    if not names:
        raise StackError("GET /models lists no model")
    for model in models:
        if model.get("layout") is None:  # a pipeline computes on its stages' sessions
            continue
        log(f"HTTP {model['name']}: layout {model['layout']} ({model.get('layout_reason')})")
        # the compose file asks for the adaptive layout, which ONNX Runtime on CPU runs
        if expect_adaptive and not str(model["layout"]).startswith("adaptive"):
            raise StackError(f"{model['name']} runs {model['layout']!r}, not the adaptive layout")
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


def image_sizes(images: list[str]) -> dict[str, str]:
    """`docker image ls`'s size of each image (the compose model's names: `:cuda` with the GPU file)."""
    sizes = {}
    for image in images:
        out = subprocess.run(
            ["docker", "image", "ls", image, "--format", "{{.Size}}"],
            check=False,
            capture_output=True,
            text=True,
        ).stdout.strip()
        sizes[image.removeprefix("visionserve/")] = out or "?"
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


# --- hygiene (issue 16): the build context, the images, the running containers ------------------

USER_ID = "10001"
"""The images' user (docker/Dockerfile's useradd); every container runs as it."""

TORCH_MODULES = ("torch", "torchvision", "torchaudio", "triton")
CONTEXT_DOCKERFILE = "FROM scratch\nCOPY . /\n"
"""Builds nothing: exports the build context as BuildKit receives it (after .dockerignore)."""
CONTEXT_NEVER = {
    ".git",
    ".venv",
    "model_repository",
    "bench-results",
    "tests",
    "docs",
    "notebooks",
    "node_modules",
    "__pycache__",
    ".ipynb_checkpoints",
    ".pytest_cache",
    ".mypy_cache",
    ".ruff_cache",
    ".hypothesis",
    ".env",
}
"""Path components that must never be in the build context."""

# Run inside each image as root (to see /root as well), with no network and a read-only root. It
# prints one JSON object: what the image holds, nothing judged here.
IMAGE_PROBE = r"""
import importlib.util, json, os, re, sys
from importlib import metadata

CUDA_LIB = re.compile(
    r"^(lib(cuda|cudart|cublas|cublasLt|cudnn\w*|cufft\w*|curand|cusparse\w*|cusolver\w*|cupti|nccl"
    r"|nvrtc\w*|nvJitLink|nvinfer\w*|nvToolsExt|nvidia-ml)|onnxruntime_providers_(cuda|tensorrt))[.-]"
)
TORCH_LIB = re.compile(r"^lib(torch|c10)(_\w+)?\.so")
BUILD_TOOL = re.compile(
    r"^((x86_64|aarch64)-linux-gnu-)?(gcc|g\+\+|cc|c\+\+|cpp|clang|clang\+\+|ld|ld\.bfd|ld\.gold|as|make|cmake"
    r"|ninja)(-\d+(\.\d+)*)?$"
)
cuda_libs, torch_libs, tools, wheels = [], [], [], []
for top in ("/usr", "/opt", "/lib", "/lib64", "/bin", "/sbin", "/app", "/home", "/root", "/srv"):
    if os.path.islink(top):  # merged /usr: /lib -> usr/lib, walked there
        continue
    for folder, dirs, files in os.walk(top):
        for name in files:
            path = os.path.join(folder, name)
            if CUDA_LIB.match(name):
                cuda_libs.append(path)
            elif TORCH_LIB.match(name):
                torch_libs.append(path)
            elif name.endswith(".whl") and "/ensurepip/" not in path and "/python-wheels/" not in path:
                wheels.append(path)  # not the Python's own (ensurepip's; Debian's python3-venv's)
            if BUILD_TOOL.match(name) and folder.rstrip("/").endswith("bin") and os.access(path, os.X_OK):
                tools.append(path)

def listing(path):
    try:
        return sorted(os.listdir(path))
    except OSError:
        return []

apt_lists = [n for n in listing("/var/lib/apt/lists") if n not in ("lock", "partial", "auxfiles")]
apt_cache = [n for n in listing("/var/cache/apt") if n.endswith(".bin")]
apt_cache += [n for n in listing("/var/cache/apt/archives") if n.endswith(".deb")]
homes = ["/root"] + [os.path.join("/home", n) for n in listing("/home")]
caches = [os.path.join(h, ".cache", n) for h in homes for n in listing(os.path.join(h, ".cache"))]
dists = {}
for dist in metadata.distributions():
    name = (dist.metadata["Name"] or "?").lower().replace("_", "-")
    size = sum((f.size or 0) for f in (dist.files or []))
    dists[name] = size
site = sum(dists.values())
print(json.dumps({
    "modules": {m: importlib.util.find_spec(m) is not None for m in sys.argv[1:]},
    "torch_dists": sorted(d for d in dists if d in ("torch", "torchvision", "torchaudio", "triton")),
    "cuda_dists": sorted(
        d for d in dists if d.startswith(("nvidia-", "cuda-")) or d in ("onnxruntime-gpu", "tensorrt", "cupy")
    ),
    "cuda_libs": sorted(cuda_libs), "torch_libs": sorted(torch_libs), "build_tools": sorted(tools),
    "wheels": sorted(wheels), "apt": apt_lists + apt_cache, "caches": caches, "tmp": listing("/tmp"),
    "site_packages": site, "largest": sorted(dists.items(), key=lambda kv: -kv[1])[:3],
}))
"""


def docker(*args: str, timeout: float = 300, input: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["docker", *args], check=False, capture_output=True, text=True, timeout=timeout, input=input
    )


def compose_config(stack: Stack) -> dict[str, Any]:
    """The merged, interpolated compose model (`docker compose config --format json`)."""
    out = stack.run("config", "--format", "json", capture=True, quiet=True).stdout
    config: dict[str, Any] = json.loads(out)
    return config


def table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = [" | ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)) for row in [header, *rows]]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def megabytes(n: float) -> str:
    return f"{n / 1e6:.0f} MB" if n < 1e9 else f"{n / 1e9:.2f} GB"


def copy_sources() -> list[str]:
    """The build-context paths docker/Dockerfile copies (COPY without --from)."""
    sources = []
    text = re.sub(r"\\\n", " ", (ROOT / "docker" / "Dockerfile").read_text())
    for line in text.splitlines():
        words = line.split()
        if words[:1] == ["COPY"] and not any(w.startswith("--from") for w in words):
            sources += [w.strip("/") for w in words[1:-1] if not w.startswith("--")]
    return sources


def check_build_context(problems: list[str]) -> dict[str, Any]:
    """The context BuildKit receives (exported as a tar: FROM scratch, COPY . /): size, files, and
    that it holds only what the Dockerfile copies, no cache and no local state."""
    done = subprocess.run(
        ["docker", "build", "--file", "-", "--output", "type=tar,dest=-", str(ROOT)],
        input=CONTEXT_DOCKERFILE.encode(),
        capture_output=True,
        check=False,
        timeout=300,
        env={**os.environ, "DOCKER_BUILDKIT": "1"},
    )
    if done.returncode != 0:
        problems.append(f"build context: could not export it: {done.stderr.decode()[-500:]}")
        return {}
    sizes: dict[str, int] = {}
    with tarfile.open(fileobj=io.BytesIO(done.stdout), mode="r:") as tar:
        for member in tar:
            if member.isfile():
                sizes[member.name.lstrip("./")] = member.size
    sources = copy_sources()
    stray = sorted(p for p in sizes if not any(p == s or p.startswith(s + "/") for s in sources))
    banned = sorted(
        p for p in sizes if CONTEXT_NEVER & set(p.split("/")) or p.endswith(".pyc") or p.endswith(".env")
    )
    if stray:
        problems.append(f"build context: {len(stray)} file(s) no COPY uses, e.g. {stray[:5]}")
    if banned:
        problems.append(f"build context: caches or local state, e.g. {banned[:5]}")
    by_top: dict[str, int] = {}
    for path, size in sizes.items():
        top = path.split("/")[0]
        by_top[top] = by_top.get(top, 0) + size
    total = sum(sizes.values())
    figures: dict[str, Any] = {"bytes": total, "files": len(sizes), "by_top": by_top}
    log(
        f"build context: {total / 1e6:.2f} MB in {len(sizes)} files ("
        + ", ".join(f"{k} {v / 1e3:.0f} kB" for k, v in sorted(by_top.items(), key=lambda kv: -kv[1]))
        + ")"
    )
    return figures


def built_images(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """image -> {target, cuda (built with CUDA requirements), services}, from the compose model."""
    images: dict[str, dict[str, Any]] = {}
    for name, service in sorted(config["services"].items()):
        build = service.get("build") or {}
        args = " ".join(str(v) for v in (build.get("args") or {}).values())
        entry = images.setdefault(
            service["image"],
            {"target": build.get("target", "?"), "cuda": "gpu" in args or "cuda" in args, "services": []},
        )
        entry["services"].append(name)
    return images


def check_images(config: dict[str, Any], problems: list[str]) -> list[list[str]]:
    """Each image the compose model builds: measured, then judged. Returns the table's rows."""
    rows = []
    for image, about in built_images(config).items():
        target, cuda = str(about["target"]), bool(about["cuda"])
        onnx_only = target in ("fastapi-onnx", "grpc-onnx", "ui")
        inspect = docker("image", "inspect", "--format", "{{json .}}", image)
        if inspect.returncode != 0:
            problems.append(f"{image}: not built ({inspect.stderr.strip()})")
            continue
        meta = json.loads(inspect.stdout)
        size = int(meta["Size"])
        env = dict(e.split("=", 1) for e in meta["Config"].get("Env") or [])
        uid = docker("run", "--rm", "--network", "none", "--entrypoint", "id", image, "-u").stdout.strip()
        probe = docker(
            "run", "--rm", "--network", "none", "--read-only", "--user", "0", "--entrypoint", "python",
            image, "-c", IMAGE_PROBE, *TORCH_MODULES, "onnxruntime",
        )  # fmt: skip
        if probe.returncode != 0:
            problems.append(f"{image}: the probe failed: {probe.stderr[-500:]}")
            continue
        found = json.loads(probe.stdout.strip().splitlines()[-1])
        torch = sorted(m for m in TORCH_MODULES if found["modules"][m]) + found["torch_dists"]
        cuda_things = found["cuda_libs"] + found["cuda_dists"]
        leftovers = found["apt"] + found["caches"] + found["wheels"] + [f"/tmp/{n}" for n in found["tmp"]]
        mine = []
        if uid != USER_ID or meta["Config"].get("User", "").split(":")[0] != USER_ID:
            mine.append(f"runs as uid {uid!r} (image user {meta['Config'].get('User')!r}), not {USER_ID}")
        if onnx_only and (torch or found["torch_libs"]):
            mine.append(f"torch in an ONNX image: {sorted(set(torch))} {found['torch_libs'][:3]}")
        if cuda_things and not cuda:
            mine.append(f"CUDA in a CPU build: {cuda_things[:5]} ({len(cuda_things)} in all)")
        if found["build_tools"]:
            mine.append(f"build tools: {found['build_tools']}")
        if leftovers:
            mine.append(f"left from the build: {leftovers[:5]}")
        if found["modules"]["onnxruntime"] and env.get("ORT_DISABLE_TELEMETRY") != "1":
            mine.append("ONNX Runtime's telemetry is not off (ORT_DISABLE_TELEMETRY=1)")
        problems += [f"{image}: {m}" for m in mine]
        largest = ", ".join(f"{n} {megabytes(b)}" for n, b in found["largest"])
        cuda_found = f"{len(found['cuda_libs'])} libs, {len(found['cuda_dists'])} wheels"
        rows.append(
            [
                image,
                megabytes(size),
                uid,
                "yes" if torch else "no",
                cuda_found if cuda_things else "none",
                ", ".join(os.path.basename(t) for t in found["build_tools"]) or "none",
                "none" if not leftovers else str(len(leftovers)),
                f"{megabytes(found['site_packages'])} ({largest})",
                "ok" if not mine else "FAIL",
            ]
        )
    return rows


IMAGE_HEADER = [
    "image", "size", "uid", "torch", "CUDA (libs, wheels)", "build tools", "apt/pip/tmp leftovers",
    "site-packages (largest)", "",
]  # fmt: skip


def big_upload() -> bytes:
    """A PNG of noise over every spool threshold (Starlette 1 MB, waitress 512 KB): ~4.3 MB."""
    import numpy as np
    from PIL import Image

    noise = np.random.default_rng(16).integers(0, 255, (1200, 1200, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(noise).save(out, "PNG")
    return out.getvalue()


def exec_sh(stack: Stack, service: str, script: str) -> subprocess.CompletedProcess[str]:
    return stack.run("exec", "-T", service, "sh", "-c", script, check=False, capture=True, quiet=True)


def check_hardening(stack: Stack, config: dict[str, Any], problems: list[str]) -> list[list[str]]:
    """Each container of the stack as the compose file says: read-only root, tmpfs, no capabilities,
    no-new-privileges, the image's user; a write to / refused, /tmp writable. Returns table rows."""
    import requests

    ids = {str(r["Service"]): str(r["ID"]) for r in stack.services()}
    rows = []
    for name, service in sorted(config["services"].items()):
        if name not in ids:
            problems.append(f"{name}: no container")
            continue
        info = json.loads(docker("inspect", "--format", "{{json .}}", ids[name]).stdout)
        host = info["HostConfig"]
        mine = []
        readonly = bool(host.get("ReadonlyRootfs"))
        tmpfs = sorted((host.get("Tmpfs") or {}).keys())
        caps = host.get("CapDrop") or []
        nnp = any(o.startswith("no-new-privileges") for o in host.get("SecurityOpt") or [])
        if not readonly:
            mine.append("root filesystem writable")
        if sorted(service.get("tmpfs") or []) != tmpfs or "/tmp" not in tmpfs:
            mine.append(f"tmpfs {tmpfs}")
        if [c.upper().removeprefix("CAP_") for c in caps] != ["ALL"]:
            mine.append(f"cap_drop {caps}")
        if not nnp:
            mine.append("no no-new-privileges")
        running = info["State"]["Running"]
        write = tmp = status = "-"
        if running:
            done = exec_sh(stack, name, "touch /.rw-probe")
            refused = done.returncode != 0 and "Read-only file system" in done.stderr
            write = "refused" if refused else "ALLOWED"
            if not refused:
                mine.append(f"a write to / not refused as read-only: {done.returncode} {done.stderr.strip()}")
            done = exec_sh(stack, name, 'd=$(mktemp -d) && rm -r "$d"')
            tmp = "writable" if done.returncode == 0 else "NOT writable"
            if done.returncode != 0:
                mine.append(f"/tmp not writable: {done.stderr.strip()}")
            status = exec_sh(stack, name, "grep -E '^(Uid|CapEff|NoNewPrivs)' /proc/1/status").stdout
            fields = {k: v.split() for k, _, v in (line.partition(":") for line in status.splitlines())}
            expected_uid = str(service.get("user") or USER_ID).split(":")[0]
            if fields.get("Uid", ["?"])[0] != expected_uid:
                mine.append(f"PID 1 runs as uid {fields.get('Uid')}, not {expected_uid}")
            if fields.get("CapEff") != ["0000000000000000"] or fields.get("NoNewPrivs") != ["1"]:
                mine.append(f"PID 1: CapEff {fields.get('CapEff')}, NoNewPrivs {fields.get('NoNewPrivs')}")
            status = f"uid {fields.get('Uid', ['?'])[0]}, CapEff {int(fields.get('CapEff', ['1'])[0], 16):x}"
        else:
            code = info["State"]["ExitCode"]
            status = f"exited {code}"
            if code != 0:
                mine.append(f"exited {code}")
        problems += [f"{name}: {m}" for m in mine]
        rows.append(
            [name, "yes" if readonly else "NO", ",".join(tmpfs) or "-", ",".join(caps) or "-",
             "yes" if nnp else "no", write, tmp, status, "ok" if not mine else "FAIL"]
        )  # fmt: skip
    # What /tmp is there for: an upload large enough to be spooled to a temporary file.
    photo = big_upload()
    for service, url, expected in (
        ("api", f"http://127.0.0.1:{PORTS['api']}/predict/file", '"prediction"'),
        ("ui", f"http://127.0.0.1:{PORTS['ui']}/", "<html"),
    ):
        try:
            r = requests.post(url, files={"file": ("noise.png", photo, "image/png")}, timeout=120)
            ok = r.status_code == 200 and expected in r.text
            what = f"{r.status_code}"
        except requests.RequestException as exc:
            ok, what = False, f"{type(exc).__name__}: {exc}"
        log(f"{service}: a {len(photo) / 1e6:.1f} MB upload (spooled to /tmp): {what}")
        if not ok:
            problems.append(f"{service}: a {len(photo) / 1e6:.1f} MB upload failed: {what}")
    # Nothing hit the read-only root, a missing temporary directory or a telemetry write.
    logs = stack.run("logs", "--no-color", check=False, capture=True, quiet=True)
    pattern = re.compile(
        r"Read-only file system|No usable temporary directory|Failed to persist telemetry|Permission denied"
    )
    hits = [line.strip() for line in (logs.stdout + logs.stderr).splitlines() if pattern.search(line)]
    if hits:
        problems.append(f"the services logged {len(hits)} write error(s), e.g. {hits[:3]}")
    else:
        log("logs: no read-only, temporary-directory, telemetry or permission error in any service's")
    return rows


HARDENING_HEADER = [
    "service", "read-only root", "tmpfs", "cap_drop", "no-new-privileges", "write to /", "/tmp", "PID 1",
    "",
]  # fmt: skip


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
    parser.add_argument(
        "--no-hygiene",
        action="store_true",
        help="skip the hygiene checks (build context, image contents, read-only containers)",
    )
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
    problems: list[str] = []
    """Hygiene findings: collected, the stack still checked, then reported together."""
    try:
        ports_free()
        config = compose_config(stack)
        if not args.no_build:
            t = time.monotonic()
            stack.run("build")
            log(f"build: {time.monotonic() - t:.1f} s")
        if not args.no_hygiene:
            check_build_context(problems)
            t = time.monotonic()
            rows = check_images(config, problems)
            log(f"image hygiene ({time.monotonic() - t:.1f} s):\n" + table(IMAGE_HEADER, rows))
        t = time.monotonic()
        stack.run("up", "-d")
        log(f"up -d returned after {time.monotonic() - t:.1f} s")
        healthy = wait_healthy(stack, args.healthy_timeout)
        log(f"all healthy {time.monotonic() - t:.1f} s after `up` ({healthy:.1f} s of waiting)")
        time.sleep(5)
        memory = idle_memory()
        # compose's default layout, unless the host asks for the fixed one, PyTorch or the GPU file
        expect_adaptive = (
            backend == "onnx"
            and os.environ.get("VISION_LAYOUT", "adaptive") == "adaptive"
            and not any("gpu" in Path(f).name for f in files)
        )
        check_http(photos, figures, expect_adaptive)
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
        if not args.no_hygiene:
            rows = check_hardening(stack, config, problems)
            log("containers (read-only root, tmpfs, capabilities):\n" + table(HARDENING_HEADER, rows))
        images = sorted(built_images(config))
        log("image sizes: " + ", ".join(f"{k} {v}" for k, v in image_sizes(images).items()))
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
    if problems:
        failed = (failed + "\n" if failed else "") + "hygiene:\n  " + "\n  ".join(problems)
    if failed:
        print(f"FAILED: {failed}", flush=True)
        return 1
    hygiene = "" if args.no_hygiene else "; hygiene and read-only containers checked"
    print(
        f"PASSED: built, healthy, answered over HTTP, gRPC, the UI and JupyterLab, came down{hygiene}",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

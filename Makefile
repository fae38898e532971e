# edge-agent: `make run` bootstraps a fresh Debian machine and starts the agent on
# its embedded defaults; `make test` bootstraps the same way and runs the suite.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# System packages the native build, the tests and the benchmarks need.
APT_PACKAGES := clang lld wasi-libc libclang-rt-14-dev-wasm32 \
	mosquitto mosquitto-clients docker-registry skopeo wrk systemd apache2-utils nghttp2-client \
	cmake g++
PYTEST_ARGS ?=
RUN_ARGS ?=

.PHONY: all bootstrap system-deps venv native run test lint bench clean distclean grpc-stubs

all: bootstrap

bootstrap: system-deps $(VENV)/.installed native

# Installs only what is missing; needs root (or passwordless sudo) for apt.
system-deps:
	@scripts/install-system-deps.sh $(APT_PACKAGES)

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev,bench,convert,llm]'
	touch $@

venv: $(VENV)/.installed

# Rebuilds the wasm kernels and checks they match the committed package data.
native: $(VENV)/.installed
	$(MAKE) -s -C native check

# Regenerates agent/server/proto/*_pb2* from inference.proto (grpcio-tools, pinned in the dev extra);
# tests/test_grpc.py checks the committed files are what this makes.
grpc-stubs: $(VENV)/.installed
	$(BIN)/python scripts/gen_grpc.py

run: bootstrap
	$(BIN)/edge-agent run $(RUN_ARGS)

lint: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: bootstrap
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/python -m pytest -q -ra $(PYTEST_ARGS)

# The KServe anchor pins its own dependency set: it gets a venv of its own.
.venv-bench/.installed:
	$(PYTHON) -m venv .venv-bench
	.venv-bench/bin/pip install -q kserve onnxruntime
	touch $@

bench: bootstrap .venv-bench/.installed
	$(BIN)/python bench/run_all.py

clean:
	$(MAKE) -s -C native clean
	rm -rf .pytest_cache .ruff_cache

distclean: clean
	rm -rf $(VENV) .venv-bench

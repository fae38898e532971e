# edge-agent: `make run` bootstraps a fresh Debian machine and starts the agent on
# its embedded defaults; `make test` bootstraps the same way and runs the suite.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# System packages the native build, the tests and the benchmarks need.
APT_PACKAGES := clang lld wasi-libc libclang-rt-14-dev-wasm32 \
	mosquitto mosquitto-clients docker-registry skopeo wrk systemd apache2-utils nghttp2-client \
	cmake g++ \
	podman buildah runc debootstrap
PYTEST_ARGS ?=
RUN_ARGS ?=

.PHONY: all bootstrap system-deps venv native run test lint bench clean distclean grpc-stubs image image-archive bundle

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

# The offline bundle for bare nodes (docs/DEPLOY.md): dist/edge-agent-bundle-<version>-<python tag>-<arch>.tar.gz
# with the agent's wheel, every runtime dependency's wheel for PYTHON_VERSION on PLATFORM (manylinux_2_<glibc
# minor>_<arch>: that glibc or older), the systemd files, a sample config and install.sh/uninstall.sh.
# BUNDLE_LLM=1 adds the llm extra (llama-cpp-python is built from source: only for this machine's Python/arch).
PYTHON_VERSION ?= 3.11
PLATFORM ?= manylinux_2_36_$(shell uname -m)
BUNDLE_LLM ?=
bundle: $(VENV)/.installed
	$(BIN)/python scripts/make-bundle.py --python-version $(PYTHON_VERSION) --platform $(PLATFORM) \
		$(if $(BUNDLE_LLM),--extra llm)

# The KServe anchor pins its own dependency set: it gets a venv of its own.
.venv-bench/.installed:
	$(PYTHON) -m venv .venv-bench
	.venv-bench/bin/pip install -q kserve onnxruntime
	touch $@

bench: bootstrap .venv-bench/.installed
	$(BIN)/python bench/run_all.py

# The container image (k3s-manifests/Containerfile; docs/DEPLOY.md, "The image"). BASE: another
# base image (default: the Containerfile's python:3.11-slim-bookworm). CONTAINER_ENGINE: podman or
# docker, with any global flags (the tests pass podman's storage and runtime flags).
CONTAINER_ENGINE ?= $(shell command -v podman 2>/dev/null || command -v docker 2>/dev/null)
# The name the DaemonSet runs (k3s-manifests/base/daemonset.yaml); an overlay's `images:` renames it.
IMAGE ?= registry.example.com/edge-agent:0.1.0
IMAGE_ARCHIVE ?= dist/edge-agent-image.tar
BASE ?=
# More `build` flags, e.g. --network host where the engine has no container networking.
IMAGE_BUILD_FLAGS ?=
IMAGE_WHEELS := build/image-wheels
# podman's default OCI format has no HEALTHCHECK; docker's builder always writes docker format.
ENGINE_IS_PODMAN = $(findstring podman,$(CONTAINER_ENGINE))

# The wheels the image is built from, downloaded here so the image build needs no network:
# pip, setuptools and wheel (to build the agent's wheel), and every runtime dependency (no extras)
# for this machine's Python and architecture. Fetched again when pyproject.toml changes.
# Any pip will do (the venv's when there is one): this must not set up or change the venv.
IMAGE_PIP = $(if $(wildcard $(BIN)/pip),$(BIN)/pip,$(PYTHON) -m pip)
$(IMAGE_WHEELS)/.complete: pyproject.toml
	rm -rf $(IMAGE_WHEELS)
	$(IMAGE_PIP) download -q --dest $(IMAGE_WHEELS) --only-binary=:all: pip setuptools wheel .
	touch $@

image: $(IMAGE_WHEELS)/.complete
	@test -n "$(CONTAINER_ENGINE)" || { echo "make image: needs podman or docker" >&2; exit 1; }
	$(CONTAINER_ENGINE) build $(if $(ENGINE_IS_PODMAN),--format docker) $(IMAGE_BUILD_FLAGS) \
		-f k3s-manifests/Containerfile $(if $(BASE),--build-arg BASE=$(BASE)) -t $(IMAGE) .
	@echo "$(IMAGE): $$($(CONTAINER_ENGINE) image inspect --format '{{.Size}}' $(IMAGE)) bytes uncompressed"

# A docker-archive tarball of the image, for nodes without a registry: `podman load`,
# `docker load`, `k3s ctr images import`, or K3s' own /var/lib/rancher/k3s/agent/images/.
image-archive: image
	@mkdir -p $(dir $(IMAGE_ARCHIVE))
	rm -f $(IMAGE_ARCHIVE)
	$(CONTAINER_ENGINE) save $(if $(ENGINE_IS_PODMAN),--format docker-archive) -o $(IMAGE_ARCHIVE) $(IMAGE)
	@ls -l $(IMAGE_ARCHIVE)

clean:
	$(MAKE) -s -C native clean
	rm -rf .pytest_cache .ruff_cache

distclean: clean
	rm -rf $(VENV) .venv-bench

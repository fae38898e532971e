"""Media types and annotation keys of edge-agent model images (docs/IMAGE_FORMAT.md).

The config blob is the model's ``model.json`` verbatim under a media type of
our own, versioned, so a future format is a new name and never a silent change.
The module layer uses ``application/wasm`` as the CNCF wasm OCI artifact
convention does; the signature names are cosign's. A WASI-NN model's weights
layer names the backend file's format (ONNX, GGUF, TorchScript) rather than
safetensors.
"""

from __future__ import annotations

# OCI
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYOUT_VERSION = "1.0.0"
# Docker's schema 2, which older cosign versions use for signature manifests.
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"

# edge-agent model image
MODEL_CONFIG = "application/vnd.edge-agent.model.config.v1+json"
MODEL_CONFIG_PREFIX = "application/vnd.edge-agent.model.config."
WASM_MODULE = "application/wasm"
WEIGHTS = "application/vnd.edge-agent.model.weights.v1.safetensors"
# A WASI-NN model's weights layer: the backend's own model file, one media type per wasi_nn.encoding.
WEIGHTS_ONNX = "application/vnd.edge-agent.model.weights.v1.onnx"
WEIGHTS_GGUF = "application/vnd.edge-agent.model.weights.v1.gguf"
WEIGHTS_TORCHSCRIPT = "application/vnd.edge-agent.model.weights.v1.torchscript"
NN_WEIGHTS = {"onnx": WEIGHTS_ONNX, "ggml": WEIGHTS_GGUF, "pytorch": WEIGHTS_TORCHSCRIPT}
# Every weights layer media type an image may carry (exactly one of them, once).
WEIGHTS_TYPES = (WEIGHTS, WEIGHTS_ONNX, WEIGHTS_GGUF, WEIGHTS_TORCHSCRIPT)


def weights_type(encoding: str | None) -> str:
    """The weights layer's media type for a model.json's ``wasi_nn.encoding`` (None: not WASI-NN)."""
    return WEIGHTS if encoding is None else NN_WEIGHTS[encoding]


# cosign
SIMPLE_SIGNING = "application/vnd.dev.cosign.simplesigning.v1+json"
SIGNATURE_ANNOTATION = "dev.cosignproject.cosign/signature"
COSIGN_SIGNATURE_TYPE = "cosign container image signature"

# annotations
TITLE = "org.opencontainers.image.title"
VERSION = "org.opencontainers.image.version"
DESCRIPTION = "org.opencontainers.image.description"
REF_NAME = "org.opencontainers.image.ref.name"
ABI_VERSION = "dev.edge-agent.model.abi-version"

# What a pull asks a registry for: an image manifest, in either dialect, so the
# registry never has to convert; an index is asked for only to refuse it clearly.
MANIFEST_ACCEPT = ", ".join((OCI_MANIFEST, DOCKER_MANIFEST, OCI_INDEX, DOCKER_MANIFEST_LIST))

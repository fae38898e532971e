"""Where the shared kernel library lives: package data, built from native/onnx/."""

from __future__ import annotations

import hashlib
import os
from importlib import resources

ENV_OVERRIDE = "EDGE_AGENT_ONNX_KERNELS"


def kernel_module() -> bytes:
    """The bytes of onnx_kernels.wasm.

    ``EDGE_AGENT_ONNX_KERNELS`` names another build (a developer's ``make -C native
    onnx BUILD_DIR=...``); otherwise the copy shipped in the package, which
    ``make -C native check`` proves is what native/onnx builds to.
    """
    override = os.environ.get(ENV_OVERRIDE)
    if override:
        with open(override, "rb") as fh:
            return fh.read()
    return resources.files("agent.bundled").joinpath("kernels/onnx_kernels.wasm").read_bytes()


def kernel_digest() -> str:
    return "sha256:" + hashlib.sha256(kernel_module()).hexdigest()

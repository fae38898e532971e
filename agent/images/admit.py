"""Recording a pulled or imported image as a model version, without reading its blobs again.

The module and weights were hashed as they streamed into the store, so what
is left are the rules every way in applies (``agent.artefacts``): the module
is WebAssembly within ABI v1, the weights hold exactly the declared tensors
(a WASI-NN model's: the weights layer's media type and the file's format are
the ``wasi_nn.encoding`` backend's), and the name:version is not taken by
other content. The module and weights
are judged from their headers: a 200 MB weights blob is not read a second and
third time (and never held in memory) just to be admitted. The runtime parses
the weights in full when it loads the version, as it does for every version.
"""

from __future__ import annotations

from agent.artefacts import (
    check_module_file,
    check_nn_spec,
    check_nn_weights_file,
    check_version_free,
    check_weights_file,
    label,
    version_conflict,
)
from agent.cas import BlobStore
from agent.errors import InvalidModel
from agent.images import mediatypes as mt
from agent.images.manifest import ModelManifest
from agent.spec import ModelSpec
from agent.state import StateDB, VersionRecord


def manifest_digests(manifest: ModelManifest) -> tuple[str, str, str]:
    """(model.json, module, weights) digests of an image, in the order a version record holds them."""
    return manifest.config.digest, manifest.module.digest, manifest.weights.digest


def check_conflict(db: StateDB, spec: ModelSpec, manifest: ModelManifest) -> str | None:
    """Why this image may not be recorded: its name:version is taken by other content.

    Asked before any layer is fetched, and again at admission.
    """
    return version_conflict(spec, manifest_digests(manifest), db.get_version(spec.name, spec.version))


def layers_mismatch(spec: ModelSpec, manifest: ModelManifest) -> str | None:
    """Why the image's weights layer is not what its model.json says the weights are (safetensors,
    or the ``wasi_nn.encoding`` backend's file). Asked before any layer is fetched, and at admission."""
    encoding = spec.wasi_nn.encoding if spec.wasi_nn is not None else None
    want = mt.weights_type(encoding)
    have = manifest.weights.media_type
    if have == want:
        return None
    says = f"wasi_nn.encoding {encoding!r}" if encoding is not None else "no wasi_nn section (safetensors weights)"
    return f"{label(spec)}: its weights layer is {have!r} but its model.json has {says} (weights layer {want!r})"


def admit(
    blobs: BlobStore, db: StateDB, manifest: ModelManifest, config: bytes, spec: ModelSpec, source: str
) -> VersionRecord:
    """Record the version whose blobs are all in the store (module and weights already verified)."""
    mismatch = layers_mismatch(spec, manifest)
    if mismatch:
        raise InvalidModel(mismatch)
    check_module_file(spec, blobs.path(manifest.module.digest))
    if spec.wasi_nn is not None:
        check_nn_spec(spec)
        check_nn_weights_file(spec, blobs.path(manifest.weights.digest))
    else:
        check_weights_file(spec, blobs.path(manifest.weights.digest))
    blobs.put_bytes(config, expected=manifest.config.digest)
    # The manifest goes in before the record, so a record never names a manifest that is missing
    # (a kill -9 in between leaves an orphan blob for gc, nothing worse).
    blobs.put_bytes(manifest.raw, expected=manifest.digest)
    digests = manifest_digests(manifest)
    check_version_free(spec, digests, db.get_version(spec.name, spec.version))
    return db.add_version(spec.name, spec.version, *digests, source=source, manifest_digest=manifest.digest)

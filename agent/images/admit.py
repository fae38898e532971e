"""Recording a pulled or imported image as a model version, without reading its blobs again.

The module and weights were hashed as they streamed into the store, so what
is left are the rules every way in applies (``agent.artefacts``): the module
is WebAssembly within ABI v1, the weights hold exactly the declared tensors,
and the name:version is not taken by other content. The module and weights
are judged from their headers: a 200 MB weights blob is not read a second and
third time (and never held in memory) just to be admitted. The runtime parses
the weights in full when it loads the version, as it does for every version.
"""

from __future__ import annotations

from agent.artefacts import check_module_file, check_version_free, check_weights_file, version_conflict
from agent.cas import BlobStore
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


def admit(
    blobs: BlobStore, db: StateDB, manifest: ModelManifest, config: bytes, spec: ModelSpec, source: str
) -> VersionRecord:
    """Record the version whose blobs are all in the store (module and weights already verified)."""
    check_module_file(spec, blobs.path(manifest.module.digest))
    check_weights_file(spec, blobs.path(manifest.weights.digest))
    blobs.put_bytes(config, expected=manifest.config.digest)
    # The manifest goes in before the record, so a record never names a manifest that is missing
    # (a kill -9 in between leaves an orphan blob for gc, nothing worse).
    blobs.put_bytes(manifest.raw, expected=manifest.digest)
    digests = manifest_digests(manifest)
    check_version_free(spec, digests, db.get_version(spec.name, spec.version))
    return db.add_version(spec.name, spec.version, *digests, source=source, manifest_digest=manifest.digest)

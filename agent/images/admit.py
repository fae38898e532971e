"""Recording a pulled or imported image as a model version, without reading its blobs again.

The module and weights were hashed as they streamed into the store, so what
is left to check is what :meth:`ModelRepository.validate` checks for a local
import — the module is WebAssembly, the weights hold exactly the declared
tensors — done from the files' headers: a 200 MB weights blob is not read a
second and third time (and never held in memory) just to be admitted. The
runtime parses the weights in full when it loads the version, as it does for
every version.
"""

from __future__ import annotations

from pathlib import Path

import safetensors

from agent.cas import BlobStore
from agent.errors import InvalidModel
from agent.images.manifest import ModelManifest
from agent.runtime.footprint import check_module_shape
from agent.spec import SAFETENSORS_DTYPES, ModelSpec
from agent.state import StateDB, VersionRecord


def check_module_file(spec: ModelSpec, path: Path) -> None:
    with open(path, "rb") as fh:
        if fh.read(4) != b"\0asm":
            raise InvalidModel(f"{spec.name}:{spec.version}: module is not a WebAssembly binary")
        fh.seek(0)
        # Memories, tables and imports within ABI v1, from the section headers (no compile).
        check_module_shape(fh, f"{spec.name}:{spec.version}")


def check_weights_file(spec: ModelSpec, path: Path) -> None:
    """The parameter tensors' names, dtypes and shapes against model.json, from the safetensors header.

    safetensors checks on open that the header's offsets tile the file exactly, so a
    truncated or padded file is refused here too.
    """
    where = f"{spec.name}:{spec.version}"
    try:
        with safetensors.safe_open(str(path), framework="np") as st:
            tensors = {name: st.get_slice(name) for name in st.keys()}  # noqa: SIM118 - safe_open is not a dict
            found = {name: (s.get_dtype(), tuple(s.get_shape())) for name, s in tensors.items()}
    except safetensors.SafetensorError as exc:
        raise InvalidModel(f"{where}: weights are not valid safetensors: {exc}") from exc
    declared = {p.name for p in spec.params}
    extra = set(found) - declared
    if extra:
        raise InvalidModel(f"{where}: weights hold undeclared tensor(s) {sorted(extra)}")
    for pspec in spec.params:
        if pspec.name not in found:
            raise InvalidModel(f"{where}: weights lack parameter {pspec.name}")
        dtype, shape = found[pspec.name]
        want = SAFETENSORS_DTYPES[pspec.datatype]
        if dtype != want or shape != tuple(pspec.shape):
            raise InvalidModel(
                f"{where}: parameter {pspec.name} is {dtype}{list(shape)}, "
                f"model.json declares {want}{list(pspec.shape)}"
            )


def check_conflict(db: StateDB, spec: ModelSpec, manifest: ModelManifest) -> str | None:
    """Why this image may not be recorded: its name:version is taken by other content."""
    existing = db.get_version(spec.name, spec.version)
    wanted = (manifest.config.digest, manifest.module.digest, manifest.weights.digest)
    if existing is not None and existing.status == "ready" and existing.digests != wanted:
        return (
            f"{spec.name}:{spec.version} is already stored with different content (from {existing.source}); "
            "a new build needs a new version"
        )
    return None


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
    conflict = check_conflict(db, spec, manifest)
    if conflict:
        raise InvalidModel(conflict)
    return db.add_version(
        spec.name,
        spec.version,
        manifest.config.digest,
        manifest.module.digest,
        manifest.weights.digest,
        source=source,
        manifest_digest=manifest.digest,
    )

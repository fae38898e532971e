"""The local model repository: model versions as blobs in the store plus their records.

Every way a model reaches the node — the bundled reference models, ``edge-agent
import DIR``, a pulled OCI image, the drop-in folder — ends in
:meth:`ModelRepository.add_artefacts`: three blobs (model.json, module,
weights) and one ``versions`` row naming their digests.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from agent.cas import BlobStore, sha256_digest
from agent.errors import InvalidModel, NotFound
from agent.runtime.footprint import check_module_shape
from agent.runtime.loaded import parse_weights
from agent.spec import ModelSpec
from agent.state import StateDB, VersionRecord

BUNDLED_PACKAGE = "agent.bundled"


@dataclass(frozen=True)
class Artefacts:
    """The three files of a model version, in memory."""

    config: bytes
    module: bytes
    weights: bytes

    @classmethod
    def from_dir(cls, directory: Path) -> Artefacts:
        directory = Path(directory)
        meta = directory / "model.json"
        if not meta.is_file():
            raise InvalidModel(f"{directory} has no model.json")
        config = meta.read_bytes()
        spec = ModelSpec.from_bytes(config)
        files = {}
        for kind, fname in (("module", spec.module_file), ("weights", spec.weights_file)):
            path = directory / fname
            if not path.is_file():
                raise InvalidModel(f"{directory} lacks {fname} (the model's {kind})")
            files[kind] = path.read_bytes()
        return cls(config=config, module=files["module"], weights=files["weights"])


class ModelRepository:
    def __init__(self, blobs: BlobStore, db: StateDB):
        self.blobs = blobs
        self.db = db

    def validate(self, artefacts: Artefacts) -> ModelSpec:
        """Check everything that can be checked without instantiating the module."""
        spec = ModelSpec.from_bytes(artefacts.config)
        if artefacts.module[:4] != b"\0asm":
            raise InvalidModel(f"{spec.name}:{spec.version}: module is not a WebAssembly binary")
        check_module_shape(artefacts.module, f"{spec.name}:{spec.version}")
        parse_weights(spec, artefacts.weights)
        return spec

    def add_artefacts(self, artefacts: Artefacts, source: str, manifest_digest: str | None = None) -> VersionRecord:
        """Store the blobs and record the version (replacing a same-named version's record)."""
        spec = self.validate(artefacts)
        existing = self.db.get_version(spec.name, spec.version)
        digests = (
            sha256_digest(artefacts.config),
            sha256_digest(artefacts.module),
            sha256_digest(artefacts.weights),
        )
        if existing is not None and existing.digests != digests and existing.status == "ready":
            raise InvalidModel(
                f"{spec.name}:{spec.version} is already stored with different content; give the new build a new version"
            )
        for data, digest in zip((artefacts.config, artefacts.module, artefacts.weights), digests, strict=True):
            self.blobs.put_bytes(data, expected=digest)
        return self.db.add_version(spec.name, spec.version, *digests, source=source, manifest_digest=manifest_digest)

    def import_dir(self, directory: Path) -> VersionRecord:
        directory = Path(directory).resolve()
        return self.add_artefacts(Artefacts.from_dir(directory), source=f"import:{directory}")

    def resolve(self, model: str, version: str | None = None) -> VersionRecord:
        """A stored version: the named one, else the active one, else the newest."""
        if version is not None:
            record = self.db.get_version(model, version)
            if record is None:
                raise NotFound(f"model {model} has no stored version {version}")
            return record
        mrec = self.db.get_model(model)
        if mrec is not None and mrec.active_version:
            record = self.db.get_version(model, mrec.active_version)
            if record is not None:
                return record
        versions = self.db.versions(model)
        if not versions:
            raise NotFound(f"no model named {model} in the store")
        return versions[-1]

    def seed_bundled(self) -> list[VersionRecord]:
        """Import each bundled reference model that the store does not hold yet."""
        added = []
        for directory in bundled_model_dirs():
            spec = ModelSpec.from_bytes((directory / "model.json").read_bytes())
            if self.db.get_version(spec.name, spec.version) is not None:
                continue
            record = self.add_artefacts(Artefacts.from_dir(directory), source="bundled")
            if self.db.get_model(spec.name) is None or not self.db.get_model(spec.name).active_version:
                self.db.set_active(spec.name, spec.version)
            added.append(record)
        return added


def bundled_model_dirs() -> list[Path]:
    root = resources.files(BUNDLED_PACKAGE)
    dirs = []
    for entry in root.iterdir():
        if entry.is_dir() and entry.joinpath("model.json").is_file():
            dirs.append(Path(str(entry)))
    return sorted(dirs)

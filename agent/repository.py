"""The local model repository: model versions as blobs in the store plus their records.

``edge-agent import DIR`` and the bundled reference models end in
:meth:`ModelRepository.add_artefacts`: the artefacts judged by
``agent.artefacts`` (the rules a pulled image's admission and ``image build``
apply too), then three blobs (model.json, module, weights) and one
``versions`` row naming their digests.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from importlib import resources
from pathlib import Path

from agent.artefacts import Artefacts, check_version_free, read_model_spec, validate
from agent.cas import BlobStore
from agent.errors import AgentError, CorruptBlob, InvalidModel, NotFound
from agent.spec import ModelSpec
from agent.state import StateDB, VersionRecord

__all__ = ["BUNDLED_PACKAGE", "Artefacts", "ModelRepository", "bundled_model_dirs", "model_dirs"]

BUNDLED_PACKAGE = "agent.bundled"


class ModelRepository:
    def __init__(self, blobs: BlobStore, db: StateDB):
        self.blobs = blobs
        self.db = db

    def add_artefacts(self, artefacts: Artefacts, source: str, manifest_digest: str | None = None) -> VersionRecord:
        """Judge the artefacts (``agent.artefacts``), store the blobs and record the version.

        A same-named version's record is replaced only when its content is the same, or when it is
        not ready (broken): other content under a served name:version is refused.
        """
        spec = validate(artefacts)
        digests = artefacts.digests
        check_version_free(spec, digests, self.db.get_version(spec.name, spec.version))
        _put_artefacts(self.blobs, artefacts, digests, durable=True)
        return self.db.add_version(spec.name, spec.version, *digests, source=source, manifest_digest=manifest_digest)

    def import_dirs(
        self,
        directories: list[Path],
        *,
        activate: bool,
        on_each: Callable[[Path, VersionRecord | AgentError, bool], None],
        batch: int = 256,
    ) -> None:
        """Import many model directories, one by one as :meth:`import_dir` would, with one sync
        of the file system per ``batch`` rather than two fsyncs per blob: each batch's blobs are
        written, then synced (``BlobStore.sync``: syncfs), then moved under their digests (``BlobStore.publish``),
        then recorded, so a row never names a blob that a crash could lose, nor a digest a torn
        file. ``on_each(directory, record or the refusal, activated)`` is called for every directory.
        A version becomes active with ``activate``, or when its model has none.
        """
        for lo in range(0, len(directories), batch):
            staged: list[tuple[Path, ModelSpec, tuple[str, str, str], str]] = []
            names: dict[tuple[str, str], tuple[str, str, str]] = {}
            for directory in directories[lo : lo + batch]:
                try:
                    if directory.is_symlink():
                        raise InvalidModel(f"{directory} is a symbolic link; refused (name the directory itself)")
                    resolved = directory.resolve()
                    artefacts = Artefacts.from_dir(resolved)
                    spec = validate(artefacts)
                    digests = artefacts.digests
                    check_version_free(spec, digests, self.db.get_version(spec.name, spec.version))
                    earlier = names.get((spec.name, spec.version))
                    if earlier is not None and earlier != digests:
                        raise InvalidModel(
                            f"{spec.name}:{spec.version} is also in another directory of this import, "
                            "with different content"
                        )
                    _put_artefacts(self.blobs, artefacts, digests, durable=False)
                except AgentError as exc:
                    on_each(directory, exc, False)
                    continue
                names[(spec.name, spec.version)] = digests
                staged.append((directory, spec, digests, f"import:{resolved}"))
            if staged:
                self.blobs.sync()  # the batch's blobs are on disk: now under their digests, then recorded
                self.blobs.publish()
            for directory, spec, digests, source in staged:
                record = self.db.add_version(spec.name, spec.version, *digests, source=source)
                mrec = self.db.get_model(spec.name)
                activated = activate or mrec is None or not mrec.active_version
                if activated:
                    self.db.set_active(spec.name, spec.version)
                on_each(directory, record, activated)

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
            spec = read_model_spec(directory)
            if self.db.get_version(spec.name, spec.version) is not None:
                continue
            record = self.add_artefacts(Artefacts.from_dir(directory), source="bundled")
            mrec = self.db.get_model(spec.name)
            if mrec is None or not mrec.active_version:
                self.db.set_active(spec.name, spec.version)
            added.append(record)
        return added


def _put_artefacts(blobs: BlobStore, artefacts: Artefacts, digests: tuple[str, str, str], *, durable: bool) -> None:
    """The three blobs into the store; a WASI-NN weights file streamed from disk, checked against
    the digest it was judged by (a file changed since is refused, nothing of it stored)."""
    config_digest, module_digest, weights_digest = digests
    blobs.put_bytes(artefacts.config, expected=config_digest, durable=durable)
    blobs.put_bytes(artefacts.module, expected=module_digest, durable=durable)
    if artefacts.weights_file is None:
        blobs.put_bytes(artefacts.weights, expected=weights_digest, durable=durable)
        return
    try:
        with artefacts.weights_file.open() as fh:
            blobs.put_stream(fh, expected=weights_digest, durable=durable)
    except CorruptBlob as exc:
        raise InvalidModel(f"{artefacts.weights_file.path} changed while it was being imported; refused") from exc


def model_dirs(path: Path) -> list[Path]:
    """What ``edge-agent import PATH`` imports: PATH itself when it holds a model.json, else each
    directory directly inside it (sorted by name; hidden ones skipped), model or not, so a
    directory of models that lacks one is reported rather than passed over (a link among them too:
    the importer refuses it, as it refuses a link inside a model directory).

    NotADirectoryError / FileNotFoundError when PATH is not a directory.
    """
    path = Path(path)
    if not path.is_dir():
        raise NotADirectoryError(path) if path.exists() else FileNotFoundError(path)
    if (path / "model.json").exists():
        # The path the user typed may be a link (a `current` link to a release): their choice.
        return [path.resolve()]
    with os.scandir(path) as entries:
        return sorted(
            Path(entry.path)
            for entry in entries
            if not entry.name.startswith(".") and (entry.is_dir(follow_symlinks=False) or entry.is_symlink())
        )


def bundled_model_dirs() -> list[Path]:
    root = resources.files(BUNDLED_PACKAGE)
    dirs = []
    for entry in root.iterdir():
        if entry.is_dir() and entry.joinpath("model.json").is_file():
            dirs.append(Path(str(entry)))
    return sorted(dirs)

"""Pulling a model image (from a registry, or importing one from an OCI layout): verify, fetch, check, admit.

The order is the security argument. The manifest is fetched (bounded) and
its digest computed; the signature over that digest is verified against the
trust policy before anything else of the image is looked at; the config
(model.json) is fetched and checked by the ABI rules before any large blob
is fetched; module and weights stream into the store under their digests;
only then is the version recorded (:func:`agent.images.admit.admit`). A
refused or failed pull records nothing and leaves the active version alone.

An OCI layout (a directory or a tar, e.g. from the drop-in folder) goes
through the same steps with the layout in the registry's place; its
signatures are the ``sha256-<hex>.sig`` manifests stored beside the image.
"""

from __future__ import annotations

import shutil
import tarfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import structlog

from agent.cas import BlobStore
from agent.errors import AgentError, InvalidModel
from agent.events import EventBus
from agent.images.admit import admit, check_conflict, layers_mismatch
from agent.images.cache import ImageCache
from agent.images.errors import ImageError, ImageRefused, LayoutError, NotInRegistry, RegistryUnreachable
from agent.images.layout import OciLayout, open_layout
from agent.images.manifest import Descriptor, ModelManifest, parse_model_manifest
from agent.images.progress import NullProgress, Progress
from agent.images.reference import Reference
from agent.images.registry import READ_BLOCK, BlobFetch, RegistryClient
from agent.images.settings import RegistrySettings
from agent.images.sink import BlobSink
from agent.images.tags import TagStore
from agent.images.trust import TrustPolicy
from agent.images.verify import ImageVerifier
from agent.spec import ModelSpec
from agent.state import StateDB, VersionRecord


class Store(Protocol):
    """Where images land: a ModelRepository, or anything with its ``blobs`` and ``db``.

    (The CLI passes the two alone: importing the repository would load the wasm runtime,
    a tenth of a second a pull does not need.)

    Read-only properties: the puller never rebinds them, and a frozen ``LocalStore`` qualifies.
    """

    @property
    def blobs(self) -> BlobStore: ...

    @property
    def db(self) -> StateDB: ...


@dataclass
class PullResult:
    ref: str
    digest: str
    record: VersionRecord
    signed_by: str | None = None
    blobs: list[BlobFetch] = field(default_factory=list)
    seconds: float = 0.0
    offline: bool = False
    message: str = ""

    @property
    def fetched_bytes(self) -> int:
        return sum(b.fetched for b in self.blobs)

    @property
    def image_bytes(self) -> int:
        return sum(b.size for b in self.blobs)


class Puller:
    def __init__(
        self,
        repository: Store,
        cache: ImageCache,
        registry: RegistrySettings,
        trust: TrustPolicy,
        events: EventBus | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ):
        self.repository = repository
        self.blobs = repository.blobs
        self.db = repository.db
        self.cache = cache
        self.registry = registry
        self.trust = trust
        self.events = events
        self.sleep = sleep
        self.tags = TagStore(self.db)
        self.log = structlog.get_logger("edge_agent.images")
        self.verifier = ImageVerifier(registry, trust, self.log)

    # -- entry points ----------------------------------------------------------------------------
    def pull(self, ref_text: str, progress: Progress | None = None) -> PullResult:
        """Pull ``host/repo[:tag][@sha256:...]`` into the store; raises ImageRefused / RegistryError."""
        ref = Reference.parse(ref_text)
        return self._run(str(ref), ref.digest, lambda: self._pull(ref, progress or NullProgress()), "image.pulled")

    def import_layout(self, path: Path, name: str | None = None, progress: Progress | None = None) -> PullResult:
        """Import the image of an OCI layout (directory or tar) under the same checks as a pull.

        ``name`` picks an image by its ``org.opencontainers.image.ref.name`` when the layout
        holds several; signature entries (``sha256-<hex>.sig``) never count as images.
        Raises ImageRefused (SignatureError for signatures) or LayoutError, like a pull.
        """
        path = Path(path)
        image = f"oci:{path}" + (f":{name}" if name else "")
        return self._run(
            image, None, lambda: self._import(path, name, image, progress or NullProgress()), "image.imported"
        )

    def _run(self, image: str, digest: str | None, step: Callable[[], PullResult], done: str) -> PullResult:
        t0 = time.monotonic()
        try:
            with self.cache.locks.store_shared():
                result = step()
        except ImageRefused as exc:
            self._publish(
                "image.refused",
                image=exc.image or image,
                digest=exc.digest or digest,
                reason=str(exc),
                keys_tried=list(getattr(exc, "keys_tried", ())),
            )
            self.log.error("image.refused", image=exc.image or image, digest=exc.digest or digest, reason=str(exc))
            raise
        except AgentError as exc:
            self._publish("pull.failed", image=image, digest=digest, error=str(exc))
            raise
        result.seconds = time.monotonic() - t0
        if not result.offline:
            # After the shared lock is gone: eviction needs the store to itself.
            self.cache.enforce_budget(keep={(result.record.model, result.record.version)})
            self._publish(
                done,
                image=image,
                digest=result.digest,
                model=result.record.model,
                version=result.record.version,
                signed_by=result.signed_by,
                fetched_bytes=result.fetched_bytes,
                image_bytes=result.image_bytes,
                seconds=round(result.seconds, 3),
            )
        return result

    # -- from a registry -------------------------------------------------------------------------
    def _pull(self, ref: Reference, progress: Progress) -> PullResult:
        with RegistryClient(ref.registry, self.registry, sleep=self.sleep) as client:
            try:
                raw, content_type, digest = self.verifier.manifest(client, ref)
            except RegistryUnreachable as exc:
                return self._offline(ref, exc)
            image = f"{ref.name}@{digest}"
            verified = self.verifier.signature(client, ref, digest)
            manifest = parse_model_manifest(raw, content_type, image)
            config, spec = self._config(client, ref, manifest, image)
            self._check_conflict(spec, manifest, image)
            self._check_space(manifest, image)

            config_cached = self.blobs.has(manifest.config.digest)
            fetches = [
                BlobFetch(
                    manifest.config.digest,
                    manifest.config.size,
                    fetched=0 if config_cached else len(config),
                    cached=config_cached,
                )
            ]
            progress.start(str(ref), manifest.module.size + manifest.weights.size)
            ok = False
            desc = manifest.module
            try:
                for desc, label in ((manifest.module, "module"), (manifest.weights, "weights")):
                    progress.stage(f"{spec.name}:{spec.version} {label}")
                    what = f"{label} blob {desc.digest} of {image}"
                    with self.cache.locks.blob(desc.digest):
                        fetches.append(client.fetch_blob(ref.repository, desc, self.blobs, what, progress))
                ok = True
            except ImageRefused as exc:
                exc.image, exc.digest = image, digest
                raise
            except NotInRegistry as exc:
                raise ImageRefused(
                    f"refused {image}: its manifest names blob {desc.digest}, which the registry does not have",
                    image,
                    digest,
                ) from exc
            finally:
                progress.finish(ok=ok)

        record = self._admit(manifest, config, spec, image, f"registry:{ref.name}@{digest}")
        if ref.tag:
            self.tags.record(ref.tag_ref, digest, record.model, record.version)
        result = PullResult(
            ref=str(ref),
            digest=digest,
            record=record,
            signed_by=verified.key.describe() if verified else None,
            blobs=fetches,
        )
        self._log_done("image.pulled", image, result)
        return result

    def _config(
        self, client: RegistryClient, ref: Reference, manifest: ModelManifest, image: str
    ) -> tuple[bytes, ModelSpec]:
        what = f"config (model.json) {manifest.config.digest} of {image}"
        config: bytes | None = None
        if self.blobs.has(manifest.config.digest):
            try:
                config = self.blobs.read_bytes(manifest.config.digest)  # verified: a bad copy raises
            except AgentError:
                config = None  # not usable locally: fetch it as if it were not there
        if config is None:
            try:
                config = client.get_blob_bytes(ref.repository, manifest.config, self.registry.max_config_bytes, what)
            except ImageRefused as exc:
                raise ImageRefused(str(exc), image, manifest.digest) from exc
            except NotInRegistry as exc:
                raise ImageRefused(
                    f"refused {image}: its manifest names blob {manifest.config.digest}, "
                    f"which the registry does not have ({exc})",
                    image,
                    manifest.digest,
                ) from exc
        return config, self._spec(config, image, manifest.digest)

    # -- from an OCI layout ----------------------------------------------------------------------
    def _import(self, path: Path, name: str | None, image: str, progress: Progress) -> PullResult:
        with open_layout(path) as layout:
            desc = layout.resolve(name)
            try:
                raw = layout.read_bounded(desc, self.registry.max_manifest_bytes, "manifest")
            except LayoutError as exc:
                raise ImageRefused(f"refused {image}: {exc}", image, desc.digest) from exc
            digest = desc.digest  # read_bounded checked the bytes hash to it
            verified = self.verifier.layout_signature(layout, image, digest)
            image = f"{image}@{digest}"  # from here on every message names the digest, as a pull's do
            manifest = parse_model_manifest(raw, desc.media_type, image)
            try:
                config = layout.read_bounded(manifest.config, self.registry.max_config_bytes, "config (model.json)")
            except LayoutError as exc:
                raise ImageRefused(f"refused {image} ({digest}): {exc}", image, digest) from exc
            spec = self._spec(config, image, digest)
            self._check_conflict(spec, manifest, image)
            self._check_space(manifest, image)
            fetches = [
                BlobFetch(manifest.config.digest, manifest.config.size, cached=self.blobs.has(manifest.config.digest))
            ]
            progress.start(image, manifest.module.size + manifest.weights.size)
            ok = False
            try:
                for blob, label in ((manifest.module, "module"), (manifest.weights, "weights")):
                    progress.stage(f"{spec.name}:{spec.version} {label}")
                    with self.cache.locks.blob(blob.digest):
                        fetches.append(self._copy_in(layout, blob, f"{label} blob {blob.digest} of {image}", progress))
                ok = True
            except ImageRefused as exc:
                exc.image, exc.digest = image, digest
                raise
            except (OSError, tarfile.TarError) as exc:
                raise ImageError(f"cannot import {image}: {exc}") from exc
            finally:
                progress.finish(ok=ok)
        record = self._admit(manifest, config, spec, image, f"layout:{path.name}@{digest}")
        result = PullResult(
            ref=image,
            digest=digest,
            record=record,
            signed_by=verified.key.describe() if verified else None,
            blobs=fetches,
        )
        self._log_done("image.imported", image, result)
        return result

    def _copy_in(self, layout: OciLayout, desc: Descriptor, what: str, progress: Progress) -> BlobFetch:
        """Stream one blob from a layout into the store, hashing it; the store never sees a bad byte."""
        result = BlobFetch(desc.digest, desc.size)
        if self.blobs.has(desc.digest):
            result.cached = True
            progress.advance(desc.size)
            return result
        try:
            fh = layout.open_blob(desc.digest, desc.size)  # another length is refused before a byte is read
        except FileNotFoundError as exc:
            raise ImageRefused(f"refused {what}: the manifest names it but the layout does not have it") from exc
        writer = BlobSink(self.blobs, desc.digest)
        try:
            with fh:
                while chunk := fh.read(READ_BLOCK):
                    if writer.size + len(chunk) > desc.size:
                        raise ImageRefused(f"refused {what}: the layout holds more than the {desc.size} bytes declared")
                    writer.write(memoryview(chunk))
                    result.fetched += len(chunk)
                    progress.advance(len(chunk))
            if writer.size != desc.size or writer.digest != desc.digest:
                raise ImageRefused(
                    f"refused {what}: corrupt or tampered: its content ({writer.size} bytes) hashes to "
                    f"{writer.digest}, the manifest says {desc.digest} ({desc.size} bytes)"
                )
            writer.commit()
        except BaseException:
            writer.abort(keep_partial=False)
            raise
        return result

    # -- shared steps ----------------------------------------------------------------------------
    def _spec(self, config: bytes, image: str, digest: str) -> ModelSpec:
        try:
            return ModelSpec.from_bytes(config)
        except InvalidModel as exc:
            raise ImageRefused(f"refused {image}: {exc}", image, digest) from exc

    def _check_conflict(self, spec: ModelSpec, manifest: ModelManifest, image: str) -> None:
        """Before any layer is fetched: the weights layer is the kind model.json says, and the
        name:version is free."""
        mismatch = layers_mismatch(spec, manifest)
        if mismatch:
            raise ImageRefused(f"refused {image}: {mismatch}", image, manifest.digest)
        conflict = check_conflict(self.db, spec, manifest)
        if conflict:
            raise ImageRefused(f"refused {image}: {conflict}", image, manifest.digest)

    def _check_space(self, manifest: ModelManifest, image: str) -> None:
        needed = sum(d.size - self.blobs.partial_size(d.digest) for d in manifest.blobs if not self.blobs.has(d.digest))
        free = shutil.disk_usage(self.blobs.root).free
        if needed > free:
            raise ImageError(f"cannot pull {image}: it needs {needed} more bytes, the disk has {free} free")

    def _admit(self, manifest: ModelManifest, config: bytes, spec: ModelSpec, image: str, source: str) -> VersionRecord:
        try:
            record = admit(self.blobs, self.db, manifest, config, spec, source)
        except InvalidModel as exc:
            raise ImageRefused(f"refused {image}: {exc}", image, manifest.digest) from exc
        self.cache.touch_version(record)
        return record

    def _log_done(self, event: str, image: str, result: PullResult) -> None:
        self.log.info(
            event,
            image=image,
            digest=result.digest,
            model=result.record.model,
            version=result.record.version,
            signed_by=result.signed_by,
            fetched_bytes=result.fetched_bytes,
            reused_blobs=sum(1 for f in result.blobs if f.cached),
            resumed_bytes=sum(f.resumed_from for f in result.blobs),
        )

    # -- offline -------------------------------------------------------------------------------
    def _offline(self, ref: Reference, exc: RegistryUnreachable) -> PullResult:
        recorded_at = ""
        if ref.digest:
            digest = ref.digest
        else:
            tag = self.tags.get(ref.tag_ref)
            if tag is None:
                raise RegistryUnreachable(
                    f"{exc}; {ref} was never pulled here, so there is no last known digest to fall back to",
                    exc.status,
                ) from exc
            digest = tag.digest
            recorded_at = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(tag.updated_at))
        record = next((r for r in self.db.versions() if r.manifest_digest == digest and r.status == "ready"), None)
        if record is None or not all(self.blobs.has(d) for d in record.digests):
            raise RegistryUnreachable(
                f"{exc}; {ref} was last seen as {digest}, but that image is no longer in the local cache",
                exc.status,
            ) from exc
        message = (
            f"registry {ref.registry} is unreachable; using {ref} offline: "
            + (f"last known digest {digest} (recorded {recorded_at})" if recorded_at else f"digest {digest}")
            + f", {record.model}:{record.version} is already in the local store"
        )
        self.log.warning("image.offline", image=str(ref), digest=digest, reason=str(exc), message=message)
        self._publish("image.offline", image=str(ref), digest=digest, model=record.model, version=record.version)
        self.cache.touch_version(record)
        return PullResult(ref=str(ref), digest=digest, record=record, offline=True, message=message)

    def _publish(self, kind: str, **fields: object) -> None:
        if self.events is not None:
            self.events.publish(kind, **fields)

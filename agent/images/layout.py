"""OCI image layouts on disk (a directory, or a tar of one) for building and air-gapped transfer.

A layout is ``oci-layout``, ``index.json`` and ``blobs/sha256/<hex>``, as the
OCI image spec defines it, so skopeo, crane or oras read what we write
(``oci:DIR:NAME``). Builds are reproducible: no timestamps, fixed JSON key
order, so the same model directory always gives the same manifest digest,
and a tar holds its members in sorted order with zeroed times and owners.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO

from agent.cas import CHUNK, sha256_digest, split_digest
from agent.errors import InvalidModel
from agent.images import mediatypes as mt
from agent.images.errors import LayoutError
from agent.images.manifest import Descriptor, ModelManifest, build_manifest, encode, parse_model_manifest
from agent.images.reference import SIGNATURE_TAG_RE, signature_tag
from agent.spec import ModelSpec

MODULE_TITLE = "model.wasm"
WEIGHTS_TITLE = "weights.safetensors"


class OciLayout:
    """One OCI image layout directory (and, through :class:`TarLayout`, the reading side of a tar of one)."""

    def __init__(self, root: Path):
        self.root = Path(root)

    # -- file access: a directory here, a tar's members in TarLayout ----------------------------
    def _open(self, rel: str) -> BinaryIO:
        return open(self.root / rel, "rb")

    def _size(self, rel: str) -> int:
        return (self.root / rel).stat().st_size

    def _read(self, rel: str) -> bytes:
        with self._open(rel) as fh:
            return fh.read()

    # -- reading -----------------------------------------------------------------------------
    def exists(self) -> bool:
        return (self.root / "oci-layout").is_file()

    def check(self) -> None:
        try:
            version = json.loads(self._read("oci-layout")).get("imageLayoutVersion")
        except FileNotFoundError as exc:
            raise LayoutError(f"{self.root} is not an OCI image layout (no oci-layout file)") from exc
        except (ValueError, AttributeError) as exc:
            raise LayoutError(f"{self.root}: oci-layout is not valid JSON") from exc
        if version != mt.OCI_LAYOUT_VERSION:
            raise LayoutError(f"{self.root}: image layout version {version!r} is not {mt.OCI_LAYOUT_VERSION!r}")

    def blob_path(self, digest: str) -> Path:
        return self.root / _blob_rel(digest)

    def open_blob(self, digest: str) -> BinaryIO:
        """A blob's bytes as a stream (FileNotFoundError when the layout lacks it), not yet checked."""
        return self._open(_blob_rel(digest))

    def read_blob(self, digest: str) -> bytes:
        try:
            data = self._read(_blob_rel(digest))
        except FileNotFoundError as exc:
            raise LayoutError(f"{self.root} lacks blob {digest}") from exc
        if sha256_digest(data) != digest:
            raise LayoutError(f"{self.root}: blob {digest} is corrupt (hashes to {sha256_digest(data)})")
        return data

    def index(self) -> dict[str, Any]:
        try:
            raw = self._read("index.json")
        except FileNotFoundError:
            return {"schemaVersion": 2, "mediaType": mt.OCI_INDEX, "manifests": []}
        try:
            doc = json.loads(raw)
        except ValueError as exc:
            raise LayoutError(f"{self.root}: index.json is not valid JSON: {exc}") from exc
        if not isinstance(doc, dict) or not isinstance(doc.get("manifests"), list):
            raise LayoutError(f"{self.root}: index.json is not an OCI image index")
        return doc

    def names(self) -> list[str]:
        """The ref names of the images in the layout (signature entries left out)."""
        return [d.annotations.get(mt.REF_NAME, "") for d in self._entries() if not _is_signature(d)]

    def _entries(self) -> list[Descriptor]:
        entries = []
        for i, entry in enumerate(self.index()["manifests"]):
            try:
                entries.append(Descriptor.from_json(entry, f"index.json manifests[{i}]"))
            except ValueError as exc:
                raise LayoutError(f"{self.root}: {exc}") from exc
        return entries

    def resolve(self, name: str | None = None) -> Descriptor:
        """The manifest descriptor named ``name``, or the only image when no name is given.

        Signature manifests (``sha256-<hex>.sig``) ride along in the same layout, as skopeo
        or cosign put them; they are never taken for the image itself.
        """
        entries = self._entries()
        if name is not None:
            found = [d for d in entries if d.annotations.get(mt.REF_NAME) == name]
            if not found:
                raise LayoutError(f"{self.root} has no image named {name!r}; it has {self.names()}")
            return found[-1]
        images = [d for d in entries if not _is_signature(d)]
        if len(images) != 1:
            raise LayoutError(f"{self.root} holds {len(images)} images {self.names()}; name one with LAYOUT:NAME")
        return images[0]

    def read_bounded(self, desc: Descriptor, limit: int, what: str) -> bytes:
        """A small blob (manifest, config, signature) checked against ``desc`` without reading past ``limit``."""
        try:
            size = self._size(_blob_rel(desc.digest))
        except FileNotFoundError as exc:
            raise LayoutError(f"{self.root} lacks {what} {desc.digest}") from exc
        if size > limit:
            raise LayoutError(f"{what} {desc.digest} in {self.root} is {size} bytes, over the limit of {limit}")
        data = self.read_blob(desc.digest)
        if len(data) != desc.size:
            raise LayoutError(
                f"{what} {desc.digest} in {self.root} is {len(data)} bytes, its descriptor says {desc.size}"
            )
        return data

    def manifest(self, name: str | None = None) -> ModelManifest:
        desc = self.resolve(name)
        raw = self.read_blob(desc.digest)
        return parse_model_manifest(raw, desc.media_type, f"oci:{self.root}" + (f":{name}" if name else ""))

    def signature_manifest(self, digest: str, limit: int) -> bytes | None:
        """The raw ``sha256-<hex>.sig`` manifest for ``digest`` in this layout, or None."""
        tag = signature_tag(digest)
        found = [d for d in self._entries() if d.annotations.get(mt.REF_NAME) == tag]
        if not found:
            return None
        return self.read_bounded(found[-1], limit, "signature manifest")

    # -- writing -----------------------------------------------------------------------------
    def init(self) -> None:
        (self.root / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
        marker = self.root / "oci-layout"
        if not marker.exists():
            _atomic_write(marker, encode({"imageLayoutVersion": mt.OCI_LAYOUT_VERSION}))

    def put_bytes(self, data: bytes, media_type: str, annotations: dict[str, str] | None = None) -> Descriptor:
        digest = sha256_digest(data)
        target = self.blob_path(digest)
        if not target.exists():
            _atomic_write(target, data)
        return Descriptor(media_type, digest, len(data), annotations or {})

    def put_file(self, src: Path, media_type: str, annotations: dict[str, str] | None = None) -> Descriptor:
        """Copy a file in, hashing as it streams (weights can be hundreds of megabytes)."""
        tmp_dir = self.root / "blobs" / "sha256"
        fd, tmp_name = tempfile.mkstemp(dir=tmp_dir, prefix=".tmp-")
        hasher, size = hashlib.sha256(), 0
        try:
            with open(src, "rb") as fh, os.fdopen(fd, "wb") as out:
                while chunk := fh.read(CHUNK):
                    hasher.update(chunk)
                    out.write(chunk)
                    size += len(chunk)
            digest = "sha256:" + hasher.hexdigest()
            os.replace(tmp_name, self.blob_path(digest))
        except BaseException:
            Path(tmp_name).unlink(missing_ok=True)
            raise
        return Descriptor(media_type, digest, size, annotations or {})

    def add_manifest(self, raw: bytes, name: str | None, media_type: str = mt.OCI_MANIFEST) -> Descriptor:
        """Store a manifest and name it in index.json, replacing an earlier image of that name."""
        desc = self.put_bytes(raw, media_type, {mt.REF_NAME: name} if name else None)
        index = self.index()
        kept = [
            m
            for m in index["manifests"]
            if not (name and isinstance(m, dict) and m.get("annotations", {}).get(mt.REF_NAME) == name)
        ]
        if not any(
            isinstance(m, dict) and m.get("digest") == desc.digest and m.get("annotations") == desc.annotations
            for m in kept
        ):
            kept.append(desc.to_json())
        index["manifests"] = kept
        index.setdefault("schemaVersion", 2)
        index.setdefault("mediaType", mt.OCI_INDEX)
        _atomic_write(self.root / "index.json", encode(index))
        return desc


@dataclass(frozen=True)
class BuiltImage:
    layout: Path
    name: str | None
    manifest: Descriptor
    spec: ModelSpec | None


def build_from_dir(model_dir: Path, layout_dir: Path, name: str | None = None) -> BuiltImage:
    """Check a model directory as an import would, then write it into a layout as one image."""
    model_dir = Path(model_dir)
    meta = model_dir / "model.json"
    if not meta.is_file():
        raise InvalidModel(f"{model_dir} has no model.json")
    config = meta.read_bytes()
    spec = ModelSpec.from_bytes(config)
    module_path, weights_path = model_dir / spec.module_file, model_dir / spec.weights_file
    for kind, path in (("module", module_path), ("weights", weights_path)):
        if not path.is_file():
            raise InvalidModel(f"{model_dir} lacks {path.name} (the model's {kind})")
    with open(module_path, "rb") as fh:
        if fh.read(4) != b"\0asm":
            raise InvalidModel(f"{spec.name}:{spec.version}: {module_path.name} is not a WebAssembly binary")
    from agent.runtime.loaded import parse_weights  # the runtime's own check, so build and import agree

    parse_weights(spec, weights_path.read_bytes())
    built = build_image(layout_dir, config, module_path, weights_path, name or spec.version, spec)
    return built


def build_image(
    layout_dir: Path,
    config: bytes,
    module_path: Path,
    weights_path: Path,
    name: str | None,
    spec: ModelSpec | None = None,
) -> BuiltImage:
    """Write an image from its parts without judging them (tests build bad images with this)."""
    layout = OciLayout(layout_dir)
    layout.init()
    config_desc = layout.put_bytes(config, mt.MODEL_CONFIG)
    module_desc = layout.put_file(module_path, mt.WASM_MODULE, {mt.TITLE: MODULE_TITLE})
    weights_desc = layout.put_file(weights_path, mt.WEIGHTS, {mt.TITLE: WEIGHTS_TITLE})
    annotations: dict[str, str] = {}
    if spec is not None:
        annotations = {
            mt.TITLE: spec.name,
            mt.VERSION: spec.version,
            mt.ABI_VERSION: str(spec.abi_version),
        }
        if spec.description:
            annotations[mt.DESCRIPTION] = spec.description
    raw = build_manifest(config_desc, [module_desc, weights_desc], annotations)
    desc = layout.add_manifest(raw, name)
    return BuiltImage(layout=layout.root, name=name, manifest=desc, spec=spec)


# -- tar -----------------------------------------------------------------------------------------
def write_tar(layout_dir: Path, tar_path: Path) -> None:
    """Tar a layout reproducibly: sorted members, no times, no owners."""
    layout_dir, tar_path = Path(layout_dir), Path(tar_path)
    OciLayout(layout_dir).check()
    tmp = tar_path.with_name(f".{tar_path.name}.tmp")
    with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
        for path in sorted(p for p in layout_dir.rglob("*") if not p.name.startswith(".tmp-")):
            info = tar.gettarinfo(str(path), arcname=str(path.relative_to(layout_dir)))
            info.mtime = 0
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            info.mode = 0o755 if info.isdir() else 0o644
            if info.isfile():
                with open(path, "rb") as fh:
                    tar.addfile(info, fh)
            else:
                tar.addfile(info)
    os.replace(tmp, tar_path)


class TarLayout(OciLayout):
    """An OCI layout read straight out of its tar: nothing is unpacked, so nothing can land outside.

    Only regular files and directories may be members; an absolute or ``..`` name, a
    link or a device is refused outright (no honest layout holds one).
    """

    def __init__(self, path: Path, tar: tarfile.TarFile):
        super().__init__(path)
        self._tar = tar
        self._members: dict[str, tarfile.TarInfo] = {}
        for member in tar.getmembers():
            parts = PurePosixPath(member.name).parts
            if member.name.startswith("/") or ".." in parts:
                raise LayoutError(f"{path}: unsafe member {member.name!r} (absolute or '..' path); refused")
            if member.isdir():
                continue
            if not member.isfile():
                raise LayoutError(f"{path}: member {member.name!r} is a link or device; refused")
            self._members["/".join(p for p in parts if p != ".")] = member

    def _member(self, rel: str) -> tarfile.TarInfo:
        member = self._members.get(rel)
        if member is None:
            raise FileNotFoundError(rel)
        return member

    def _open(self, rel: str) -> BinaryIO:
        fh = self._tar.extractfile(self._member(rel))
        if fh is None:  # pragma: no cover - only regular files are kept
            raise FileNotFoundError(rel)
        return fh

    def _size(self, rel: str) -> int:
        return self._member(rel).size

    def exists(self) -> bool:
        return "oci-layout" in self._members

    def blob_path(self, digest: str) -> Path:
        raise LayoutError(f"{self.root} is a tar: its blobs are read in place, they have no path")


@contextlib.contextmanager
def open_layout(path: Path) -> Iterator[OciLayout]:
    """A layout to read from a directory, or from a tar (read in place, never unpacked)."""
    path = Path(path)
    if path.is_dir():
        layout = OciLayout(path)
        layout.check()
        yield layout
        return
    if not path.exists():
        raise LayoutError(f"{path} does not exist")
    if not tarfile.is_tarfile(path):
        raise LayoutError(f"{path} is neither an OCI layout directory nor a tar of one")
    try:
        tar = tarfile.open(path)  # noqa: SIM115 - closed by the `with tar` below
    except (tarfile.TarError, OSError) as exc:
        raise LayoutError(f"cannot read {path}: {exc}") from exc
    with tar:
        try:
            layout = TarLayout(path, tar)
        except tarfile.TarError as exc:
            raise LayoutError(f"cannot read {path}: {exc}") from exc
        layout.check()
        yield layout


@contextlib.contextmanager
def unpacked(path: Path) -> Iterator[OciLayout]:
    """A tar's layout unpacked beside it, for changing it (signing); gone afterwards."""
    path = Path(path)
    with open_layout(path):  # the same checks before anything is written
        pass
    with tempfile.TemporaryDirectory(prefix=f".{path.name}-", dir=path.parent) as tmp:
        try:
            with tarfile.open(path) as tar:
                # The data filter refuses absolute paths, '..', links out of the tree and devices.
                tar.extractall(tmp, filter="data")
        except (tarfile.TarError, OSError) as exc:
            raise LayoutError(f"cannot unpack {path}: {exc}") from exc
        layout = OciLayout(Path(tmp))
        layout.check()
        yield layout


def split_layout_arg(text: str) -> tuple[Path, str | None]:
    """``DIR`` or ``DIR:NAME`` (skopeo's ``oci:`` syntax, with or without the prefix)."""
    text = text.removeprefix("oci:").removeprefix("oci-archive:")
    if Path(text).exists():
        return Path(text), None
    path, sep, name = text.rpartition(":")
    if sep and path and Path(path).exists():
        return Path(path), name
    return Path(text), None


def _blob_rel(digest: str) -> str:
    return "blobs/sha256/" + split_digest(digest)[1]


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _is_signature(desc: Descriptor) -> bool:
    return bool(SIGNATURE_TAG_RE.match(desc.annotations.get(mt.REF_NAME, "")))

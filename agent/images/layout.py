"""OCI image layouts on disk (a directory, or a tar of one) for building and air-gapped transfer.

A layout is ``oci-layout``, ``index.json`` and ``blobs/sha256/<hex>``, as the
OCI image spec defines it, so skopeo, crane or oras read what we write
(``oci:DIR:NAME``). Builds are reproducible: no timestamps, fixed JSON key
order, so the same model directory always gives the same manifest digest,
and a tar holds its members in sorted order with zeroed times and owners.

Layouts are also hostile input (the drop-in folder takes them from whoever can
write to it), so reading one never follows a link, never opens anything but a
regular file, and never reads more than a bound known before the read:

- a directory layout is read through file descriptors, each path component
  opened relative to its parent with ``O_NOFOLLOW`` (a symbolic link anywhere
  inside, to ``/dev/zero`` or to a host file, is refused, so neither its
  bytes nor their digest ever reach a message) and ``O_NONBLOCK`` (a FIFO
  cannot block the open), then ``fstat`` must say it is a regular file;
- a tar is an uncompressed tar of regular files and directories only: no
  links, devices, FIFOs or sparse members (a 10 KB tar can hold a 1 TiB
  sparse member); the tar file itself must not be sparse or larger than the
  largest honest layout, no single read tarfile makes may exceed
  ``MAX_TAR_READ`` (a GNU long-name or pax header claiming gigabytes is read
  whole by tarfile), and it holds at most ``MAX_TAR_MEMBERS`` members;
- every read is bounded: ``oci-layout`` and ``index.json`` by fixed limits,
  manifests, configs and signatures by their caller's limits, blobs by the
  size their descriptor declares, checked against the file's own size before
  the first byte is read.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import stat
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO, cast

from agent.artefacts import (
    MAX_MODULE_BYTES,
    MAX_NN_WEIGHTS_BYTES,
    MAX_WEIGHTS_BYTES,
    file_kind,
    read_model_dir,
    validate,
)
from agent.cas import CHUNK, sha256_digest, split_digest
from agent.images import mediatypes as mt
from agent.images.errors import LayoutError
from agent.images.manifest import Descriptor, ModelManifest, build_manifest, encode, parse_model_manifest
from agent.images.reference import SIGNATURE_TAG_RE, signature_tag
from agent.spec import ModelSpec

MODULE_TITLE = "model.wasm"
WEIGHTS_TITLE = "weights.safetensors"

# ``oci-layout`` is one short JSON object; ``index.json`` lists a layout's images and
# signatures, a few hundred bytes each (4 MiB, the manifest limit registries accept).
MAX_MARKER_BYTES = 4096
MAX_INDEX_BYTES = 4 * 1024 * 1024
# What read_blob keeps in memory when its caller names no limit (manifests, configs, payloads).
MAX_SMALL_BLOB_BYTES = 4 * 1024 * 1024

# A layout tar holds one module and one weights file (each capped where a model directory is read;
# a WASI-NN model's weights file has the larger cap) plus small JSON: anything larger is no honest layout.
MAX_TAR_BYTES = MAX_MODULE_BYTES + max(MAX_WEIGHTS_BYTES, MAX_NN_WEIGHTS_BYTES) + 64 * 1024 * 1024
# Holes a tar file may have (a file system may leave a tail unallocated); beyond that it is sparse.
TAR_HOLE_SLACK = 64 * 1024
# The largest single read tarfile may make: its header blocks, a GNU long name or a pax header.
# tarfile reads such a header whole, at the size the header claims, before any member exists.
MAX_TAR_READ = 1 << 20
# Member data is read in chunks below MAX_TAR_READ.
_TAR_CHUNK = 256 * 1024
MAX_TAR_MEMBERS = 10_000

# Every open inside a layout: never through a symbolic link, never waiting (a FIFO).
_OPEN_FILE = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_OPEN_DIR = _OPEN_FILE | os.O_DIRECTORY
# Leading bytes of the compressions tarfile would otherwise undo silently (a small bomb, a long stall).
_COMPRESSED_MAGIC = {
    b"\x1f\x8b": "gzip",
    b"BZh": "bzip2",
    b"\xfd7zXZ\x00": "xz",
    b"\x28\xb5\x2f\xfd": "zstd",
}


class OciLayout:
    """One OCI image layout directory (and, through :class:`TarLayout`, the reading side of a tar of one).

    ``root_fd``, when given (``open_layout`` does), is a descriptor of the directory opened
    once: every read goes through it, so the layout cannot be swapped for another mid-read.
    """

    def __init__(self, root: Path, root_fd: int | None = None):
        self.root = Path(root)
        self._root_fd = root_fd

    # -- file access: a directory here, a tar's members in TarLayout ----------------------------
    def _open_sized(self, rel: str) -> tuple[BinaryIO, int]:
        """A regular file of the layout and its size, both from one descriptor (FileNotFoundError if absent)."""
        fd = _open_regular(self.root, self._root_fd, rel)
        return os.fdopen(fd, "rb"), os.fstat(fd).st_size

    def _read(self, rel: str, limit: int) -> bytes:
        """A whole small file, refused from its size alone when over ``limit``; never reads past it."""
        fh, size = self._open_sized(rel)
        with fh:
            if size > limit:
                raise LayoutError(f"{self.root}: {rel} is {size} bytes, over the limit of {limit}")
            data = fh.read(limit + 1)
        if len(data) > limit:  # it grew while being read
            raise LayoutError(f"{self.root}: {rel} is over the limit of {limit} bytes")
        return data

    # -- reading -----------------------------------------------------------------------------
    def exists(self) -> bool:
        try:
            self._open_sized("oci-layout")[0].close()
        except (OSError, LayoutError):
            return False
        return True

    def check(self) -> None:
        try:
            version = json.loads(self._read("oci-layout", MAX_MARKER_BYTES)).get("imageLayoutVersion")
        except FileNotFoundError as exc:
            raise LayoutError(f"{self.root} is not an OCI image layout (no oci-layout file)") from exc
        except (ValueError, AttributeError) as exc:
            raise LayoutError(f"{self.root}: oci-layout is not valid JSON") from exc
        if version != mt.OCI_LAYOUT_VERSION:
            raise LayoutError(f"{self.root}: image layout version {version!r} is not {mt.OCI_LAYOUT_VERSION!r}")

    def blob_path(self, digest: str) -> Path:
        """Where a blob lives, for writers and tests; readers go through open_blob / read_bounded."""
        return self.root / _blob_rel(digest)

    def open_blob(self, digest: str, size: int | None = None) -> BinaryIO:
        """A blob's bytes as a stream (FileNotFoundError when the layout lacks it), not yet hash-checked.

        With ``size`` (what its descriptor declares) a blob of any other length is refused before
        its first byte is read, and the stream never yields more than ``size`` bytes.
        """
        fh, actual = self._open_sized(_blob_rel(digest))
        if size is None:
            return fh
        if actual != size:
            fh.close()
            raise LayoutError(f"{self.root}: blob {digest} is {actual} bytes, its descriptor declares {size}")
        return cast(BinaryIO, _Bounded(fh, size))

    def read_blob(self, digest: str, limit: int = MAX_SMALL_BLOB_BYTES) -> bytes:
        try:
            data = self._read(_blob_rel(digest), limit)
        except FileNotFoundError as exc:
            raise LayoutError(f"{self.root} lacks blob {digest}") from exc
        if sha256_digest(data) != digest:
            raise LayoutError(f"{self.root}: blob {digest} is corrupt (hashes to {sha256_digest(data)})")
        return data

    def index(self) -> dict[str, Any]:
        try:
            raw = self._read("index.json", MAX_INDEX_BYTES)
        except FileNotFoundError:
            return {"schemaVersion": 2, "mediaType": mt.OCI_INDEX, "manifests": []}
        try:
            doc = json.loads(raw)
        except (ValueError, RecursionError) as exc:  # RecursionError: "[[[[…" nested past the parser's depth
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
                raise LayoutError(f"{self.root} has no image named {name!r}; it has {_some(self.names())}")
            return found[-1]
        images = [d for d in entries if not _is_signature(d)]
        if len(images) != 1:
            raise LayoutError(
                f"{self.root} holds {len(images)} images {_some(self.names())}; name one with LAYOUT:NAME"
            )
        return images[0]

    def read_bounded(self, desc: Descriptor, limit: int, what: str) -> bytes:
        """A small blob (manifest, config, signature) checked against ``desc`` without reading past ``limit``."""
        if desc.size > limit:
            raise LayoutError(
                f"{what} {desc.digest} in {self.root} is {desc.size} bytes by its descriptor, over the limit of {limit}"
            )
        try:
            fh = self.open_blob(desc.digest, desc.size)
        except FileNotFoundError as exc:
            raise LayoutError(f"{self.root} lacks {what} {desc.digest}") from exc
        except LayoutError as exc:
            raise LayoutError(f"{what} {desc.digest}: {exc}") from exc
        with fh:
            data = fh.read()
        if len(data) != desc.size:  # shrank while being read
            raise LayoutError(
                f"{what} {desc.digest} in {self.root} is {len(data)} bytes, its descriptor says {desc.size}"
            )
        if sha256_digest(data) != desc.digest:
            raise LayoutError(f"{self.root}: {what} {desc.digest} is corrupt (hashes to {sha256_digest(data)})")
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
        with open(src, "rb") as fh:
            return self.put_stream(fh, media_type, annotations)

    def put_stream(
        self,
        fh: BinaryIO,
        media_type: str,
        annotations: dict[str, str] | None = None,
        expected: str | None = None,
    ) -> Descriptor:
        """Copy a stream in chunk by chunk, hashing as it goes (a GGUF file is gigabytes); with
        ``expected``, content hashing to anything else is refused (LayoutError) and not kept."""
        tmp_dir = self.root / "blobs" / "sha256"
        fd, tmp_name = tempfile.mkstemp(dir=tmp_dir, prefix=".tmp-")
        hasher, size = hashlib.sha256(), 0
        try:
            with os.fdopen(fd, "wb") as out:
                while chunk := fh.read(CHUNK):
                    hasher.update(chunk)
                    out.write(chunk)
                    size += len(chunk)
            digest = "sha256:" + hasher.hexdigest()
            if expected is not None and digest != expected:
                raise LayoutError(f"content hashes to {digest}, expected {expected} (changed while it was read?)")
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
    """Judge a model directory as an import does (``agent.artefacts``), then write it into a layout as one image.

    What is written is the bytes that were judged, not the files read a second time; a WASI-NN
    model's weights file (the backend's own, GBs for GGUF) streams in from disk and must hash to
    what was judged. Its layer's media type names its format (``wasi_nn.encoding``), its title
    annotation is its file name.
    """
    artefacts = read_model_dir(model_dir)
    spec = validate(artefacts)
    layout = OciLayout(layout_dir)
    layout.init()
    module_desc = layout.put_bytes(artefacts.module, mt.WASM_MODULE, {mt.TITLE: MODULE_TITLE})
    if artefacts.weights_file is None:
        weights_desc = layout.put_bytes(artefacts.weights, mt.WEIGHTS, {mt.TITLE: WEIGHTS_TITLE})
    else:
        assert spec.wasi_nn is not None  # validate() allows a weights file for WASI-NN models only
        media_type = mt.weights_type(spec.wasi_nn.encoding)
        title = {mt.TITLE: artefacts.weights_file.name}
        with artefacts.weights_file.open() as fh:
            weights_desc = layout.put_stream(fh, media_type, title, expected=artefacts.weights_file.digest)
    return _write_image(layout, artefacts.config, module_desc, weights_desc, name or spec.version, spec)


def build_image(
    layout_dir: Path,
    config: bytes,
    module_path: Path,
    weights_path: Path,
    name: str | None,
    spec: ModelSpec | None = None,
    weights_type: str = mt.WEIGHTS,
) -> BuiltImage:
    """Write an image from its parts without judging them (tests build bad images with this);
    ``weights_type``: the weights layer's media type."""
    layout = OciLayout(layout_dir)
    layout.init()
    module_desc = layout.put_file(module_path, mt.WASM_MODULE, {mt.TITLE: MODULE_TITLE})
    title = WEIGHTS_TITLE if weights_type == mt.WEIGHTS else weights_path.name
    weights_desc = layout.put_file(weights_path, weights_type, {mt.TITLE: title})
    return _write_image(layout, config, module_desc, weights_desc, name, spec)


def _write_image(
    layout: OciLayout,
    config: bytes,
    module_desc: Descriptor,
    weights_desc: Descriptor,
    name: str | None,
    spec: ModelSpec | None,
) -> BuiltImage:
    """The config, the manifest over the two layers already in ``layout``, and its index.json entry."""
    config_desc = layout.put_bytes(config, mt.MODEL_CONFIG)
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
    link, a device, a FIFO or a sparse file is refused outright (no honest layout holds
    one, and a sparse member lets a few kilobytes of tar claim a terabyte).
    """

    def __init__(self, path: Path, tar: tarfile.TarFile):
        super().__init__(path)
        self._tar = tar
        self._members: dict[str, tarfile.TarInfo] = {}
        for count, member in enumerate(_iter_members(tar), 1):
            if count > MAX_TAR_MEMBERS:
                raise LayoutError(
                    f"{path}: more than {MAX_TAR_MEMBERS} members; no image layout has that many; refused"
                )
            parts = PurePosixPath(member.name).parts
            if member.name.startswith("/") or ".." in parts:
                raise LayoutError(f"{path}: unsafe member {member.name!r} (absolute or '..' path); refused")
            if member.isdir():
                continue
            if not member.isfile():
                raise LayoutError(f"{path}: member {member.name!r} is a link or device; refused")
            if member.issparse():
                raise LayoutError(
                    f"{path}: member {member.name!r} is a sparse file (it claims {member.size} bytes); refused"
                )
            self._members["/".join(p for p in parts if p != ".")] = member

    def _open_sized(self, rel: str) -> tuple[BinaryIO, int]:
        member = self._members.get(rel)
        if member is None:
            raise FileNotFoundError(rel)
        fh = self._tar.extractfile(member)
        # A regular member's stream is an ExFileObject, a BufferedReader (typed only as IO[bytes]).
        if not isinstance(fh, io.BufferedReader):  # pragma: no cover - only regular files are kept
            raise FileNotFoundError(rel)
        # A big read of the member would reach the tar file as one big read, which _GuardedTarFile refuses.
        return cast(BinaryIO, _Chunked(fh)), member.size

    def blob_path(self, digest: str) -> Path:
        raise LayoutError(f"{self.root} is a tar: its blobs are read in place, they have no path")


@contextlib.contextmanager
def open_layout(path: Path) -> Iterator[OciLayout]:
    """A layout to read from a directory, or from a tar (read in place, never unpacked).

    ``path`` itself is opened without following a link or waiting on a FIFO, like
    everything inside it: a caller that means a link resolves it first.
    """
    path = Path(path)
    try:
        fd = os.open(path, _OPEN_FILE)
    except FileNotFoundError as exc:
        raise LayoutError(f"{path} does not exist") from exc
    except OSError as exc:
        raise LayoutError(_refusal(path, exc)) from exc
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            layout = OciLayout(path, root_fd=fd)
            layout.check()
            yield layout
            return
        if not stat.S_ISREG(mode):
            raise LayoutError(f"{path} is not a regular file or a directory ({file_kind(mode)}); refused")
        _check_tar_file(path, fd)
        with _open_tar(path, os.fdopen(os.dup(fd), "rb")) as layout:
            yield layout
    finally:
        os.close(fd)


@contextlib.contextmanager
def _open_tar(path: Path, fh: BinaryIO) -> Iterator[TarLayout]:
    with fh:
        magic = fh.read(6)
        fh.seek(0)
        for prefix, kind in _COMPRESSED_MAGIC.items():
            if magic.startswith(prefix):
                raise LayoutError(f"{path} is a {kind}-compressed tar; a layout tar must be uncompressed (unpack it)")
        try:
            # "r:" takes an uncompressed tar only; tarfile would otherwise decompress on the fly.
            tar = tarfile.open(fileobj=cast(BinaryIO, _GuardedTarFile(fh, path)), mode="r:")  # noqa: SIM115 - closed below
        except tarfile.TarError as exc:
            raise LayoutError(f"{path} is neither an OCI layout directory nor a tar of one ({exc})") from exc
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
            with (
                open(path, "rb") as raw,
                tarfile.open(fileobj=cast(BinaryIO, _GuardedTarFile(raw, path)), mode="r:") as tar,
            ):
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
    try:
        return "blobs/sha256/" + split_digest(digest)[1]
    except ValueError as exc:
        raise LayoutError(str(exc)) from exc


def _open_regular(root: Path, root_fd: int | None, rel: str) -> int:
    """A descriptor of the regular file ``root/rel``, every component opened without following links.

    FileNotFoundError when a component is missing (callers tell "absent" from "hostile");
    LayoutError for a link, a FIFO, a device, a socket or any other refusal.
    """
    parts = rel.split("/")
    try:
        fd = os.dup(root_fd) if root_fd is not None else os.open(root, _OPEN_DIR)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise LayoutError(_refusal(root, exc)) from exc
    try:
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            try:
                next_fd = os.open(part, _OPEN_FILE if last else _OPEN_DIR, dir_fd=fd)
            except FileNotFoundError:
                raise
            except OSError as exc:
                where = root / "/".join(parts[: i + 1])
                raise LayoutError(_refusal(where, exc, parent_fd=fd, name=part, last=last)) from exc
            os.close(fd)
            fd = next_fd
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise LayoutError(f"{root / rel} is not a regular file ({file_kind(mode)}); refused")
    except BaseException:
        os.close(fd)
        raise
    return fd


def _refusal(path: Path, exc: OSError, parent_fd: int | None = None, name: str | None = None, last: bool = True) -> str:
    """Why ``path`` cannot be opened, in words; never anything about where a link points."""
    if exc.errno in (errno.ELOOP, errno.ENOTDIR, errno.ENXIO):
        try:
            st = os.lstat(name, dir_fd=parent_fd) if name is not None else os.lstat(path)
        except OSError:
            st = None
        if st is not None and stat.S_ISLNK(st.st_mode):
            return f"{path} is a symbolic link; a layout is read only through its own regular files, links are refused"
        if st is not None:
            want = "a regular file" if last else "a directory"
            return f"{path} is {file_kind(st.st_mode)}, not {want}; refused"
    return f"cannot read {path}: {exc.strerror or exc}"


def _some(names: list[str], limit: int = 10) -> str:
    """A list for a message, cut short: index.json is the dropper's to fill."""
    shown = [name[:100] for name in names[:limit]]
    return repr(shown) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _check_tar_file(path: Path, fd: int) -> None:
    """Refuse a tar whose size alone says it is no honest layout, before tarfile reads a byte."""
    st = os.fstat(fd)
    if st.st_blocks * 512 < st.st_size - TAR_HOLE_SLACK:
        raise LayoutError(
            f"{path} is a sparse file ({st.st_size} bytes, {st.st_blocks * 512} on disk); "
            "a layout tar has no holes; refused"
        )
    if st.st_size > MAX_TAR_BYTES:
        raise LayoutError(f"{path} is {st.st_size} bytes, over the limit of {MAX_TAR_BYTES} for a layout tar; refused")


def _iter_members(tar: tarfile.TarFile) -> Iterator[tarfile.TarInfo]:
    """Members one at a time (getmembers() would read them all before any count is checked)."""
    while (member := tar.next()) is not None:
        yield member


class _GuardedTarFile:
    """The tar file as tarfile sees it: any single read above ``MAX_TAR_READ`` is refused.

    tarfile reads a GNU long-name or pax header whole, at whatever size the header claims,
    so a few bytes of header could otherwise make it allocate gigabytes.
    """

    def __init__(self, fh: BinaryIO, path: Path):
        self._fh = fh
        self._path = path
        self.name = str(path)

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0 or size > MAX_TAR_READ:
            raise LayoutError(
                f"{self._path}: a tar header claims {size} bytes, more than any tar header needs "
                f"({MAX_TAR_READ}); refused"
            )
        return self._fh.read(size)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return self._fh.seek(offset, whence)

    def tell(self) -> int:
        return self._fh.tell()

    def close(self) -> None:
        self._fh.close()


class _Chunked(io.RawIOBase):
    """A tar member's stream whose reads reach the tar file in chunks below ``MAX_TAR_READ``."""

    def __init__(self, fh: BinaryIO):
        super().__init__()
        self._fh = fh

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        data = self._fh.read(min(len(view), _TAR_CHUNK))
        view[: len(data)] = data
        return len(data)

    def read(self, size: int | None = -1) -> bytes:
        parts: list[bytes] = []
        left = -1 if size is None or size < 0 else size
        while left != 0:
            data = self._fh.read(_TAR_CHUNK if left < 0 else min(left, _TAR_CHUNK))
            if not data:
                break
            parts.append(data)
            if left > 0:
                left -= len(data)
        return b"".join(parts)

    def close(self) -> None:
        self._fh.close()
        super().close()


class _Bounded(io.RawIOBase):
    """A blob stream that ends after the size its descriptor declares, whatever the file does meanwhile."""

    def __init__(self, fh: BinaryIO, size: int):
        super().__init__()
        self._fh = fh
        self._left = size

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        n = min(len(view), self._left)
        if n <= 0:
            return 0
        data = self._fh.read(n)
        view[: len(data)] = data
        self._left -= len(data)
        return len(data)

    def read(self, size: int | None = -1) -> bytes:
        n = self._left if size is None or size < 0 else min(size, self._left)
        data = self._fh.read(n) if n > 0 else b""
        self._left -= len(data)
        return data

    def close(self) -> None:
        self._fh.close()
        super().close()


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _is_signature(desc: Descriptor) -> bool:
    return bool(SIGNATURE_TAG_RE.match(desc.annotations.get(mt.REF_NAME, "")))

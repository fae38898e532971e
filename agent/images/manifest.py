"""The image manifest of a model: built from three descriptors, and checked on the way in.

Checking happens before any large blob is fetched, so a manifest that is not
an edge-agent model image (an index, a container image, an unknown config
version, a layer we do not understand) is refused at the cost of a few
kilobytes, with a message that says which rule it broke.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from agent.cas import sha256_digest
from agent.images import mediatypes as mt
from agent.images.errors import ImageRefused
from agent.images.reference import DIGEST_RE


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int
    annotations: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"mediaType": self.media_type, "digest": self.digest, "size": self.size}
        if self.annotations:
            doc["annotations"] = dict(self.annotations)
        return doc

    @classmethod
    def from_json(cls, doc: Any, where: str) -> Descriptor:
        if not isinstance(doc, dict):
            raise ValueError(f"{where} must be an object")
        media_type, digest, size = doc.get("mediaType"), doc.get("digest"), doc.get("size")
        if not isinstance(media_type, str) or not media_type:
            raise ValueError(f"{where}.mediaType must be a non-empty string")
        if not isinstance(digest, str) or not DIGEST_RE.match(digest):
            raise ValueError(f"{where}.digest must be sha256:<64 hex>, got {digest!r}")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ValueError(f"{where}.size must be a non-negative integer, got {size!r}")
        annotations = doc.get("annotations") or {}
        if not isinstance(annotations, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in annotations.items()
        ):
            raise ValueError(f"{where}.annotations must map strings to strings")
        if doc.get("urls"):
            # Foreign layers would make the agent fetch from hosts its policy never named.
            raise ValueError(f"{where} has external urls, which this agent does not follow")
        return cls(media_type, digest, size, dict(annotations))


def encode(doc: dict[str, Any]) -> bytes:
    """Compact JSON with a fixed key order, so the same inputs always give the same digest."""
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode()


def build_manifest(config: Descriptor, layers: list[Descriptor], annotations: dict[str, str] | None = None) -> bytes:
    doc: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": mt.OCI_MANIFEST,
        "config": config.to_json(),
        "layers": [layer.to_json() for layer in layers],
    }
    if annotations:
        doc["annotations"] = dict(annotations)
    return encode(doc)


@dataclass(frozen=True)
class ModelManifest:
    """A checked manifest of an edge-agent model image."""

    raw: bytes
    digest: str
    config: Descriptor
    module: Descriptor
    weights: Descriptor
    annotations: dict[str, str]

    @property
    def blobs(self) -> tuple[Descriptor, Descriptor, Descriptor]:
        return self.config, self.module, self.weights

    @property
    def total_size(self) -> int:
        return sum(d.size for d in self.blobs)


def parse_json_manifest(raw: bytes, image: str, digest: str) -> dict[str, Any]:
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ImageRefused(f"manifest of {image} ({digest}) is not valid JSON: {exc}", image, digest) from exc
    if not isinstance(doc, dict):
        raise ImageRefused(f"manifest of {image} ({digest}) is not a JSON object", image, digest)
    return doc


def parse_model_manifest(raw: bytes, content_type: str | None, image: str) -> ModelManifest:
    """Check that ``raw`` is an edge-agent model image manifest; refuse it clearly otherwise."""
    digest = sha256_digest(raw)
    doc = parse_json_manifest(raw, image, digest)

    def refuse(why: str) -> ImageRefused:
        return ImageRefused(f"{image} ({digest}) is not an edge-agent model image: {why}", image, digest)

    declared = doc.get("mediaType")
    kind = declared or _base_type(content_type)
    if kind in (mt.OCI_INDEX, mt.DOCKER_MANIFEST_LIST) or "manifests" in doc:
        raise refuse("it is an image index (multi-platform list); push the model image itself")
    if kind not in (mt.OCI_MANIFEST, None, ""):
        raise refuse(f"manifest media type is {kind!r}, expected {mt.OCI_MANIFEST!r}")
    if declared and content_type and _base_type(content_type) not in (declared, "application/json"):
        raise refuse(f"registry served it as {content_type!r} but it declares {declared!r}")
    if doc.get("schemaVersion") != 2:
        raise refuse(f"schemaVersion is {doc.get('schemaVersion')!r}, expected 2")
    try:
        config = Descriptor.from_json(doc.get("config"), "config")
        layers_doc = doc.get("layers")
        if not isinstance(layers_doc, list):
            raise ValueError("layers must be a list")
        layers = [Descriptor.from_json(d, f"layers[{i}]") for i, d in enumerate(layers_doc)]
    except ValueError as exc:
        raise refuse(str(exc)) from exc
    if config.media_type != mt.MODEL_CONFIG:
        if config.media_type.startswith(mt.MODEL_CONFIG_PREFIX):
            raise refuse(
                f"config media type {config.media_type!r} is a newer image format than this agent reads "
                f"({mt.MODEL_CONFIG!r})"
            )
        raise refuse(f"config media type is {config.media_type!r}, expected {mt.MODEL_CONFIG!r}")
    by_type: dict[str, list[Descriptor]] = {}
    for layer in layers:
        by_type.setdefault(layer.media_type, []).append(layer)
    unknown = sorted(set(by_type) - {mt.WASM_MODULE, *mt.WEIGHTS_TYPES})
    if unknown:
        raise refuse(
            f"layer media type(s) {unknown} are unknown; "
            f"expected {mt.WASM_MODULE!r} and one of {list(mt.WEIGHTS_TYPES)}"
        )
    count = len(by_type.get(mt.WASM_MODULE, []))
    if count != 1:
        raise refuse(f"it has {count} layer(s) of type {mt.WASM_MODULE!r}, expected exactly one")
    weights = [layer for layer in layers if layer.media_type in mt.WEIGHTS_TYPES]
    if len(weights) != 1:
        if not weights or len({w.media_type for w in weights}) == 1:
            kind = repr(weights[0].media_type) if weights else f"weights ({', '.join(mt.WEIGHTS_TYPES)})"
            raise refuse(f"it has {len(weights)} layer(s) of type {kind}, expected exactly one")
        raise refuse(f"it has {len(weights)} weights layers {[w.media_type for w in weights]}, expected exactly one")
    annotations = doc.get("annotations") or {}
    if not isinstance(annotations, dict):
        raise refuse("annotations must be an object")
    return ModelManifest(
        raw=raw,
        digest=digest,
        config=config,
        module=by_type[mt.WASM_MODULE][0],
        weights=weights[0],
        annotations={str(k): str(v) for k, v in annotations.items()},
    )


def _base_type(content_type: str | None) -> str | None:
    return content_type.split(";", 1)[0].strip() if content_type else None

"""Pushing an image from an OCI layout, and signing an image in a registry or in a layout.

A push uploads the blobs the repository lacks (a HEAD first, so shared layers
go once) and then the manifest, under the tag or digest of the reference; a
signature the layout holds for the image (``sha256-<hex>.sig``) goes along.
Signing resolves the image to its digest, signs the simple-signing payload
for that digest and adds a layer to the ``sha256-<hex>.sig`` manifest,
keeping any signatures already there, as ``cosign sign`` does. In a layout
the signature manifest is stored under that same name, as ``skopeo copy``
of the signature tag would store it, so a layout signed offline pushes to a
registry (or is imported from the drop-in folder) with its signature.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from agent.cas import sha256_digest
from agent.images import mediatypes as mt
from agent.images.errors import BadReference, NotInRegistry, RegistryError
from agent.images.layout import OciLayout, unpacked, write_tar
from agent.images.manifest import Descriptor
from agent.images.reference import Reference, signature_tag
from agent.images.registry import RegistryClient
from agent.images.settings import RegistrySettings
from agent.images.signing import (
    build_signature_manifest,
    parse_signature_manifest,
    sign_payload,
    simple_signing_payload,
)
from agent.images.transport import is_transient


@dataclass(frozen=True)
class PushResult:
    ref: str
    digest: str
    uploaded: int  # blobs sent
    skipped: int  # blobs the repository already had
    signature: str | None = None  # the signature tag pushed along, when the layout had one


def push_layout(
    layout: OciLayout,
    name: str | None,
    ref_text: str,
    settings: RegistrySettings,
    sleep: Callable[[float], None] = time.sleep,
) -> PushResult:
    ref = Reference.parse(ref_text)
    manifest = layout.manifest(name)
    if ref.digest and ref.digest != manifest.digest:
        raise BadReference(f"{ref} names digest {ref.digest}, but the layout's image is {manifest.digest}")
    uploaded = skipped = 0
    signature_raw = layout.signature_manifest(manifest.digest, settings.max_signature_bytes)
    with RegistryClient(ref.registry, settings, sleep=sleep) as client:

        def send(desc: Descriptor) -> None:
            nonlocal uploaded, skipped
            sent = _with_retries(
                lambda: client.push_blob(ref.repository, desc, lambda: layout.open_blob(desc.digest)),
                client,
                f"push blob {desc.digest}",
            )
            uploaded, skipped = uploaded + int(sent), skipped + int(not sent)

        for desc in manifest.blobs:
            send(desc)
        target = ref.tag if ref.tag else manifest.digest
        client.put_manifest(ref.repository, target, manifest.raw, mt.OCI_MANIFEST)
        tag = None
        if signature_raw is not None:
            # The signature manifest's own blobs (config, payloads), then the manifest under its tag.
            doc = json.loads(signature_raw)
            for entry in [doc.get("config"), *doc.get("layers", [])]:
                send(Descriptor.from_json(entry, "signature blob"))
            tag = signature_tag(manifest.digest)
            client.put_manifest(ref.repository, tag, signature_raw, doc.get("mediaType") or mt.OCI_MANIFEST)
    return PushResult(str(ref.with_digest(manifest.digest)), manifest.digest, uploaded, skipped, tag)


def resolve_digest(client: RegistryClient, ref: Reference, limit: int) -> str:
    if ref.digest:
        return ref.digest
    answer = client.get_manifest(ref.repository, ref.manifest_ref, limit, f"manifest of {ref}")
    digest = sha256_digest(answer.raw)
    if answer.digest_header and answer.digest_header != digest:
        raise RegistryError(f"{ref}: registry says {answer.digest_header}, content hashes to {digest}")
    return digest


def sign_image(
    ref_text: str,
    key: ec.EllipticCurvePrivateKey,
    settings: RegistrySettings,
    sleep: Callable[[float], None] = time.sleep,
) -> tuple[str, str]:
    """Sign the image ``ref_text`` names; returns (image digest, signature tag)."""
    ref = Reference.parse(ref_text)
    with RegistryClient(ref.registry, settings, sleep=sleep) as client:
        digest = resolve_digest(client, ref, settings.max_manifest_bytes)
        tag = signature_tag(digest)
        layers: list[tuple[bytes, str]] = []
        try:
            existing = client.get_manifest(
                ref.repository, tag, settings.max_signature_bytes, f"signatures of {ref.name}@{digest}"
            )
            for layer in parse_signature_manifest(existing.raw):
                data = client.get_blob_bytes(
                    ref.repository, layer.descriptor, settings.max_signature_bytes, "existing signature payload"
                )
                layers.append((data, layer.signature))
        except NotInRegistry:
            pass
        layers = _with_new_signature(layers, key, ref.name, digest)
        manifest, config = build_signature_manifest(layers)
        for data in [config, *(p for p, _ in layers)]:
            desc = Descriptor(mt.SIMPLE_SIGNING, sha256_digest(data), len(data))
            client.push_blob(ref.repository, desc, data)
        client.put_manifest(ref.repository, tag, manifest, mt.OCI_MANIFEST)
    return digest, tag


def sign_layout(
    path: Path,
    name: str | None,
    key: ec.EllipticCurvePrivateKey,
    identity: str,
    max_bytes: int = 256 * 1024,
) -> tuple[str, str]:
    """Sign the image of an OCI layout (directory, or tar rewritten in place) for ``identity``.

    ``identity`` is the ``host/repository`` the signature vouches for (cosign's
    docker-reference claim): it is what a trust scope must cover for the image to be
    admitted, from this layout or from a registry it is later pushed to.
    Returns (image digest, signature name in the layout).
    """
    claimed = Reference.parse(identity).name
    path = Path(path)
    if path.is_dir():
        return _sign_layout_dir(OciLayout(path), name, key, claimed, max_bytes)
    with unpacked(path) as layout:  # a tar: unpacked beside it, signed, tarred back in its place
        result = _sign_layout_dir(layout, name, key, claimed, max_bytes)
        write_tar(layout.root, path)
    return result


def _sign_layout_dir(
    layout: OciLayout, name: str | None, key: ec.EllipticCurvePrivateKey, claimed: str, max_bytes: int
) -> tuple[str, str]:
    layout.check()
    digest = layout.resolve(name).digest
    layers: list[tuple[bytes, str]] = []
    existing = layout.signature_manifest(digest, max_bytes)
    if existing is not None:
        for layer in parse_signature_manifest(existing):
            layers.append((layout.read_bounded(layer.descriptor, max_bytes, "signature payload"), layer.signature))
    layers = _with_new_signature(layers, key, claimed, digest)
    manifest, config = build_signature_manifest(layers)
    layout.put_bytes(config, mt.OCI_CONFIG)
    for payload, _ in layers:
        layout.put_bytes(payload, mt.SIMPLE_SIGNING)
    tag = signature_tag(digest)
    layout.add_manifest(manifest, tag)
    return digest, tag


def _with_new_signature(
    layers: list[tuple[bytes, str]], key: ec.EllipticCurvePrivateKey, claimed: str, digest: str
) -> list[tuple[bytes, str]]:
    """Add this key's signature for ``digest``, replacing one it made before (ECDSA signatures differ each time)."""
    payload = simple_signing_payload(claimed, digest)
    public = key.public_key()
    kept = []
    for data, sig in layers:
        try:
            public.verify(base64.b64decode(sig), data, ec.ECDSA(hashes.SHA256()))
            same_signer = data == payload
        except (InvalidSignature, ValueError):
            same_signer = False
        if not same_signer:
            kept.append((data, sig))
    kept.append((payload, sign_payload(key, payload)))
    return kept


def _with_retries(action: Callable[[], bool], client: RegistryClient, what: str) -> bool:
    """An upload session is spent by a failed PUT: retry the whole upload, with backoff."""
    backoff = client.transport.retry_loop(what)
    while True:
        try:
            return action()
        except (RegistryError, OSError) as exc:
            if not is_transient(exc):  # TLS to a plain-HTTP server, a refused login, a 4xx: said at once
                raise
            client.transport.wait_or_fail(backoff, what, str(exc))

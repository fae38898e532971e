"""The checks an image passes before any of its large blobs is fetched: its manifest and its signature.

Shared by a pull (registry), an import (OCI layout, the drop-in folder) and
``edge-agent image verify``, so the three can never disagree on what is
admitted. The manifest's digest is computed from the bytes received, never
taken from the registry's word; the signature over that digest is checked
against the trust policy before the manifest is even parsed.
"""

from __future__ import annotations

from typing import Any

import structlog

from agent.cas import sha256_digest
from agent.images.errors import ImageRefused, LayoutError, NotInRegistry, SignatureError
from agent.images.layout import OciLayout
from agent.images.reference import Reference, signature_tag
from agent.images.registry import RegistryClient
from agent.images.settings import RegistrySettings
from agent.images.signing import parse_signature_manifest
from agent.images.transport import TooLarge
from agent.images.trust import Candidate, TrustPolicy, Verified


class ImageVerifier:
    def __init__(self, registry: RegistrySettings, trust: TrustPolicy, log: Any = None):
        self.registry = registry
        self.trust = trust
        self.log = log or structlog.get_logger("edge_agent.images")

    # -- registry --------------------------------------------------------------------------------
    def manifest(self, client: RegistryClient, ref: Reference) -> tuple[bytes, str | None, str]:
        """(raw manifest, Content-Type, digest of the raw bytes), refusing a size or digest that is off."""
        what = f"manifest of {ref}"
        try:
            answer = client.get_manifest(ref.repository, ref.manifest_ref, self.registry.max_manifest_bytes, what)
        except TooLarge as exc:
            raise ImageRefused(
                f"refused {ref}: {exc} (registry.max_manifest_bytes); a model image manifest is a few hundred bytes",
                str(ref),
                ref.digest,
            ) from exc
        except NotInRegistry as exc:
            raise NotInRegistry(f"image {ref} is not in registry {ref.registry}: {exc}", 404) from exc
        digest = sha256_digest(answer.raw)
        if ref.digest and digest != ref.digest:
            raise ImageRefused(
                f"refused {ref}: the manifest served hashes to {digest}, not the digest asked for; "
                "tampered or corrupt in the registry or on the way",
                str(ref),
                ref.digest,
            )
        if answer.digest_header and answer.digest_header != digest:
            raise ImageRefused(
                f"refused {ref}: the registry says its manifest is {answer.digest_header} but the bytes "
                f"served hash to {digest}; tampered or corrupt",
                str(ref),
                answer.digest_header,
            )
        return answer.raw, answer.content_type, digest

    def signature(self, client: RegistryClient, ref: Reference, digest: str) -> Verified | None:
        """The trusted signature of ``digest``, None when the policy lets it go unsigned, else refused."""
        image = f"{ref.name}@{digest}"
        scope, keys = self.trust.keys_for(ref)
        if not keys and not self.trust.require_signature:
            self.log.warning(
                "image.unverified", image=image, reason="no keys for its scope and signatures not required"
            )
            return None
        candidates = self._registry_candidates(client, ref, digest)
        if not candidates and not self.trust.require_signature:
            self.log.warning("image.unsigned", image=image, reason="accepted: signatures not required")
            return None
        verified = self.trust.verify(ref, digest, candidates)
        self.log.info("image.signature_ok", image=image, key=verified.key.describe(), scope=scope)
        return verified

    def _registry_candidates(self, client: RegistryClient, ref: Reference, digest: str) -> list[Candidate]:
        limit = self.registry.max_signature_bytes
        try:
            answer = client.get_manifest(
                ref.repository, signature_tag(digest), limit, f"signatures of {ref.name}@{digest}"
            )
        except NotInRegistry:
            return []
        except TooLarge as exc:
            raise SignatureError(
                f"refused {ref.name}@{digest}: its signature manifest {exc}", str(ref), digest
            ) from exc
        candidates = []
        for layer in parse_signature_manifest(answer.raw):
            what = f"signature payload {layer.descriptor.digest} of {ref.name}@{digest}"
            try:
                payload = client.get_blob_bytes(ref.repository, layer.descriptor, limit, what)
            except (ImageRefused, NotInRegistry) as exc:
                # One unreadable signature does not spoil the others; if none is left, the refusal says so.
                self.log.warning("image.signature_unreadable", image=f"{ref.name}@{digest}", error=str(exc))
                continue
            candidates.append(Candidate(payload, layer.signature, layer.descriptor.digest))
        return candidates

    # -- OCI layouts -----------------------------------------------------------------------------
    def layout_signature(self, layout: OciLayout, image: str, digest: str) -> Verified | None:
        """The same decision for an image in a layout, whose signatures name the image they were made for."""
        if not self.trust.keys and not self.trust.require_signature:
            self.log.warning("image.unverified", image=image, digest=digest, reason="no trusted keys configured")
            return None
        candidates = self.layout_candidates(layout, image, digest)
        if not candidates and not self.trust.require_signature:
            self.log.warning("image.unsigned", image=image, digest=digest, reason="accepted: signatures not required")
            return None
        verified = self.trust.verify_claimed(image, digest, candidates)
        self.log.info(
            "image.signature_ok",
            image=image,
            digest=digest,
            key=verified.key.describe(),
            claims=verified.docker_reference,
        )
        return verified

    def layout_candidates(self, layout: OciLayout, image: str, digest: str) -> list[Candidate]:
        limit = self.registry.max_signature_bytes
        try:
            raw = layout.signature_manifest(digest, limit)
        except LayoutError as exc:
            raise SignatureError(f"refused {image} ({digest}): {exc}", image, digest) from exc
        if raw is None:
            return []
        candidates = []
        for layer in parse_signature_manifest(raw):
            try:
                payload = layout.read_bounded(layer.descriptor, limit, "signature payload")
            except LayoutError as exc:
                self.log.warning("image.signature_unreadable", image=image, digest=digest, error=str(exc))
                continue
            candidates.append(Candidate(payload, layer.signature, layer.descriptor.digest))
        return candidates

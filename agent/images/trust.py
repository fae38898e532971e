"""The trust policy: which keys may sign images from which registries and repositories.

A scope is ``host[:port]`` (a whole registry), ``host[:port]/path`` (that
repository and everything under it) or ``*`` (anything). The most specific
scope that covers an image decides; its keys are alternatives, so a rotation
lists the old and the new key until the old one's images are gone. With
``require_signature`` (the default) an image whose scope has no keys, or that
no key of its scope signed, is refused.
"""

from __future__ import annotations

from dataclasses import dataclass

from agent.images import mediatypes as mt
from agent.images.errors import BadReference, SignatureError
from agent.images.reference import Reference
from agent.images.settings import TrustSettings
from agent.images.signing import PublicKey, load_public_key, parse_payload


@dataclass(frozen=True)
class Verified:
    key: PublicKey
    docker_reference: str


@dataclass(frozen=True)
class Candidate:
    """One signature found for an image: its payload and base64 signature."""

    payload: bytes
    signature: str
    payload_digest: str


class TrustPolicy:
    def __init__(self, settings: TrustSettings):
        self.settings = settings
        # Keys are parsed up front, so a bad key file is a configuration error at start-up,
        # not a surprise at the first pull.
        self.keys = {name: load_public_key(name, value) for name, value in settings.keys.items()}

    @property
    def require_signature(self) -> bool:
        return self.settings.require_signature

    def scope_for(self, ref: Reference) -> str | None:
        """The most specific configured scope covering ``ref``, or None."""
        best: str | None = None
        for scope in self.settings.scopes:
            if _covers(scope, ref) and (best is None or _specificity(scope) > _specificity(best)):
                best = scope
        return best

    def keys_for(self, ref: Reference) -> tuple[str | None, list[PublicKey]]:
        scope = self.scope_for(ref)
        if scope is None:
            return None, []
        return scope, [self.keys[name] for name in self.settings.scopes[scope]]

    def verify(self, ref: Reference, digest: str, candidates: list[Candidate]) -> Verified:
        """Accept one candidate signed by a key of the image's scope over this very digest, or refuse."""
        image = str(ref.with_digest(digest).with_tag(None))
        scope, keys = self.keys_for(ref)
        tried = tuple(k.describe() for k in keys)
        if not keys:
            raise SignatureError(
                f"refused {image}: no trusted keys are configured for {ref.name} "
                "(add a [trust.scopes] entry covering it)",
                image,
                digest,
                tried,
            )
        if not candidates:
            raise SignatureError(
                f"refused {image}: it is unsigned (no {mt.SIMPLE_SIGNING} signature at tag "
                f"{digest.replace(':', '-')}.sig); keys tried: {', '.join(tried)}",
                image,
                digest,
                tried,
            )
        reasons: list[str] = []
        for number, cand in enumerate(candidates, 1):
            signers = [k for k in keys if k.verify(cand.signature, cand.payload)]
            if not signers:
                reasons.append(f"signature {number} ({cand.payload_digest[:19]}…) is not by any trusted key")
                continue
            try:
                claims = parse_payload(cand.payload)
            except ValueError as exc:
                reasons.append(f"signature {number} by {signers[0].name}: {exc}")
                continue
            if claims.digest != digest:
                reasons.append(
                    f"signature {number} by {signers[0].name} is for {claims.digest}, not this image's digest"
                )
                continue
            # Like cosign, the docker-reference claim is informational: an image copied to a
            # mirror keeps its digest and its signatures, under another name.
            return Verified(signers[0], claims.docker_reference)
        raise SignatureError(
            f"refused {image}: no valid signature — {'; '.join(reasons)}; scope {scope!r}, "
            f"keys tried: {', '.join(tried)}",
            image,
            digest,
            tried,
        )

    def verify_claimed(self, image: str, digest: str, candidates: list[Candidate]) -> Verified:
        """Verify an image that comes with no registry name: an OCI layout from the drop-in folder.

        Each signature names the image it was made for (its ``docker-reference`` claim). That
        claim picks the trust scope, exactly as the reference does for a pull, and only a key
        of that scope may have made the signature; the claim is covered by the signature, so a
        key trusted for one repository cannot vouch for an image by claiming another.
        """
        every_key = tuple(k.describe() for k in self.keys.values())
        if not candidates:
            raise SignatureError(
                f"refused {image} ({digest}): it is unsigned (no {mt.SIMPLE_SIGNING} signature named "
                f"{digest.replace(':', '-')}.sig in the layout); trusted keys: {', '.join(every_key) or 'none'}",
                image,
                digest,
                every_key,
            )
        tried: list[str] = []
        reasons: list[str] = []
        for number, cand in enumerate(candidates, 1):
            try:
                claims = parse_payload(cand.payload)
                claimed = Reference.parse(claims.docker_reference)
            except (ValueError, BadReference) as exc:
                reasons.append(f"signature {number}: {exc}")
                continue
            scope, keys = self.keys_for(claimed)
            tried += [k.describe() for k in keys if k.describe() not in tried]
            if not keys:
                reasons.append(f"signature {number} claims {claimed.name}, which no trust scope covers")
                continue
            signers = [k for k in keys if k.verify(cand.signature, cand.payload)]
            if not signers:
                reasons.append(f"signature {number} claims {claimed.name} but is not by a key of scope {scope!r}")
                continue
            if claims.digest != digest:
                reasons.append(
                    f"signature {number} by {signers[0].name} is for {claims.digest}, not this image's digest"
                )
                continue
            return Verified(signers[0], claimed.name)
        raise SignatureError(
            f"refused {image} ({digest}): no valid signature — {'; '.join(reasons)}; "
            f"keys tried: {', '.join(tried) or 'none'}",
            image,
            digest,
            tuple(tried),
        )


def _covers(scope: str, ref: Reference) -> bool:
    if scope == "*":
        return True
    name = ref.name
    return name == scope or name.startswith(scope + "/") or ref.registry == scope


def _specificity(scope: str) -> int:
    return -1 if scope == "*" else len(scope.split("/"))

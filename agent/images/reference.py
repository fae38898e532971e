"""Image references: ``host[:port]/repository[:tag][@sha256:<hex>]``.

The registry host is always explicit: an edge node pulls from the registry
its operator named, never from an implied default such as Docker Hub. The
grammar is the distribution project's (lower-case path components, tags of at
most 128 word characters, dots and dashes).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from agent.images.errors import BadReference

_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
_HOST = rf"(?:\[[0-9a-fA-F:]+\]|{_LABEL}(?:\.{_LABEL})*)(?::[0-9]{{1,5}})?"
_COMPONENT = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
HOST_RE = re.compile(rf"^{_HOST}$")
REPOSITORY_RE = re.compile(rf"^{_COMPONENT}(?:/{_COMPONENT})*$")
TAG_RE = re.compile(r"^[\w][\w.-]{0,127}$")
DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
SIGNATURE_TAG_RE = re.compile(r"^sha256-[0-9a-f]{64}\.sig$")
DEFAULT_TAG = "latest"
EXAMPLE = "registry.example.com/models/digits:1"


@dataclass(frozen=True)
class Reference:
    registry: str  # host[:port], as written (brackets kept for IPv6)
    repository: str
    tag: str | None = None
    digest: str | None = None

    @classmethod
    def parse(cls, text: str) -> Reference:
        raw = text.strip()
        if not raw or any(c.isspace() for c in raw):
            raise BadReference(f"image reference {text!r} is empty or contains spaces")
        name, at, digest = raw.partition("@")
        if at and not DIGEST_RE.match(digest):
            raise BadReference(f"image reference {text!r}: digest must be sha256:<64 lower-case hex digits>")
        host, slash, rest = name.partition("/")
        if not slash or not _looks_like_host(host):
            raise BadReference(f"image reference {text!r} must start with the registry host, e.g. {EXAMPLE}")
        if not HOST_RE.match(host):
            raise BadReference(f"image reference {text!r}: {host!r} is not a valid registry host[:port]")
        repository, tag = rest, None
        # The tag separator is the last ':' after the last '/', so ports never confuse it.
        last = rest.rsplit("/", 1)[-1]
        if ":" in last:
            repository, _, tag = rest.rpartition(":")
            if not TAG_RE.match(tag):
                raise BadReference(f"image reference {text!r}: tag {tag!r} is not valid")
        if not REPOSITORY_RE.match(repository) or len(repository) > 255:
            raise BadReference(
                f"image reference {text!r}: repository {repository!r} must be lower-case path components "
                "of letters and digits separated by '.', '_', '__', '-' or '/'"
            )
        if tag is None and not at:
            tag = DEFAULT_TAG
        return cls(registry=host, repository=repository, tag=tag, digest=digest or None)

    @property
    def name(self) -> str:
        """``host/repository``: what trust scopes and the signature's docker-reference name."""
        return f"{self.registry}/{self.repository}"

    @property
    def host(self) -> str:
        """The host without the port, unbracketed (for TLS server-name checks)."""
        host = self.registry
        if host.startswith("["):
            return host[1 : host.index("]")]
        return host.rsplit(":", 1)[0] if ":" in host else host

    @property
    def port(self) -> int | None:
        tail = self.registry.rsplit("]", 1)[-1]
        return int(tail.rsplit(":", 1)[1]) if ":" in tail else None

    def with_digest(self, digest: str) -> Reference:
        return Reference(self.registry, self.repository, self.tag, digest)

    def with_tag(self, tag: str | None) -> Reference:
        return Reference(self.registry, self.repository, tag, self.digest)

    @property
    def tag_ref(self) -> str:
        """``host/repo:tag``: the key under which a tag's last known digest is recorded."""
        return f"{self.name}:{self.tag}" if self.tag else self.name

    @property
    def manifest_ref(self) -> str:
        """What to put after ``/manifests/``: the digest when known, else the tag."""
        return self.digest or self.tag or DEFAULT_TAG

    def __str__(self) -> str:
        text = self.name
        if self.tag:
            text += f":{self.tag}"
        if self.digest:
            text += f"@{self.digest}"
        return text


def signature_tag(digest: str) -> str:
    """cosign's tag for the signatures of ``digest``: ``sha256-<hex>.sig``."""
    if not DIGEST_RE.match(digest):
        raise BadReference(f"not a sha256 digest: {digest!r}")
    return digest.replace(":", "-") + ".sig"


def _looks_like_host(part: str) -> bool:
    return "." in part or ":" in part or part == "localhost" or part.startswith("[")

"""Registry authentication: the ``WWW-Authenticate`` challenge flow of the distribution spec.

A request goes out anonymously (or with a cached token); a 401 names the
scheme. ``Basic`` means send the configured credentials; ``Bearer`` means ask
the named token service (``realm``) for a token for ``service`` and
``scope``, with the credentials if there are any, and retry with it. Tokens
are cached per scope until shortly before they expire.
"""

from __future__ import annotations

import base64
import re
import time
from dataclasses import dataclass

_PARAM_RE = re.compile(r'\s*([A-Za-z0-9_.-]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]*))\s*,?')


@dataclass(frozen=True)
class Challenge:
    scheme: str  # "basic" or "bearer", lower-case
    params: dict[str, str]


def parse_challenges(header: str) -> list[Challenge]:
    """Parse ``Bearer realm="...",service="...",scope="..."`` (one or more challenges)."""
    challenges: list[Challenge] = []
    rest = header.strip()
    while rest:
        match = re.match(r"([A-Za-z][A-Za-z0-9_-]*)\s*", rest)
        if not match:
            break
        scheme = match.group(1).lower()
        rest = rest[match.end() :]
        params: dict[str, str] = {}
        while True:
            pmatch = _PARAM_RE.match(rest)
            if not pmatch:
                break
            key = pmatch.group(1).lower()
            value = pmatch.group(2) if pmatch.group(2) is not None else pmatch.group(3)
            params[key] = re.sub(r"\\(.)", r"\1", value)
            rest = rest[pmatch.end() :]
        challenges.append(Challenge(scheme, params))
        rest = rest.lstrip(", ")
    return challenges


def basic_header(username: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()


@dataclass
class Token:
    value: str
    expires_at: float

    def valid(self) -> bool:
        return time.monotonic() < self.expires_at


class TokenCache:
    """Bearer tokens by scope; a token is dropped 10 s before the lifetime it was issued with."""

    def __init__(self) -> None:
        self._tokens: dict[str, Token] = {}

    def get(self, scope: str) -> str | None:
        token = self._tokens.get(scope)
        return token.value if token is not None and token.valid() else None

    def put(self, scope: str, value: str, expires_in: float | None) -> None:
        # The spec's default lifetime is 60 s when the server does not say.
        lifetime = max(1.0, float(expires_in or 60) - 10.0)
        self._tokens[scope] = Token(value, time.monotonic() + lifetime)

    def drop(self, scope: str) -> None:
        self._tokens.pop(scope, None)

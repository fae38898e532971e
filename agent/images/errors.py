"""Errors of the image path, each with the exit code the CLI reports.

A refused image (bad signature, bad content, wrong format) is the caller's
data problem (EX_DATAERR); a registry that cannot be reached is worth a retry
later (EX_TEMPFAIL / EX_UNAVAILABLE). Messages name the image and digest so
an operator reading one log line knows what was refused and why.
"""

from __future__ import annotations

from agent import exitcodes
from agent.errors import AgentError


class ImageError(AgentError):
    exit_code = exitcodes.FAILURE


class BadReference(ImageError):
    http_status = 400
    exit_code = exitcodes.USAGE


class ImageRefused(ImageError):
    """The image is not admitted: its content, format or signature is wrong."""

    http_status = 422
    exit_code = exitcodes.DATAERR

    def __init__(self, message: str, image: str = "", digest: str | None = None):
        super().__init__(message)
        self.image = image
        self.digest = digest


class SignatureError(ImageRefused):
    """No acceptable signature by a key the trust policy allows for this image."""

    def __init__(self, message: str, image: str = "", digest: str | None = None, keys_tried: tuple[str, ...] = ()):
        super().__init__(message, image, digest)
        self.keys_tried = keys_tried


class RegistryError(ImageError):
    """The registry answered, but not with what the protocol promises."""

    http_status = 502
    exit_code = exitcodes.UNAVAILABLE

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


class RegistryUnreachable(RegistryError):
    """Connection refused, reset, timed out, or 5xx after every retry."""

    exit_code = exitcodes.TEMPFAIL


class AuthError(RegistryError):
    http_status = 401
    exit_code = exitcodes.UNAVAILABLE


class NotInRegistry(RegistryError):
    """A manifest or blob the registry does not have (404)."""

    http_status = 404


class LayoutError(ImageError):
    """An OCI image layout on disk that cannot be read or written."""

    http_status = 400
    exit_code = exitcodes.DATAERR


class KeyFileError(ImageError):
    """A signing or verification key that cannot be used."""

    exit_code = exitcodes.DATAERR

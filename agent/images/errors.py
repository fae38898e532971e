"""Errors of the image path, kept importable under their old home.

They are defined, with their HTTP status, exit code and wire code, in
agent/errors.py: the one module that holds the error contract.
"""

from __future__ import annotations

from agent.errors import (
    AuthError,
    BadReference,
    ImageError,
    ImageRefused,
    KeyFileError,
    LayoutError,
    NotInRegistry,
    RegistryError,
    RegistryUnreachable,
    SignatureError,
    TooLarge,
)

__all__ = [
    "AuthError",
    "BadReference",
    "ImageError",
    "ImageRefused",
    "KeyFileError",
    "LayoutError",
    "NotInRegistry",
    "RegistryError",
    "RegistryUnreachable",
    "SignatureError",
    "TooLarge",
]

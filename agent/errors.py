"""Exception types shared by the agent's components.

Each carries the HTTP status the serving API answers with, so a handler never
has to guess how to report a failure, and the CLI maps them to exit codes.
"""

from __future__ import annotations


class AgentError(Exception):
    """Base class: an error with a message fit to show a user."""

    http_status = 500


class BadRequest(AgentError):
    http_status = 400


class NotFound(AgentError):
    http_status = 404


class PayloadTooLarge(AgentError):
    http_status = 413


class Unavailable(AgentError):
    """The model exists but cannot serve now (loading, broken, draining)."""

    http_status = 503


class ModelError(AgentError):
    """The model itself failed while running: trap, bad status, timeout."""

    http_status = 500


class InferenceTimeout(ModelError):
    http_status = 504


class InvalidModel(AgentError):
    """An artefact (model.json, module, weights) breaks the model ABI."""

    http_status = 400


class CorruptBlob(AgentError):
    """A stored blob's content no longer matches its digest."""


class ConfigError(AgentError):
    """Configuration that cannot be used; the CLI exits with EX_CONFIG."""


class Forbidden(AgentError):
    """A request the agent refuses whoever sends it: cross-origin, or a pull outside the trust scopes."""

    http_status = 403


class InvalidValue(BadRequest):
    """A value the setting or argument it is given to does not accept.

    ``wire_code`` is the error code MQTT replies carry (docs/MQTT.md); without one
    the code is derived from the class name.
    """

    wire_code = "invalid_value"

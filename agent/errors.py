"""Every error the agent reports, and how each is reported: the error contract.

Each class declares, in its own body, the three codes a caller sees:

- ``http_status``: the status the HTTP APIs answer with (server/oip.py,
  server/repository_api.py), so a handler never has to guess;
- ``exit_code``: what ``edge-agent`` exits with (agent/cli), from sysexits(3);
- ``wire_code``: the ``error.code`` of an MQTT reply (docs/MQTT.md).

They are written out, not derived from the class name, so renaming a class
cannot change the protocol. The table is pinned by tests/test_errors_contract.py:
a change to any code is a protocol change and needs a migration note.
Every subclass of AgentError lives here; other modules import or re-export
them (agent/images/errors.py keeps the image path's names importable).
"""

from __future__ import annotations

from agent import exitcodes


class AgentError(Exception):
    """Base class: an error with a message fit to show a user."""

    http_status: int = 500
    exit_code: int = exitcodes.FAILURE
    wire_code: str = "agent_error"


class BadRequest(AgentError):
    http_status = 400
    exit_code = exitcodes.FAILURE
    wire_code = "bad_request"


class InvalidValue(BadRequest):
    """A value the setting or argument it is given to does not accept."""

    http_status = 400
    exit_code = exitcodes.FAILURE
    wire_code = "invalid_value"


class NotFound(AgentError):
    http_status = 404
    exit_code = exitcodes.FAILURE
    wire_code = "not_found"


class Unavailable(AgentError):
    """The model exists but cannot serve now (loading, broken, draining)."""

    http_status = 503
    exit_code = exitcodes.FAILURE
    wire_code = "unavailable"


class Forbidden(AgentError):
    """A request the agent refuses whoever sends it: cross-origin, or a pull outside the trust scopes."""

    http_status = 403
    exit_code = exitcodes.FAILURE
    wire_code = "forbidden"


class ModelError(AgentError):
    """The model itself failed while running: trap, bad status, timeout."""

    http_status = 500
    exit_code = exitcodes.FAILURE
    wire_code = "model_error"


class InferenceTimeout(ModelError):
    http_status = 504
    exit_code = exitcodes.FAILURE
    wire_code = "inference_timeout"


class DeadlineOverrun(InferenceTimeout):
    """A call ran past a deadline shorter than the model's timeout that its caller set (an inline budget)."""

    http_status = 504
    exit_code = exitcodes.FAILURE
    wire_code = "deadline_overrun"


class InvalidModel(AgentError):
    """An artefact (model.json, module, weights) breaks the model ABI."""

    http_status = 400
    exit_code = exitcodes.FAILURE
    wire_code = "invalid_model"


class ConversionRefused(InvalidModel):
    """An ONNX graph the converter cannot turn into a model image (agent/convert).

    ``problems`` lists every refused node at once, each naming the node, its op and why,
    so a user fixes their export in one round rather than one error per run.
    """

    http_status = 400
    exit_code = exitcodes.DATAERR
    wire_code = "conversion_refused"

    def __init__(self, message: str, problems: list[str] | None = None):
        self.problems = list(problems or [])
        if self.problems:
            message = message + "\n" + "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(message)


class CorruptBlob(AgentError):
    """A stored blob's content no longer matches its digest."""

    http_status = 500
    exit_code = exitcodes.FAILURE
    wire_code = "corrupt_blob"


class ConfigError(AgentError):
    """Configuration that cannot be used; systemd's RestartPreventExitStatus keys on EX_CONFIG."""

    http_status = 500
    exit_code = exitcodes.CONFIG
    wire_code = "config_error"


# -- GPU admission (agent/wasinn/gpu.py) ---------------------------------------------------------------
class GpuUnavailable(Unavailable):
    """A version asks for a GPU the node cannot give: none there, or no room left in the memory budget.

    The message says what was asked, what is free on each device and which versions hold it.
    """

    http_status = 503
    exit_code = exitcodes.UNAVAILABLE
    wire_code = "gpu_unavailable"


class GpuBusy(Unavailable):
    """A call waited its bound for a GPU concurrency slot (``[gpu] max_concurrency``); worth a retry."""

    http_status = 503
    exit_code = exitcodes.TEMPFAIL
    wire_code = "gpu_busy"


# -- start-up -----------------------------------------------------------------------------------------
class StateDirError(AgentError):
    """The state directory cannot be created or written."""

    http_status = 500
    exit_code = exitcodes.CANTCREAT
    wire_code = "state_dir_error"


class ListenError(AgentError):
    """The listen address cannot be bound."""

    http_status = 500
    exit_code = exitcodes.OSERR
    wire_code = "listen_error"


class TokenFileError(AgentError):
    """The token file exists but cannot be read or replaced."""

    http_status = 500
    exit_code = exitcodes.CANTCREAT  # at start-up: the state directory is not usable as it is
    wire_code = "token_file_error"


# -- the command line's client side -----------------------------------------------------------------
class ClientError(AgentError):
    """A CLI verb's failure talking to the agent; the verb picks the exit code for the case."""

    http_status = 500
    exit_code = exitcodes.FAILURE  # the default; each instance carries its own
    wire_code = "client_error"

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


# -- the image path ---------------------------------------------------------------------------------
# A refused image (bad signature, bad content, wrong format) is the caller's data
# problem (EX_DATAERR); a registry that cannot be reached is worth a retry later
# (EX_TEMPFAIL / EX_UNAVAILABLE). Messages name the image and digest so an operator
# reading one log line knows what was refused and why.
class ImageError(AgentError):
    http_status = 500
    exit_code = exitcodes.FAILURE
    wire_code = "image_error"


class BadReference(ImageError):
    http_status = 400
    exit_code = exitcodes.USAGE
    wire_code = "bad_reference"


class ImageRefused(ImageError):
    """The image is not admitted: its content, format or signature is wrong."""

    http_status = 422
    exit_code = exitcodes.DATAERR
    wire_code = "image_refused"

    def __init__(self, message: str, image: str = "", digest: str | None = None):
        super().__init__(message)
        self.image = image
        self.digest = digest


class SignatureError(ImageRefused):
    """No acceptable signature by a key the trust policy allows for this image."""

    http_status = 422
    exit_code = exitcodes.DATAERR
    wire_code = "signature_error"

    def __init__(self, message: str, image: str = "", digest: str | None = None, keys_tried: tuple[str, ...] = ()):
        super().__init__(message, image, digest)
        self.keys_tried = keys_tried


class RegistryError(ImageError):
    """The registry answered, but not with what the protocol promises."""

    http_status = 502
    exit_code = exitcodes.UNAVAILABLE
    wire_code = "registry_error"

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


class RegistryUnreachable(RegistryError):
    """Connection refused, reset, timed out, or 5xx after every retry."""

    http_status = 502
    exit_code = exitcodes.TEMPFAIL
    wire_code = "registry_unreachable"


class AuthError(RegistryError):
    http_status = 401
    exit_code = exitcodes.UNAVAILABLE
    wire_code = "auth_error"


class NotInRegistry(RegistryError):
    """A manifest or blob the registry does not have (404)."""

    http_status = 404
    exit_code = exitcodes.UNAVAILABLE
    wire_code = "not_in_registry"


class TooLarge(RegistryError):
    """A registry answer longer than the limit set for it (registry.max_*_bytes)."""

    http_status = 502
    exit_code = exitcodes.UNAVAILABLE
    # The spelling is what the old derivation made of the class's former name,
    # _TooLarge; it is on the wire, so it stays until a migration renames it.
    wire_code = "__too_large"

    def __init__(self, size: int | None, limit: int, what: str):
        told = f"{size} bytes" if size is not None else "more bytes"
        super().__init__(f"{what} is {told}, over the limit of {limit} bytes")
        self.size = size
        self.limit = limit


class LayoutError(ImageError):
    """An OCI image layout on disk that cannot be read or written."""

    http_status = 400
    exit_code = exitcodes.DATAERR
    wire_code = "layout_error"


class KeyFileError(ImageError):
    """A signing or verification key that cannot be used."""

    http_status = 500
    exit_code = exitcodes.DATAERR
    wire_code = "key_file_error"

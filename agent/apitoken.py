"""The control API's bearer token, kept in ``<state_dir>/api-token`` when none is configured.

The repository (control) endpoints are never open: when ``api_token`` is not
set, the agent makes a random token on its first start, writes it to the
state directory readable by its own user only (0600), and reads it back on
every later start. The CLI, run by that user (or root), reads the same file,
so ``edge-agent deploy`` keeps working without any configuration while a
browser page or another local user cannot drive the node.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
from pathlib import Path

import structlog

from agent.errors import TokenFileError

TOKEN_FILE = "api-token"
# 32 random bytes, URL-safe base64: 43 characters, fit for a header and a shell variable.
TOKEN_BYTES = 32

log = structlog.get_logger("edge_agent.api")


def token_path(state_dir: Path) -> Path:
    return Path(state_dir) / TOKEN_FILE


def read_token(state_dir: Path) -> str | None:
    """The token in the state directory, or None when there is none (or it is empty).

    Raises :class:`TokenFileError` when the file exists but this user may not read it,
    so a client can say why instead of sending no token.
    """
    path = token_path(state_dir)
    try:
        text = path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise TokenFileError(f"cannot read the API token in {path}: {reason}") from exc
    return text or None


def load_or_create(state_dir: Path) -> str:
    """The state directory's token, made (random, 0600) on the first start."""
    path = token_path(state_dir)
    existing = read_token(state_dir)
    if existing is not None:
        _tighten(path)
        return existing
    token = secrets.token_urlsafe(TOKEN_BYTES)
    tmp = path.with_name(f".{TOKEN_FILE}.{os.getpid()}.tmp")
    try:
        # O_EXCL + 0600 from the start: the token is never readable by others, not even for a moment.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, token.encode("ascii") + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise TokenFileError(f"cannot write the API token to {path}: {exc.strerror or exc}") from exc
    log.info("control API token created", path=str(path))
    return token


def _tighten(path: Path) -> None:
    """A token file others can read (copied in by hand, a umask accident) is made 0600 again."""
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            path.chmod(0o600)
            log.warning("control API token file was readable by others; made 0600", path=str(path), mode=oct(mode))
    except OSError as exc:
        log.warning("control API token file permissions cannot be checked", path=str(path), error=str(exc))

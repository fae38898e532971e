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
import errno
import os
import secrets
import stat
import tempfile
from pathlib import Path

import structlog

from agent.cas import fsync_dir
from agent.errors import TokenFileError

TOKEN_FILE = "api-token"
# 32 random bytes, URL-safe base64: 43 characters, fit for a header and a shell variable.
TOKEN_BYTES = 32

log = structlog.get_logger("edge_agent.api")


def token_path(state_dir: Path) -> Path:
    return Path(state_dir) / TOKEN_FILE


# Far more than a token: a larger file is not one, and is not read.
MAX_TOKEN_FILE_BYTES = 4096


def read_token(state_dir: Path) -> str | None:
    """The token in the state directory, or None when there is none (or it is empty).

    Read only through a regular file at that very path: a symlink is not followed and a
    FIFO or device is not waited on. Raises :class:`TokenFileError` when the file exists
    but cannot be read as a token, so a client can say why instead of sending none.
    """
    path = token_path(state_dir)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise TokenFileError(f"cannot read the API token in {path}: {_why(path, exc)}") from exc
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise TokenFileError(f"the API token {path} is not a regular file; refused")
        if info.st_size > MAX_TOKEN_FILE_BYTES:
            raise TokenFileError(f"the API token {path} is {info.st_size} bytes, not a token; refused")
        if stat.S_IMODE(info.st_mode) & 0o077 and info.st_uid == os.geteuid():
            # Copied in by hand, a umask accident: the owner makes it private again.
            os.fchmod(fd, 0o600)
            log.warning("control API token file was readable by others; made 0600", path=str(path))
        data = os.read(fd, MAX_TOKEN_FILE_BYTES + 1)
        text = data.decode("ascii").strip()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise TokenFileError(f"cannot read the API token in {path}: {reason}") from exc
    finally:
        os.close(fd)
    return text or None


def _why(path: Path, exc: OSError) -> str:
    if exc.errno == errno.ELOOP:
        return "it is a symbolic link, not a regular file; refused"
    return exc.strerror or str(exc)


def load_or_create(state_dir: Path) -> str:
    """The state directory's token, made (random, 0600) on the first start.

    Written to a temporary file of a fresh name (one left by a crash is never in the
    way) and published with a hard link, which fails if another process published
    first: then that one's token is everyone's.
    """
    path = token_path(state_dir)
    existing = read_token(state_dir)
    if existing is not None:
        return existing
    token = secrets.token_urlsafe(TOKEN_BYTES)
    try:
        # mkstemp: O_EXCL and 0600 from the start, never readable by others, not even for a moment.
        fd, tmp_name = tempfile.mkstemp(prefix=f".{TOKEN_FILE}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise TokenFileError(f"cannot write the API token to {path}: {exc.strerror or exc}") from exc
    tmp = Path(tmp_name)
    try:
        try:
            os.write(fd, token.encode("ascii") + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)
        except FileExistsError:
            winner = read_token(state_dir)
            if winner is None:
                raise TokenFileError(f"the API token {path} appeared empty while this agent was creating it") from None
            return winner
        fsync_dir(path.parent)  # the new name survives a power cut too, not only the bytes
    except OSError as exc:
        raise TokenFileError(f"cannot write the API token to {path}: {exc.strerror or exc}") from exc
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()
    log.info("control API token created", path=str(path))
    return token

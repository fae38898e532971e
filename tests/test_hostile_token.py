"""The control API's token file: a hostile or damaged state directory cannot block start-up or be followed."""

from __future__ import annotations

import os
import stat
import threading
from pathlib import Path

import pytest

from agent.apitoken import TOKEN_FILE, load_or_create, read_token
from agent.errors import TokenFileError


def test_a_stale_temporary_file_from_a_crash_does_not_block_start_up(tmp_path: Path) -> None:
    """In a container the PID is the same on every start: a temp file a power cut left must not matter."""
    (tmp_path / f".{TOKEN_FILE}.{os.getpid()}.tmp").write_bytes(b"half-written")
    token = load_or_create(tmp_path)
    assert token and read_token(tmp_path) == token
    assert stat.S_IMODE((tmp_path / TOKEN_FILE).stat().st_mode) == 0o600


def test_a_symlinked_token_file_is_refused_not_followed(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.write_text("secret-of-someone-else\n")
    target.chmod(0o644)
    state = tmp_path / "state"
    state.mkdir()
    (state / TOKEN_FILE).symlink_to(target)
    with pytest.raises(TokenFileError, match=r"not a regular file|symbolic link"):
        load_or_create(state)
    assert stat.S_IMODE(target.stat().st_mode) == 0o644  # not chmod-ed through the link


def test_a_fifo_token_file_is_refused_without_blocking(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / TOKEN_FILE)
    outcome: list[object] = []

    def load() -> None:
        try:
            outcome.append(load_or_create(tmp_path))
        except TokenFileError as exc:
            outcome.append(exc)

    reader = threading.Thread(target=load, daemon=True)
    reader.start()
    reader.join(60)  # hang guard only
    assert outcome and isinstance(outcome[0], TokenFileError), outcome


def test_two_agents_creating_the_token_at_once_agree_on_it(tmp_path: Path) -> None:
    tokens: list[str] = []
    barrier = threading.Barrier(8)

    def create() -> None:
        barrier.wait()
        tokens.append(load_or_create(tmp_path))

    threads = [threading.Thread(target=create) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(tokens) == 8 and len(set(tokens)) == 1 and read_token(tmp_path) == tokens[0]

"""The drop-in folder: OCI layouts placed in <state-dir>/inbox are verified, imported and deployed.

Real watchdog observers on a real directory; real layouts built and signed with the
agent's own image tooling; the agent serves over HTTP throughout.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROLLBACK_GRACE_S, http

DIGITS = Path(__file__).resolve().parent.parent / "agent" / "bundled" / "digits"


def wait_for(predicate: Callable[[], Any], timeout: float = 60.0, what: str = "condition") -> Any:
    """Poll until ``predicate()`` is truthy; the timeout is a hang guard for a loaded machine, not a speed check."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def with_inbox(extra: dict[str, Any] | None = None) -> Callable[[Any], None]:
    def setup(agent: Any) -> None:
        from agent.wiring import attach_services

        agent.config.sections["inbox"] = {"settle_s": 0.2, "rescan_s": 5.0}
        agent.config.sections["lifecycle"] = {"rollback_grace_s": ROLLBACK_GRACE_S}  # as make_agent's own
        agent.config.sections.update(extra or {})
        attach_services(agent)

    return setup


def refused(inbox: Path, name: str) -> str | None:
    reason = inbox / "refused" / f"{name}.reason"
    return reason.read_text() if reason.exists() else None


def test_not_a_layout_is_refused_with_reason_and_serving_continues(make_agent: Any) -> None:
    agent = make_agent(setup=with_inbox())
    inbox = agent.agent.config.state_dir / "inbox"
    junk = inbox / "junk-dir"
    junk.mkdir()
    (junk / "model.wasm").write_bytes(b"\0asm")
    (inbox / "notes.txt").write_text("hello")

    reason = wait_for(lambda: refused(inbox, "junk-dir"), what="junk-dir refused")
    assert "not an OCI image layout" in reason
    reason = wait_for(lambda: refused(inbox, "notes.txt"), what="notes.txt refused")
    assert "tar" in reason
    assert (inbox / "refused" / "junk-dir" / "model.wasm").exists()  # moved aside, not deleted
    assert not junk.exists()
    status, body = http("GET", f"{agent.url}/v2/models/digits/ready")
    assert status == 200, body


def test_hidden_entries_wait_until_renamed(make_agent: Any) -> None:
    agent = make_agent(setup=with_inbox())
    inbox = agent.agent.config.state_dir / "inbox"
    hidden = inbox / ".incoming"
    hidden.mkdir()
    (hidden / "partial").write_text("x")
    # A visible entry dropped after the hidden one: once it has been taken (refused: it is junk), the
    # watcher has scanned the folder with the hidden entry in it, settled for longer than the sentinel.
    (inbox / "sentinel.txt").write_text("not a layout")
    wait_for(lambda: refused(inbox, "sentinel.txt"), what="the sentinel processed")
    assert hidden.exists() and sorted(p.name for p in (inbox / "refused").iterdir()) == [
        "sentinel.txt",
        "sentinel.txt.reason",
    ]
    os.rename(hidden, inbox / "arrived")
    wait_for(lambda: refused(inbox, "arrived"), what="renamed entry processed")


def test_inbox_can_be_disabled(make_agent: Any) -> None:
    agent = make_agent(setup=with_inbox({"inbox": {"enabled": "false"}}))
    assert getattr(agent.agent, "inbox", None) is None
    assert not (agent.agent.config.state_dir / "inbox" / "refused").exists()


# -- with real images -----------------------------------------------------------------------------
IDENTITY = "registry.example.com/models/digits"


def make_model_dir(tmp: Path, version: str, bias_shift: float) -> Path:
    """digits with another version number and shifted output biases (goldens recomputed)."""
    import sys

    import numpy as np
    import safetensors.numpy

    sys.path.insert(0, str(DIGITS.parent.parent.parent / "native" / "models"))
    from digits_reference import reference

    dest = tmp / f"digits-{version}"
    dest.mkdir()
    shutil.copy(DIGITS / "model.wasm", dest / "model.wasm")
    weights = safetensors.numpy.load_file(str(DIGITS / "weights.safetensors"))
    weights["fc2.bias"] = (weights["fc2.bias"] + np.linspace(-bias_shift, bias_shift, 10)).astype(np.float32)
    safetensors.numpy.save_file(weights, str(dest / "weights.safetensors"))
    meta = json.loads((DIGITS / "model.json").read_text())
    meta["version"] = version
    pixels = np.asarray(meta["warmup"]["inputs"]["pixels"]["data"], dtype=np.float32).reshape(1, 64)
    out = reference(weights, pixels)
    meta["warmup"]["outputs"]["probabilities"]["data"] = out["probabilities"].ravel().tolist()
    meta["warmup"]["outputs"]["label"]["data"] = out["label"].ravel().tolist()
    (dest / "model.json").write_text(json.dumps(meta))
    return dest


@pytest.fixture
def trusted(tmp_path: Path) -> tuple[Any, Any, Callable[[Any], None]]:
    """(trusted key, untrusted key, agent setup whose trust policy accepts only the first for IDENTITY)."""
    from tests.images_fixtures import make_keypair

    keys = tmp_path / "keys"
    keys.mkdir()
    good, bad = make_keypair(keys, "release"), make_keypair(keys, "stranger")

    def setup(agent: Any) -> None:
        agent.config.sections["trust"] = {
            "keys": {"release": str(good.public_path), "stranger": str(bad.public_path)},
            "scopes": {"registry.example.com/models": ["release"], "other.example.com": ["stranger"]},
        }
        with_inbox()(agent)

    return good, bad, setup


def served_version(url: str) -> str:
    status, body = http("GET", f"{url}/v2/models/digits")
    assert status == 200, body
    return str(body["versions"][0]) if body.get("versions") else ""


def infer_version(url: str) -> str:
    doc = {"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 64], "data": [1.0] * 64}]}
    status, body = http("POST", f"{url}/v2/models/digits/infer", doc)
    assert status == 200, body
    return str(body["model_version"])


@pytest.mark.parametrize("as_tar", [False, True], ids=["directory", "tar"])
def test_signed_layout_is_imported_and_deployed(make_agent: Any, tmp_path: Path, trusted: Any, as_tar: bool) -> None:
    from tests.images_fixtures import signed_layout

    good, _bad, setup = trusted
    agent = make_agent(setup=setup)
    assert infer_version(agent.url) == "1"
    work = tmp_path / "work"
    work.mkdir()
    layout, digest = signed_layout(work, make_model_dir(work, "2", 0.5), good, IDENTITY, tar=as_tar)
    inbox = agent.agent.config.state_dir / "inbox"
    # Written beside the inbox and renamed in, as the folder's contract asks.
    os.rename(layout, inbox / layout.name)

    wait_for(lambda: infer_version(agent.url) == "2", what="version 2 served")
    wait_for(lambda: not (inbox / layout.name).exists(), what="entry removed after import")
    record = agent.agent.db.get_version("digits", "2")
    assert record is not None and record.manifest_digest == digest
    assert agent.agent.inbox.processed == 1 and agent.agent.inbox.refused == 0
    # Fed to the one reconciler as the local source, so a restart would keep it.
    effective = agent.agent.control.desired.effective()
    assert effective["digits"][0] == "local"


@pytest.mark.parametrize("signer", ["unsigned", "untrusted"])
def test_unsigned_or_untrusted_layout_is_refused_and_nothing_changes(
    make_agent: Any, tmp_path: Path, trusted: Any, signer: str
) -> None:
    from tests.images_fixtures import signed_layout

    _good, bad, setup = trusted
    agent = make_agent(setup=setup)
    work = tmp_path / "work"
    work.mkdir()
    key = None if signer == "unsigned" else bad
    layout, digest = signed_layout(work, make_model_dir(work, "3", 0.7), key, IDENTITY, tar=True)
    inbox = agent.agent.config.state_dir / "inbox"
    os.rename(layout, inbox / layout.name)

    reason = wait_for(lambda: refused(inbox, layout.name), what="refusal")
    assert digest in reason or "signature" in reason.lower(), reason
    assert (inbox / "refused" / layout.name).is_file()
    assert agent.agent.db.get_version("digits", "3") is None  # nothing of it admitted
    assert infer_version(agent.url) == "1"


def test_tampered_layout_is_refused(make_agent: Any, tmp_path: Path, trusted: Any) -> None:
    from tests.images_fixtures import signed_layout

    good, _bad, setup = trusted
    agent = make_agent(setup=setup)
    work = tmp_path / "work"
    work.mkdir()
    layout, _digest = signed_layout(work, make_model_dir(work, "4", 0.9), good, IDENTITY)
    # Flip a byte of the biggest blob (the weights) after signing.
    blob = max((layout / "blobs" / "sha256").iterdir(), key=lambda p: p.stat().st_size)
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0xFF
    blob.write_bytes(bytes(data))
    inbox = agent.agent.config.state_dir / "inbox"
    os.rename(layout, inbox / layout.name)

    reason = wait_for(lambda: refused(inbox, layout.name), what="refusal")
    assert "sha256" in reason or "digest" in reason, reason
    assert agent.agent.db.get_version("digits", "4") is None
    assert infer_version(agent.url) == "1"


def test_entries_dropped_while_the_agent_was_down_are_processed_at_start(
    make_agent: Any, tmp_path: Path, trusted: Any
) -> None:
    from tests.images_fixtures import signed_layout

    good, _bad, setup = trusted
    work = tmp_path / "work"
    work.mkdir()
    layout, _digest = signed_layout(work, make_model_dir(work, "5", 0.3), good, IDENTITY, tar=True)
    inbox = tmp_path / "state" / "inbox"
    inbox.mkdir(parents=True)
    os.rename(layout, inbox / layout.name)
    agent = make_agent(setup=setup)
    wait_for(lambda: infer_version(agent.url) == "5", what="version 5 served")

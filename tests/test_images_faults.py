"""Pulls through a faulty network: a cut transfer, a stall, a registry failing then recovering, kill -9.

A proxy between the agent and a real registry injects each fault and counts
the bytes it carried, so "resume fetches only the rest" is checked on the
wire, not only by the agent's own accounting.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from images_fixtures import (
    REPO,
    FaultProxy,
    ImageEnv,
    KeyPair,
    Registry,
    make_keypair,
    make_large_model,
    needs_registry,
    publish,
    registry,  # noqa: F401 - the fixture
)

from agent.images import mediatypes as mt
from agent.images.errors import RegistryUnreachable

pytestmark = needs_registry
WEIGHTS = 8 * 1024 * 1024


@pytest.fixture(scope="module")
def key(tmp_path_factory: pytest.TempPathFactory) -> KeyPair:
    return make_keypair(tmp_path_factory.mktemp("keys"), "release")


@pytest.fixture
def proxy(registry: Registry) -> Iterator[FaultProxy]:  # noqa: F811
    p = FaultProxy(registry.port)
    yield p
    p.close()


def env_for(root: Path, proxy: FaultProxy, key: KeyPair, **registry_settings: object) -> ImageEnv:
    return ImageEnv(
        root,
        hosts={proxy.host: {"plain_http": True}},
        keys={"release": key.public_path},
        scopes={f"{proxy.host}/models": ["release"]},
        registry=dict(registry_settings),
    )


def published(tmp_path: Path, registry: Registry, key: KeyPair, name: str, size: int = WEIGHTS) -> tuple[str, int]:  # noqa: F811
    """Publish straight to the registry (no proxy); returns (repository:tag, weights size)."""
    env = ImageEnv(tmp_path / "publisher", hosts={registry.host: {"plain_http": True}})
    model = make_large_model(tmp_path / name, name=name, version="1", weight_bytes=size, seed=hash(name) % 1000)
    publish(tmp_path, env.registry_settings(), model, f"{registry.host}/models/{name}:1", key)
    return f"models/{name}:1", (model / "weights.safetensors").stat().st_size


def test_cut_transfer_resumes_with_range_and_fetches_only_the_rest(
    tmp_path: Path,
    registry: Registry,  # noqa: F811
    proxy: FaultProxy,
    key: KeyPair,
) -> None:
    repo_tag, weights_size = published(tmp_path, registry, key, "cut")
    env = env_for(tmp_path / "node", proxy, key)
    proxy.cut_at = weights_size // 2  # the small blobs come first; the cut lands mid-weights
    result = env.puller().pull(f"{proxy.host}/{repo_tag}")
    weights = result.blobs[2]
    assert weights.size == weights_size
    assert weights.attempts == 2, "one cut, one resume"
    assert weights.fetched == weights_size, "every byte fetched exactly once"
    assert result.fetched_bytes == result.image_bytes
    # On the wire: what the proxy carried beyond the image itself is headers and small documents.
    overhead = proxy.down_bytes - result.image_bytes
    assert 0 < overhead < 0.01 * weights_size, overhead
    assert env.repository.blobs.verify(result.record.weights_digest)
    # And on the wire: manifests asked for with the OCI Accept header, the resume with a Range.
    heads = proxy.request_heads()
    manifests = [h for h in heads if "/manifests/" in h["path"]]
    assert manifests and all(mt.OCI_MANIFEST in h["accept"] for h in manifests)
    (ranged,) = [h for h in heads if "range" in h]
    assert ranged["path"].endswith(f"/blobs/{result.record.weights_digest}")
    match = re.fullmatch(r"bytes=(\d+)-", ranged["range"])
    assert match and 0 < int(match.group(1)) < weights_size // 2, ranged


def test_stalled_server_times_out_and_resumes(
    tmp_path: Path,
    registry: Registry,  # noqa: F811
    proxy: FaultProxy,
    key: KeyPair,
) -> None:
    repo_tag, weights_size = published(tmp_path, registry, key, "stall")
    # Long enough that a loaded machine's pauses are not taken for a stall (one stall, one resume).
    env = env_for(tmp_path / "node", proxy, key, stall_timeout_s=3.0)
    proxy.stall_at = weights_size // 3
    result = env.puller().pull(f"{proxy.host}/{repo_tag}")
    # The client gave up on the silent connection itself (its stall timeout), not because the server let go:
    # the proxy is still holding the stalled connection open. Without the timeout the pull would still be
    # waiting on it, however fast or slow the machine.
    assert proxy.holding == 1
    proxy.release()
    weights = result.blobs[2]
    assert weights.attempts == 2 and weights.fetched == weights_size


def test_registry_failing_then_recovering(
    tmp_path: Path,
    registry: Registry,  # noqa: F811
    proxy: FaultProxy,
    key: KeyPair,
) -> None:
    repo_tag, _ = published(tmp_path, registry, key, "flaky", size=64 * 1024)
    env = env_for(tmp_path / "node", proxy, key, attempts=4)
    proxy.fail_first = 3
    result = env.puller().pull(f"{proxy.host}/{repo_tag}")
    assert proxy.failed == 3
    assert result.record.model == "flaky"

    # A registry that never recovers: the pull gives up after its attempts and says why.
    fresh = env_for(tmp_path / "node2", proxy, key, attempts=3)
    proxy.fail_first = 100
    with pytest.raises(RegistryUnreachable) as info:
        fresh.puller().pull(f"{proxy.host}/models/flaky:1")
    message = str(info.value)
    assert "failed 3 time(s)" in message and "500" in message and "injected fault" in message
    assert fresh.versions() == []


def test_kill_9_mid_pull_then_rerun_completes(
    tmp_path: Path,
    registry: Registry,  # noqa: F811
    proxy: FaultProxy,
    key: KeyPair,
) -> None:
    size = 16 * 1024 * 1024
    repo_tag, weights_size = published(tmp_path, registry, key, "killed", size=size)
    # The transfer stops half-way (a stall the client waits out for 600 s): the kill lands mid-blob on any machine.
    env = env_for(tmp_path / "node", proxy, key, stall_timeout_s=600)
    proxy.stall_at = weights_size // 2
    cmd = [sys.executable, "-m", "agent", "pull", f"{proxy.host}/{repo_tag}", "--config", str(env.config_path)]
    child_env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_AGENT_")}
    proc = subprocess.Popen(cmd, cwd=REPO, env=child_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    tmp_dir = env.state_dir / "tmp"
    deadline = time.monotonic() + 60  # a hang guard
    partial_size = 0
    while time.monotonic() < deadline:
        partials = list(tmp_dir.glob("partial-*")) if tmp_dir.exists() else []
        sizes = [p.stat().st_size for p in partials]
        if sizes and max(sizes) > weights_size // 4:
            partial_size = max(sizes)
            break
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    assert partial_size > 0, "the kill did not land mid-blob"
    assert env.versions() == [], "nothing is recorded by a pull that did not finish"

    proxy.release()
    proxy.settle()  # the dead client's connection may still be draining through the proxy
    down_before = proxy.down_bytes
    rerun = env.cli("pull", f"{proxy.host}/{repo_tag}", "--json")
    assert rerun.returncode == 0, rerun.stderr
    doc = json.loads(rerun.stdout)
    weights = doc["blobs"][2]
    assert weights["resumed_from"] >= partial_size
    assert weights["fetched"] == weights_size - weights["resumed_from"]
    assert proxy.down_bytes - down_before < weights_size - weights["resumed_from"] + 64 * 1024
    verify = env.cli("cache", "verify")
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert env.versions() == [("killed", "1")]
    assert not list(tmp_dir.glob("partial-*"))

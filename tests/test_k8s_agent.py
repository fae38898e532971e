"""A real agent (store, runtime, reconciler, HTTP API) driven by EdgeModelDeployments from the fake API server.

What the watcher tests show against a recording reconciler is shown here end
to end: the resource's version is what the node serves over HTTP, the status
and Events the node writes back are about what it really did, and the desired
state the reconciler persisted in SQLite keeps the node serving through an
agent restart while the API server is away.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import ROLLBACK_GRACE_S, AgentThread, http
from k8s_fake import FakeKube
from modelkit import make_scale_model

from agent.config import Config
from agent.errors import AgentError
from agent.wiring import attach_k8s, attach_lifecycle

EDGE = {"node-role.kubernetes.io/edge": "true"}


def x_request() -> dict[str, Any]:
    return {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1.0, 1.0, 1.0, 1.0]}]}


def served(agent: AgentThread) -> str:
    status, body = http("POST", agent.url + "/v2/models/scale/infer", x_request())
    assert status == 200, body
    return str(body["model_version"])


def eventually(check: Callable[[], Any], timeout: float = 60.0, what: str = "condition") -> Any:
    """Poll until ``check()`` is truthy; the timeout is a hang guard for a loaded machine, not a speed check."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except (AssertionError, KeyError, TypeError) as exc:
            last = exc
        else:
            if last:
                return last
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what} (last: {last!r})")


@pytest.fixture
def fake() -> Iterator[FakeKube]:
    server = FakeKube("edge-1", EDGE).start()
    yield server
    server.stop()


class StorePuller:
    """Stands in for image pulls (agent/images/service.py's ImageService): every image holds scale 2, stored."""

    def __init__(self) -> None:
        self.pulls: list[str] = []
        self.db: Any = None

    async def pull(self, ref: str) -> Any:
        self.pulls.append(ref)
        return self.db.get_version("scale", "2")


@pytest.fixture
def start_agent(tmp_path: Path, fake: FakeKube) -> Iterator[Callable[..., AgentThread]]:
    """Starts agents on one state directory; the first one imports scale 1 and 2 and serves 1."""
    agents: list[AgentThread] = []
    env = {
        "EDGE_AGENT_K8S__ENABLED": "true",
        "EDGE_AGENT_K8S__MODE": "url",
        "EDGE_AGENT_K8S__URL": fake.url,
        "EDGE_AGENT_K8S__NODE_NAME": "edge-1",
        "EDGE_AGENT_K8S__READ_TIMEOUT_S": "2",
        "EDGE_AGENT_K8S__CONNECT_TIMEOUT_S": "1",
        "EDGE_AGENT_K8S__BACKOFF_INITIAL_S": "0.05",
        "EDGE_AGENT_K8S__BACKOFF_MAX_S": "0.3",
    }

    def factory(puller: StorePuller | None = None) -> AgentThread:
        def setup(agent: Any) -> None:
            if not agents:
                agent.repository.import_dir(make_scale_model(tmp_path / "v1", version="1", scale=(1, 1, 1, 1)))
                agent.repository.import_dir(make_scale_model(tmp_path / "v2", version="2", scale=(2, 2, 2, 2)))
                agent.db.set_active("scale", "1")
            if puller is not None:
                puller.db = agent.db
                agent.puller = puller  # before the lifecycle, which pulls through it
            attach_lifecycle(agent, rollback_grace_s=ROLLBACK_GRACE_S)
            attach_k8s(agent, env={})

        overrides = {"state_dir": tmp_path / "state", "listen": "127.0.0.1:0", "log_level": "warning"}
        config = Config.load(env=env, overrides={**overrides, "seed_bundled": False})
        agent = AgentThread(config, setup)
        agents.append(agent)
        return agent

    yield factory
    for agent in agents:
        if agent.loop.is_running():  # a test may have stopped it already
            agent.stop()


def test_a_resource_drives_what_the_node_serves_and_the_node_reports_back(
    fake: FakeKube, start_agent: Callable[[], AgentThread]
) -> None:
    res = fake.create("scale", {"model": "scale", "version": "2", "nodeSelector": {"matchLabels": EDGE}})
    agent = start_agent()
    eventually(lambda: served(agent) == "2", what="the resource's version served")
    entry = eventually(lambda: fake.node_status("scale"), what="status entry")
    assert entry["version"] == "2" and entry["lastError"] == "" and entry["observedGeneration"] == 1
    swapped = eventually(lambda: [e for e in fake.events if e["reason"] == "Swapped"], what="Swapped event")
    assert swapped[0]["involvedObject"]["uid"] == res["metadata"]["uid"]
    assert "scale version 2 (was 1)" in swapped[0]["message"]
    # Kubernetes governs the model now: the node's own CLI / local API may not change it.
    with pytest.raises(AgentError, match="governed by k8s"):
        agent.call(agent.lifecycle.deploy("store:scale:1", source="local"))

    # A version the node does not have: the old one keeps serving, and the
    # resource says why, as status and as a Warning Event.
    fake.update_spec("scale", {"model": "scale", "version": "9"})
    entry = eventually(lambda: "9" in fake.node_status("scale")["lastError"], what="lastError") and fake.node_status(
        "scale"
    )
    assert entry["version"] == "2" and entry["observedGeneration"] == 2
    failed = eventually(lambda: [e for e in fake.events if e["reason"] == "ReconcileFailed"], what="failure event")
    assert failed[0]["type"] == "Warning" and "edge-1" in failed[0]["message"]
    assert served(agent) == "2"

    # The resource goes: Kubernetes lets go of the model, which stays as it is
    # and is the node's own again.
    fake.delete("scale")
    eventually(lambda: agent.call(agent.lifecycle.status())["desired"] == {}, what="desired state dropped")
    assert served(agent) == "2"
    agent.call(agent.lifecycle.deploy("store:scale:1", source="local"))
    assert served(agent) == "1"


def test_node_autonomy_restart_while_the_api_server_is_away_then_catch_up(
    fake: FakeKube, start_agent: Callable[[], AgentThread]
) -> None:
    fake.create("scale", {"model": "scale", "version": "2"})
    agent = start_agent()
    eventually(lambda: served(agent) == "2", what="version 2 from the resource")
    eventually(lambda: fake.node_status("scale"), what="status entry")

    fake.stop()
    agent.stop()
    # The resource changes while the node cannot see it.
    fake.update_spec("scale", {"model": "scale", "version": "1"})

    agent = start_agent()  # restarts on its SQLite state, with no API server
    assert served(agent) == "2", "the last desired state it was told"
    assert not agent.agent.k8s.connected
    status = agent.call(agent.lifecycle.status())
    assert status["desired"]["scale"]["source"] == "k8s", "still Kubernetes' model, offline"
    with pytest.raises(AgentError, match="governed by k8s"):
        agent.call(agent.lifecycle.deploy("store:scale:1", source="local"))
    # Failed reconnects change nothing: wait for one to have happened, then leave room for more.
    eventually(lambda: agent.agent.k8s.last_error, what="a failed reconnect")
    time.sleep(0.5)  # a window for more failed reconnects, not a wait for something to happen
    assert served(agent) == "2"

    fake.start()
    eventually(lambda: served(agent) == "1", what="catch-up once the API server is back")
    eventually(lambda: (fake.node_status("scale") or {}).get("version") == "1", what="status caught up")
    assert agent.agent.k8s.connected


def test_spec_pinned_pins_the_model_on_the_node_and_an_edit_moves_it(
    fake: FakeKube, start_agent: Callable[[], AgentThread]
) -> None:
    fake.create("scale", {"model": "scale", "version": "2", "pinned": True})
    agent = start_agent()
    eventually(lambda: agent.agent.db.get_model("scale").pinned, what="pinned by the resource")
    # The flag is set as the reconcile starts; the pin holds once version 2 is reached and held.
    eventually(lambda: agent.lifecycle.desired.held("k8s", "scale") == "2", what="version 2 held by the pin")
    assert served(agent) == "2"
    # A pin on the node, as `edge-agent pin` places: it holds against every
    # source, Kubernetes' own deploys included.
    with pytest.raises(AgentError, match="pinned at version 2"):
        agent.call(agent.lifecycle.deploy("store:scale:1", source="k8s"))
    fake.update_spec("scale", {"model": "scale", "version": "1", "pinned": True})
    eventually(lambda: served(agent) == "1", what="the edit applied through the pin")
    eventually(lambda: agent.agent.db.get_model("scale").pinned, what="pinned again")
    entry = eventually(lambda: (fake.node_status("scale") or {}).get("version") == "1" and fake.node_status("scale"))
    assert entry["lastError"] == ""


def test_a_canary_split_pulls_its_image_once_through_the_reconciler(
    fake: FakeKube, start_agent: Callable[..., AgentThread]
) -> None:
    """The image a split's resource names is pulled by the reconciler before it routes, and only by it."""
    image = "registry.local/models/scale@sha256:" + "cd" * 32
    traffic = [{"version": "1", "weight": 50}, {"version": "2", "weight": 50}]
    fake.create("scale", {"model": "scale", "image": image, "traffic": traffic})
    puller = StorePuller()
    agent = start_agent(puller)
    routes = agent.agent.models.routes
    eventually(lambda: {m.version for m in routes["scale"].versions()} == {"1", "2"}, what="the split routed")
    entry = eventually(lambda: fake.node_status("scale"), what="status entry")
    assert entry["lastError"] == ""
    assert puller.pulls == [image], "pulled once, by the reconciler"

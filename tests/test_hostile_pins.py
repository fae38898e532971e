"""Pins go through the reconciler, with the same precedence as every other change.

Found by a hostile operator: while MQTT governed a model, a local ``pin`` was
accepted and then blocked every fleet deploy; and ``set-desired``'s ``pinned``
field over MQTT was accepted and never applied.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest
from conftest import ROLLBACK_GRACE_S, http
from modelkit import make_scale_model
from mqtt_fixtures import Commander, Recorder, fleet_keypair, needs_mosquitto, running_broker, wait_until

from agent.control import ModelDeployment
from agent.errors import AgentError
from agent.wiring import attach_lifecycle, attach_mqtt


def x_request() -> dict[str, Any]:
    return {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1, 1, 1, 1]}]}


def served(agent: Any) -> str:
    status, body = http("POST", agent.url + "/v2/models/scale/infer", x_request())
    assert status == 200, body
    return str(body["model_version"])


def store_versions(agent: Any, tmp_path: Path) -> None:
    for v in ("1", "2", "3"):
        agent.repository.import_dir(make_scale_model(tmp_path / f"v{v}", version=v, scale=(int(v),) * 4))
    agent.db.set_active("scale", "1")


@pytest.fixture
def three_versions(make_agent: Any, tmp_path: Path) -> Any:
    return make_agent(setup=lambda agent: store_versions(agent, tmp_path), seed_bundled=False)


def test_a_local_pin_is_refused_while_the_fleet_governs_and_fleet_deploys_still_apply(three_versions: Any) -> None:
    agent = three_versions
    lifecycle = agent.lifecycle
    agent.call(lifecycle.set_desired("mqtt", [ModelDeployment(model="scale", ref="store:scale:2")]))
    assert served(agent) == "2"
    with pytest.raises(AgentError, match="governed by mqtt"):
        agent.call(lifecycle.pin("scale", True, source="local"))
    with pytest.raises(AgentError, match="governed by mqtt"):
        agent.call(lifecycle.pin("scale", False, source="local"))
    assert agent.agent.db.get_model("scale").pinned is False
    # The fleet's next deploy is not blocked by anything local.
    agent.call(lifecycle.deploy("store:scale:3", source="mqtt"))
    assert served(agent) == "3"


def test_a_higher_source_overrides_a_lower_sources_pin(three_versions: Any) -> None:
    agent = three_versions
    lifecycle = agent.lifecycle
    agent.call(lifecycle.pin("scale", True, source="local"))  # nobody governs: local may pin
    assert agent.agent.db.get_model("scale").pinned is True
    with pytest.raises(AgentError, match="pinned at version 1"):
        agent.call(lifecycle.deploy("store:scale:2", source="local"))  # its own pin holds against itself
    agent.call(lifecycle.set_desired("mqtt", [ModelDeployment(model="scale", ref="store:scale:2")]))
    assert served(agent) == "2"  # the fleet's wish wins over the local pin
    assert agent.agent.db.get_model("scale").pinned is False  # the governing wish is not pinned
    agent.call(lifecycle.set_desired("mqtt", []))  # the fleet withdraws: the local pin governs again
    assert served(agent) == "1" and agent.agent.db.get_model("scale").pinned is True


def test_set_desired_pinned_is_applied_and_held_across_a_restart(make_agent: Any, tmp_path: Path) -> None:
    state = tmp_path / "state"
    agent = make_agent(setup=lambda a: store_versions(a, tmp_path), seed_bundled=False, state_dir=state)
    lifecycle = agent.lifecycle
    pinned = ModelDeployment(model="scale", ref="store:scale:2", pinned=True)
    agent.call(lifecycle.set_desired("mqtt", [pinned]))
    assert served(agent) == "2" and agent.agent.db.get_model("scale").pinned is True
    # The pin holds against the fleet's own later deploy until it is lifted ...
    with pytest.raises(AgentError, match="pinned at version 2"):
        agent.call(lifecycle.deploy("store:scale:3", source="mqtt"))
    assert served(agent) == "2"
    # ... and across a restart, where the reconciler runs again from the recorded state.
    agent.stop()
    again = make_agent(seed_bundled=False, state_dir=state)
    assert served(again) == "2" and again.agent.db.get_model("scale").pinned is True
    # Repeating the same pinned wish changes nothing; a new wish from the fleet is a change it makes.
    again.call(again.lifecycle.set_desired("mqtt", [pinned]))
    assert served(again) == "2"
    again.call(again.lifecycle.set_desired("mqtt", [ModelDeployment(model="scale", ref="store:scale:3")]))
    assert served(again) == "3" and again.agent.db.get_model("scale").pinned is False


def test_a_pin_from_an_older_database_is_kept_by_the_local_source(make_agent: Any, tmp_path: Path) -> None:
    """Before this change a pin was only the ``models.pinned`` flag; an upgraded node keeps it, once."""
    state = tmp_path / "state"
    first = make_agent(setup=lambda a: store_versions(a, tmp_path), seed_bundled=False, state_dir=state)
    first.stop()
    # What an older agent left: schema version 1, no held_version column, and the pin as a bare flag.
    with sqlite3.connect(state / "agent.db") as db:
        db.execute("ALTER TABLE desired DROP COLUMN held_version")
        db.execute("UPDATE meta SET value = '1' WHERE key = 'schema_version'")
        db.execute("UPDATE models SET pinned = 1 WHERE name = 'scale'")
    agent = make_agent(seed_bundled=False, state_dir=state)
    assert agent.agent.db.get_model("scale").pinned is True
    with pytest.raises(AgentError, match="pinned at version 1"):
        agent.call(agent.lifecycle.deploy("store:scale:2", source="local"))
    # It is the local source's pin now: the fleet's wish overrides it, and its withdrawal restores it.
    agent.call(agent.lifecycle.set_desired("mqtt", [ModelDeployment(model="scale", ref="store:scale:2")]))
    assert served(agent) == "2" and agent.agent.db.get_model("scale").pinned is False
    agent.call(agent.lifecycle.set_desired("mqtt", []))
    assert served(agent) == "1" and agent.agent.db.get_model("scale").pinned is True


def test_a_pin_withdrawn_with_its_deployment_leaves_no_flag_behind(make_agent: Any, tmp_path: Path) -> None:
    state = tmp_path / "state"
    agent = make_agent(setup=lambda a: store_versions(a, tmp_path), seed_bundled=False, state_dir=state)
    pinned = ModelDeployment(model="scale", ref="store:scale:2", pinned=True)
    agent.call(agent.lifecycle.set_desired("k8s", [pinned]))
    assert agent.agent.db.get_model("scale").pinned is True
    agent.call(agent.lifecycle.set_desired("k8s", []))
    assert agent.agent.db.get_model("scale").pinned is False  # nothing holds it: its blobs may be evicted
    agent.stop()
    again = make_agent(seed_bundled=False, state_dir=state)  # and no restart turns it into a pin
    again.call(again.lifecycle.deploy("store:scale:3", source="local"))
    assert served(again) == "3"


def test_a_split_cannot_be_pinned_by_verb_and_a_pinned_split_is_not_collapsed(three_versions: Any) -> None:
    agent = three_versions
    split = ModelDeployment(model="scale", ref="store:scale:1", traffic={"1": 50, "2": 50}, pinned=True)
    agent.call(agent.lifecycle.set_desired("mqtt", [split]))
    agent.call(agent.lifecycle.reconcile())
    assert {served(agent) for _ in range(60)} == {"1", "2"}
    with pytest.raises(AgentError, match="traffic split"):
        agent.call(agent.lifecycle.pin("scale", True, source="mqtt"))
    # A zero weight takes no traffic and holds nothing open.
    agent.call(
        agent.lifecycle.set_desired("mqtt", [ModelDeployment("scale", "store:scale:1", traffic={"1": 100, "3": 0})])
    )
    for _ in range(3):
        agent.call(agent.lifecycle.reconcile())
    assert {served(agent) for _ in range(20)} == {"1"}
    assert ("scale", "3") not in agent.agent.models.loaded


@needs_mosquitto
def test_set_desired_pinned_over_mqtt_is_applied(make_agent: Any, tmp_path: Path) -> None:
    key, pub = fleet_keypair(tmp_path / "fleet")
    with running_broker(tmp_path / "broker") as broker:

        def setup(agent: Any) -> None:
            store_versions(agent, tmp_path)
            agent.config.sections["mqtt"] = {"host": "127.0.0.1", "port": broker.port, "fleet_keys": [str(pub)]}
            agent.config.sections["telemetry"] = {"interval_s": 3600, "gpu": False}
            attach_lifecycle(agent, rollback_grace_s=ROLLBACK_GRACE_S)
            attach_mqtt(agent)

        recorder = Recorder(broker, ["edge/nodes/+/state"])
        agent = make_agent(setup=setup, seed_bundled=False, node_id="n1")
        commander = Commander(broker, key)
        try:
            # The retained state goes out once the node's subscriptions are in place.
            wait_until(lambda: any(m.doc.get("online") for m in recorder.on("/state")), 30, "the node online")
            deployments = [{"model": "scale", "ref": "store:scale:2", "pinned": True}]
            reply = commander.call("n1", "set-desired", {"deployments": deployments})
            assert reply["ok"], reply
            assert served(agent) == "2" and agent.agent.db.get_model("scale").pinned is True
            refused = commander.call("n1", "deploy", {"ref": "store:scale:3"})
            assert not refused["ok"] and "pinned at version 2" in refused["error"]["message"], refused
            # A local pin cannot be placed under the fleet's governance either.
            with pytest.raises(AgentError, match="governed by mqtt"):
                agent.call(agent.lifecycle.pin("scale", False, source="local"))
            assert served(agent) == "2"
        finally:
            commander.close()
            recorder.close()
            agent.stop()

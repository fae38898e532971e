"""Hot swap, rollback, pin, traffic split and the local repository API on a running agent."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from conftest import http
from modelkit import make_scale_model

from agent.control import ModelDeployment
from agent.errors import AgentError


def x_request(v: float = 1.0) -> dict:
    return {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [v, v, v, v]}]}


@pytest.fixture
def two_versions(make_agent, tmp_path: Path):
    """An agent serving scale:1 (y = x) with scale:2 (y = 2x) stored beside it."""

    def setup(agent):
        agent.repository.import_dir(make_scale_model(tmp_path / "v1", version="1", scale=(1, 1, 1, 1)))
        agent.repository.import_dir(make_scale_model(tmp_path / "v2", version="2", scale=(2, 2, 2, 2)))
        agent.db.set_active("scale", "1")

    return make_agent(setup=setup, seed_bundled=False, worker_threads=8)


def served_version(agent) -> str:
    status, body = http("POST", agent.url + "/v2/models/scale/infer", x_request())
    assert status == 200, body
    return body["model_version"]


def test_fifty_swaps_under_load_drop_and_mix_nothing(two_versions):
    agent = two_versions
    stop = threading.Event()
    results: list[tuple[float, float, str, float]] = []  # (sent, answered, version, y)
    failures: list[object] = []
    lock = threading.Lock()

    def client() -> None:
        import http.client

        conn = http.client.HTTPConnection(*agent.url[7:].split(":"), timeout=10)
        body = __import__("json").dumps(x_request()).encode()
        while not stop.is_set():
            sent = time.monotonic()
            try:
                conn.request("POST", "/v2/models/scale/infer", body, {"Content-Type": "application/json"})
                resp = conn.getresponse()
                payload = __import__("json").loads(resp.read())
            except Exception as exc:  # noqa: BLE001 - every failure is recorded and fails the test
                failures.append(repr(exc))
                conn.close()
                conn = http.client.HTTPConnection(*agent.url[7:].split(":"), timeout=10)
                continue
            answered = time.monotonic()
            if resp.status != 200:
                failures.append((resp.status, payload))
                continue
            with lock:
                results.append((sent, answered, payload["model_version"], payload["outputs"][0]["data"][0]))

    threads = [threading.Thread(target=client) for _ in range(8)]
    for t in threads:
        t.start()
    switches: list[tuple[float, float, str]] = []  # (deploy called, deploy returned, version)
    try:
        time.sleep(0.2)
        for i in range(50):
            version = "2" if i % 2 == 0 else "1"
            called = time.monotonic()
            agent.call(agent.lifecycle.deploy(f"store:scale:{version}"))
            switches.append((called, time.monotonic(), version))
            time.sleep(0.02)
        time.sleep(0.1)
    finally:
        stop.set()
        for t in threads:
            t.join(10)

    assert not failures, failures[:5]
    assert len(results) > 200
    # Every response is wholly one version: v1 answers 1.0, v2 answers 2.0.
    for _, _, version, y in results:
        assert y == float(version), (version, y)
    # Once a switch has completed, a request sent afterwards (and answered before the
    # next switch began) never reaches the old version.
    for index, (_, switched_at, version) in enumerate(switches):
        until = switches[index + 1][0] if index + 1 < len(switches) else float("inf")
        stale = [r for r in results if switched_at < r[0] and r[1] < until and r[2] != version]
        assert not stale, f"switch {index} to {version}: {stale[:3]}"
    swap_events = [e for e in agent.agent.events.recent("model.swapped")]
    assert len(swap_events) == 50


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [
        ({"golden_override": [9, 9, 9, 9]}, "does not match the golden output"),
        ({"warmup_x": (13, 0, 0, 0), "golden": False}, "unreachable"),
        ({"warmup_x": (99, 0, 0, 0), "golden": False, "memory_limit_mb": 2}, "out of memory"),
        ({"wasm": b"\0asm\x01\0\0\0broken"}, "not valid WebAssembly"),
    ],
)
def test_a_version_that_fails_before_the_switch_never_takes_traffic(make_agent, tmp_path, kwargs, reason):
    def setup(agent):
        agent.repository.import_dir(make_scale_model(tmp_path / "v1", version="1"))
        agent.repository.import_dir(make_scale_model(tmp_path / "bad", version="bad", **kwargs))
        agent.db.set_active("scale", "1")

    agent = make_agent(setup=setup, seed_bundled=False)
    with pytest.raises(AgentError, match=reason):
        agent.call(agent.lifecycle.deploy("store:scale:bad"))
    assert served_version(agent) == "1"
    assert agent.agent.db.get_model("scale").active_version == "1"
    failed = agent.agent.events.recent("model.swap_failed")
    assert failed and failed[-1].fields["version"] == "bad" and reason in failed[-1].fields["error"]
    # Over HTTP the refusal is an error reply, and the model still serves.
    status, body = http("POST", agent.url + "/v2/repository/models/scale/load", {"parameters": {"version": "bad"}})
    assert status in (400, 500) and reason in body["error"]
    assert served_version(agent) == "1"


def test_rollback_is_instant_within_the_grace_period_and_pin_holds(two_versions):
    agent = two_versions
    agent.call(agent.lifecycle.deploy("store:scale:2"))
    assert served_version(agent) == "2"
    result = agent.call(agent.lifecycle.rollback("scale"))
    assert result["version"] == "1" and served_version(agent) == "1"
    assert [e.fields["version"] for e in agent.agent.events.recent("model.rollback")] == ["1"]

    agent.call(agent.lifecycle.pin("scale", True))
    with pytest.raises(AgentError, match="pinned at version 1"):
        agent.call(agent.lifecycle.deploy("store:scale:2"))
    assert served_version(agent) == "1"
    agent.call(agent.lifecycle.pin("scale", False))
    agent.call(agent.lifecycle.deploy("store:scale:2"))
    assert served_version(agent) == "2"


def test_traffic_split_and_version_addressed_requests(two_versions):
    agent = two_versions
    split = ModelDeployment(model="scale", ref="store:scale:1", traffic={"1": 50, "2": 50})
    agent.call(agent.lifecycle.set_desired("local", [split]))
    seen = {"1": 0, "2": 0}
    for _ in range(300):
        seen[served_version(agent)] += 1
    assert seen["1"] > 60 and seen["2"] > 60, seen
    for version in ("1", "2"):
        status, body = http("POST", agent.url + f"/v2/models/scale/versions/{version}/infer", x_request())
        assert status == 200 and body["model_version"] == version
    status, meta = http("GET", agent.url + "/v2/models/scale")
    assert meta["versions"] == ["1", "2"]


def test_repository_api_index_load_unload(two_versions):
    agent = two_versions
    status, index = http("POST", agent.url + "/v2/repository/index", {})
    assert status == 200
    assert {(r["version"], r["state"]) for r in index} == {("1", "READY"), ("2", "UNAVAILABLE")}
    status, _ = http("POST", agent.url + "/v2/repository/models/scale/load", {"parameters": {"version": "2"}})
    assert status == 200 and served_version(agent) == "2"
    assert http("POST", agent.url + "/v2/repository/models/nope/load", {})[0] == 404
    assert http("POST", agent.url + "/v2/repository/models/scale/unload", {})[0] == 200
    assert http("POST", agent.url + "/v2/models/scale/infer", x_request())[0] == 404
    assert agent.agent.db.get_model("scale").active_version is None


def test_repository_api_requires_the_token_when_one_is_set(make_agent, tmp_path):
    def setup(agent):
        agent.repository.import_dir(make_scale_model(tmp_path / "v1"))
        agent.db.set_active("scale", "1")

    agent = make_agent(setup=setup, seed_bundled=False, api_token="s3cret")
    assert http("POST", agent.url + "/v2/repository/index", {})[0] == 401
    headers = {"Authorization": "Bearer wrong"}
    assert http("POST", agent.url + "/v2/repository/index", {}, headers=headers)[0] == 401
    headers = {"Authorization": "Bearer s3cret"}
    assert http("POST", agent.url + "/v2/repository/index", {}, headers=headers)[0] == 200
    # Inference stays open: the token guards control, not serving.
    assert http("POST", agent.url + "/v2/models/scale/infer", x_request())[0] == 200


def test_desired_state_precedence(two_versions):
    agent = two_versions
    lifecycle = agent.lifecycle
    agent.call(lifecycle.set_desired("mqtt", [ModelDeployment(model="scale", ref="store:scale:2")]))
    assert served_version(agent) == "2"
    with pytest.raises(AgentError, match="governed by mqtt"):
        agent.call(lifecycle.deploy("store:scale:1", source="local"))
    agent.call(lifecycle.set_desired("k8s", [ModelDeployment(model="scale", ref="store:scale:1")]))
    assert served_version(agent) == "1"
    # Kubernetes withdraws: MQTT's wish governs again.
    agent.call(lifecycle.set_desired("k8s", []))
    assert served_version(agent) == "2"

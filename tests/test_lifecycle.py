"""Hot swap, rollback, pin, traffic split and the local repository API on a running agent."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
from conftest import control_headers, http
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

        conn = http.client.HTTPConnection(*agent.url[7:].split(":"), timeout=60)
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
                conn = http.client.HTTPConnection(*agent.url[7:].split(":"), timeout=60)
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

    def wait_for_answers(n: int) -> None:
        """Swaps happen under traffic by construction, however slow the machine is."""
        deadline = time.monotonic() + 60  # hang guard only
        while len(results) < n and not failures and time.monotonic() < deadline:
            time.sleep(0.002)

    try:
        for i in range(50):
            wait_for_answers(len(results) + 5)
            version = "2" if i % 2 == 0 else "1"
            called = time.monotonic()
            agent.call(agent.lifecycle.deploy(f"store:scale:{version}"))
            switches.append((called, time.monotonic(), version))
        wait_for_answers(len(results) + 5)
    finally:
        stop.set()
        for t in threads:
            t.join(10)

    assert not failures, failures[:5]
    assert len(results) >= 255  # at least 5 answers before each swap and after the last
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
    headers = control_headers(agent.agent.config.state_dir)
    status, body = http(
        "POST", agent.url + "/v2/repository/models/scale/load", {"parameters": {"version": "bad"}}, headers=headers
    )
    assert status in (400, 500) and reason in body["error"]
    assert served_version(agent) == "1"


def test_rollback_is_instant_within_the_grace_period_and_pin_holds(two_versions):
    agent = two_versions
    agent.lifecycle.rollback_grace_s = 300.0
    v1 = _route_of(agent).primary
    agent.call(agent.lifecycle.deploy("store:scale:2"))
    assert served_version(agent) == "2"
    loads_before = len(agent.agent.events.recent("model.loading"))
    result = agent.call(agent.lifecycle.rollback("scale"))
    assert result["version"] == "1" and served_version(agent) == "1"
    assert [e.fields["version"] for e in agent.agent.events.recent("model.rollback")] == ["1"]
    # Instant: the very version object kept warm is routed again, nothing is reloaded.
    assert _route_of(agent).primary is v1
    assert len(agent.agent.events.recent("model.loading")) == loads_before

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
    headers = control_headers(agent.agent.config.state_dir)
    status, index = http("POST", agent.url + "/v2/repository/index", {}, headers=headers)
    assert status == 200
    assert {(r["version"], r["state"]) for r in index} == {("1", "READY"), ("2", "UNAVAILABLE")}
    load = agent.url + "/v2/repository/models/scale/load"
    status, _ = http("POST", load, {"parameters": {"version": "2"}}, headers=headers)
    assert status == 200 and served_version(agent) == "2"
    assert http("POST", agent.url + "/v2/repository/models/nope/load", {}, headers=headers)[0] == 404
    assert http("POST", agent.url + "/v2/repository/models/scale/unload", {}, headers=headers)[0] == 200
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
    headers = {"Authorization": "Bearer s3cret", "Content-Type": "application/json"}
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


def _route_of(agent, model: str = "scale"):
    return agent.agent.models.routes[model]


def test_a_retained_version_reused_by_a_swap_is_never_released_under_it(two_versions):
    """The interleaving behind the 503 bursts: release of a retired version vs its reuse.

    v1 has a request in flight. Swap to 2 retains v1; swap back to 1 reuses it and
    retires 2, superseding v1's retention while v1 still drains; swap to 2 again
    retains v1 once more. When v1's request then finishes, the drain that was
    started for the superseded retention must not close v1: it is retained (and
    soon serving) again. Deterministic: the in-flight request is the drain's own
    counter, held and dropped by the test on the agent's event loop.
    """
    agent = two_versions
    agent.lifecycle.rollback_grace_s = 300.0  # no timer fires during the test
    v1 = _route_of(agent).primary

    async def hold(delta: int) -> None:
        v1.inflight += delta

    agent.call(agent.lifecycle.deploy("store:scale:2"))
    agent.call(hold(+1))  # a long request on v1 is still running
    agent.call(agent.lifecycle.deploy("store:scale:1"))
    assert _route_of(agent).primary is v1
    agent.call(agent.lifecycle.deploy("store:scale:2"))
    agent.call(hold(-1))  # ... and now it finishes: the pending drain completes
    time.sleep(0.2)  # let any background release run (it is what must not close v1)
    # v1 is retained for rollback: still loaded, answering version-addressed requests.
    status, body = http("POST", agent.url + "/v2/models/scale/versions/1/infer", x_request())
    assert status == 200 and body["model_version"] == "1", body
    agent.call(agent.lifecycle.deploy("store:scale:1"))
    assert _route_of(agent).primary is v1
    for _ in range(20):
        assert served_version(agent) == "1"


def test_retirement_and_reuse_are_serialized_at_grace_zero(two_versions):
    """With no grace, a retired version is released as soon as it drains; a swap back loads it afresh."""
    agent = two_versions
    agent.lifecycle.rollback_grace_s = 0.0
    for i in range(30):
        version = "2" if i % 2 == 0 else "1"
        agent.call(agent.lifecycle.deploy(f"store:scale:{version}"))
        assert served_version(agent) == version
    # Nothing leaks: once the releases ran, only the serving version is loaded.
    deadline = time.monotonic() + 60  # hang guard only
    while len(agent.agent.models.loaded) > 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert list(agent.agent.models.loaded) == [("scale", "1")]


def test_rollback_after_the_grace_period_loads_the_version_again(two_versions):
    """The grace period is what keeps the old version warm: past it, the version is gone."""
    agent = two_versions
    agent.lifecycle.rollback_grace_s = 0.3
    v1 = _route_of(agent).primary
    agent.call(agent.lifecycle.deploy("store:scale:2"))
    # Within the grace period it is still loaded (version-addressed requests reach it) ...
    assert http("POST", agent.url + "/v2/models/scale/versions/1/infer", x_request())[0] == 200
    deadline = time.monotonic() + 60  # hang guard only
    while ("scale", "1") in agent.agent.models.loaded and time.monotonic() < deadline:
        time.sleep(0.02)
    # ... and after it, released: a rollback now has to load it afresh.
    assert ("scale", "1") not in agent.agent.models.loaded
    agent.call(agent.lifecycle.rollback("scale"))
    assert served_version(agent) == "1" and _route_of(agent).primary is not v1


def test_a_swapped_out_version_drains_before_it_is_released(make_agent, tmp_path: Path):
    """Requests already routed to the old version (one running, one waiting for an instance)
    finish on it, even with no rollback grace: its instances go only once they are done."""

    def setup(agent):
        agent.repository.import_dir(make_scale_model(tmp_path / "v1", version="1", timeout_ms=3000))
        agent.repository.import_dir(make_scale_model(tmp_path / "v2", version="2", scale=(2, 2, 2, 2)))
        agent.db.set_active("scale", "1")

    # One instance, never inline: the second request must wait for the first one's instance.
    agent = make_agent(setup=setup, seed_bundled=False, pool_size=1, inline_threshold_us=0, worker_threads=4)
    agent.lifecycle.rollback_grace_s = 0.0
    v1 = _route_of(agent).primary
    replies: dict[str, tuple[int, object]] = {}

    def send(key: str, x: float) -> None:
        replies[key] = http("POST", agent.url + "/v2/models/scale/infer", x_request(x), timeout=60)

    def wait_for(condition, what: str) -> None:
        deadline = time.monotonic() + 60  # hang guard only
        while not condition():
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(0.005)

    # -1 spins until the model's 3 s deadline: in flight for that long, then a full 504.
    running = threading.Thread(target=send, args=("running", -1.0))
    running.start()
    wait_for(lambda: v1.pool.idle == 0 and v1.inflight == 1, "the spinning request to take the instance")
    waiting = threading.Thread(target=send, args=("waiting", 1.0))
    waiting.start()
    wait_for(lambda: v1.inflight == 2, "the second request to wait for an instance")
    agent.call(agent.lifecycle.deploy("store:scale:2"))
    assert served_version(agent) == "2"
    running.join(60)
    waiting.join(60)
    assert replies["running"][0] == 504, replies["running"]
    status, body = replies["waiting"]
    assert status == 200 and body["model_version"] == "1" and body["outputs"][0]["data"][0] == 1.0, replies
    wait_for(lambda: ("scale", "1") not in agent.agent.models.loaded, "the drained version to be released")


def test_the_version_kept_warm_for_rollback_is_reported_ready(two_versions):
    """It answers requests, so it is READY (as Triton reports every loaded version), not "not loaded"."""
    agent = two_versions
    agent.lifecycle.rollback_grace_s = 300.0
    agent.call(agent.lifecycle.deploy("store:scale:2"))
    headers = control_headers(agent.agent.config.state_dir)
    status, index = http("POST", agent.url + "/v2/repository/index", {}, headers=headers)
    assert status == 200
    assert {(r["version"], r["state"]) for r in index} == {("1", "READY"), ("2", "READY")}, index
    assert http("POST", agent.url + "/v2/models/scale/versions/1/infer", x_request())[0] == 200
    (model,) = agent.call(agent.lifecycle.status())["models"]
    assert model["serving"] == ["2"] and model["loaded"] == ["1", "2"]


def test_a_request_counts_as_in_flight_from_the_moment_it_picked_its_version(make_agent, tmp_path: Path):
    """Not from when its task first runs: a drain scheduled in between must see it."""
    from agent.server.http import Request

    def setup(agent):
        agent.repository.import_dir(make_scale_model(tmp_path / "v1", version="1"))
        agent.db.set_active("scale", "1")

    agent = make_agent(setup=setup, seed_bundled=False, inline_threshold_us=0)
    v1 = _route_of(agent).primary
    body = json.dumps(x_request()).encode()

    async def pick_then_run() -> tuple[int, int, int]:
        request = Request("POST", "/v2/models/scale/infer", "", {"content-type": "application/json"}, body)
        pending = agent.agent.api(request)  # the version is picked; the work has not started
        counted = v1.inflight
        response = await pending
        return counted, response.status, v1.inflight

    assert agent.call(pick_then_run()) == (1, 200, 0)

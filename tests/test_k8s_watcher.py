"""The Kubernetes watcher, with the real ``kubernetes`` client, against a local fake API server.

The reconciler's side is a recording :class:`Control` that behaves like the
real one at its interface: it remembers what each source asked for, "swaps"
to the version a reference names, reports failures it was told to fail, and
publishes the same bus events.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import pytest
import structlog
from k8s_fake import FakeKube

from agent.control import ModelDeployment
from agent.events import EventBus
from agent.k8s import KubeSettings, KubeWatcher

EDGE = {"node-role.kubernetes.io/edge": "true", "topology.kubernetes.io/zone": "a"}


class RecordingControl:
    def __init__(self, bus: EventBus):
        self.bus = bus
        self.calls: list[tuple[str, list[ModelDeployment]]] = []
        self.desired: dict[str, dict[str, ModelDeployment]] = {}
        self.models: dict[str, dict[str, Any]] = {}
        self.failing: dict[str, str] = {}  # ref -> error
        self.unpullable: dict[str, str] = {}  # ref -> error: the reconciler's pull fails, before any swap
        self.pins: list[tuple[str, bool, str]] = []
        self.held: set[str] = set()  # models the reconciler reports as held by a pin

    async def set_desired(self, source: str, deployments: list[ModelDeployment]) -> dict[str, Any]:
        self.calls.append((source, list(deployments)))
        self.desired[source] = {d.model: d for d in deployments}
        results: dict[str, Any] = {}
        for dep in deployments:
            if dep.ref in self.unpullable:
                results[dep.model] = {"error": self.unpullable[dep.ref]}  # as the reconciler: no swap, no event
                continue
            if dep.ref in self.failing:
                error = self.failing[dep.ref]
                self.bus.publish("model.swap_failed", model=dep.model, version=version_of(dep.ref), error=error)
                results[dep.model] = {"error": error}
                continue
            version = version_of(dep.ref)
            current = self.models.get(dep.model)
            if current is not None and dep.model in self.held and current["active_version"] != version:
                results[dep.model] = {"skipped": f"pinned at {current['active_version']}"}  # as the reconciler
                continue
            if current is not None:
                current["pinned"] = dep.pinned  # as the reconciler: the governing wish's pin
            if current is None or current["active_version"] != version:
                previous = current["active_version"] if current else None
                self.models[dep.model] = {
                    "name": dep.model,
                    "active_version": version,
                    "serving": [version],
                    "status": "ok",
                    "error": None,
                    "pinned": dep.pinned,
                }
                self.bus.publish("model.swapped", model=dep.model, version=version, previous=previous, source=source)
                results[dep.model] = {"model": dep.model, "version": version, "previous": previous}
        return results

    async def pin(self, model: str, pinned: bool = True, *, source: str = "local") -> dict[str, Any]:
        self.pins.append((model, pinned, source))
        self.models[model]["pinned"] = pinned
        return {"model": model, "pinned": pinned}

    async def status(self) -> dict[str, Any]:
        desired = {}
        for source in ("local", "mqtt", "k8s"):  # lowest first, so the highest wins
            for model, dep in self.desired.get(source, {}).items():
                desired[model] = {"source": source, **dep.to_dict()}
        return {"node": "edge-1", "models": list(self.models.values()), "desired": desired}

    def last(self) -> dict[str, str]:
        assert self.calls, "set_desired was never called"
        source, deployments = self.calls[-1]
        assert source == "k8s"
        return {d.model: d.ref for d in deployments}


def version_of(ref: str) -> str:
    if ref.startswith("store:"):
        return ref.rsplit(":", 1)[-1]
    if "@sha256:" in ref:
        return ref.split("@sha256:")[1][:12]
    return ref.rsplit(":", 1)[-1]


def emd_spec(model: str, tag: str = "1.0", selector: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {"model": model, "image": f"registry.local/models/{model}:{tag}", **extra}
    if selector is not None:
        spec["nodeSelector"] = selector
    return spec


async def wait_until(check: Callable[[], Any], timeout: float = 60.0, what: str = "condition") -> Any:
    """Poll until ``check()`` is truthy; the timeout is a hang guard for a loaded machine, not a speed check."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(AssertionError, KeyError, TypeError):
            result = check()
            if result:
                return result
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


async def until_quiet(sample: Callable[[], Any], what: str, quiet_s: float = 1.0, timeout: float = 60.0) -> Any:
    """Wait until ``sample()`` has stayed the same for ``quiet_s``; activity that feeds itself never gets there.

    How long things take to fall quiet depends on the machine; that they do, does not.
    """
    deadline = time.monotonic() + timeout
    last, since = sample(), time.monotonic()
    while time.monotonic() < deadline:
        await asyncio.sleep(0.05)
        value = sample()
        if value != last:
            last, since = value, time.monotonic()
        elif time.monotonic() - since >= quiet_s:
            return value
    raise AssertionError(f"timed out waiting for {what} (still changing: {last!r})")


FAST = {
    "watch_timeout_s": 30,
    "read_timeout_s": 2.0,
    "connect_timeout_s": 1.0,
    "backoff_initial_s": 0.05,
    "backoff_max_s": 0.4,
    "node_refresh_s": 0.2,
    "page_size": 2,
}


@pytest.fixture
def fake() -> Any:
    server = FakeKube("edge-1", EDGE).start()
    yield server
    server.stop()


@dataclass
class Watching:
    watcher: KubeWatcher
    control: RecordingControl
    bus: EventBus


@contextlib.asynccontextmanager
async def watching(
    fake: FakeKube,
    control: RecordingControl | None = None,
    bus: EventBus | None = None,
    **overrides: Any,
) -> AsyncIterator[Watching]:
    bus = bus or EventBus()
    control = control or RecordingControl(bus)
    table = {"enabled": True, "mode": "url", "url": fake.url, "node_name": "edge-1", **FAST, **overrides}
    watcher = KubeWatcher(
        settings=KubeSettings.from_table(table), control=control, events=bus, log=structlog.get_logger("test")
    )
    await watcher.start()
    try:
        yield Watching(watcher=watcher, control=control, bus=bus)
    finally:
        await watcher.stop()


def run(coro: Any) -> Any:
    return asyncio.run(coro)


# -- list, select, report -------------------------------------------------------------------


def test_list_pages_selects_this_nodes_resources_and_reports_status(fake: FakeKube) -> None:
    fake.create("by-label", emd_spec("alpha", selector={"matchLabels": {"node-role.kubernetes.io/edge": "true"}}))
    fake.create(
        "by-zone",
        emd_spec(
            "beta",
            selector={
                "matchExpressions": [{"key": "topology.kubernetes.io/zone", "operator": "In", "values": ["a", "b"]}]
            },
        ),
    )
    fake.create(
        "other-zone",
        emd_spec(
            "gamma",
            selector={
                "matchExpressions": [{"key": "topology.kubernetes.io/zone", "operator": "NotIn", "values": ["a"]}]
            },
        ),
    )
    fake.create("everywhere", emd_spec("delta", tag="2.1"))
    fake.create("gpu-only", emd_spec("epsilon", selector={"matchLabels": {"gpu": "true"}}))

    async def scenario() -> None:
        async with watching(fake) as h:
            await wait_until(lambda: h.control.calls, what="set_desired")
            assert h.control.last() == {
                "alpha": "registry.local/models/alpha:1.0",
                "beta": "registry.local/models/beta:1.0",
                "delta": "registry.local/models/delta:2.1",
            }
            await wait_until(lambda: fake.node_status("everywhere"), what="status of 'everywhere'")
            await wait_until(lambda: all(fake.node_status(n) for n in ("by-label", "by-zone")), what="statuses")
            entry = fake.node_status("everywhere")
            assert entry["version"] == "2.1"
            assert entry["lastError"] == ""
            assert entry["observedGeneration"] == 1
            assert entry["updated"].endswith("Z")
            assert fake.node_status("other-zone") is None and fake.node_status("gpu-only") is None
            assert len(h.control.calls) == 1

    run(scenario())
    lists = fake.seen("GET", "edgemodeldeployments", watch=False)
    assert [r.query.get("limit") for r in lists] == ["2", "2", "2"], "five resources in pages of two"
    assert "continue" not in lists[0].query and all("continue" in r.query for r in lists[1:])
    watch = fake.seen("GET", "edgemodeldeployments", watch=True)[0]
    assert watch.query["allowWatchBookmarks"] in ("true", "True")
    assert int(watch.query["timeoutSeconds"]) >= 30
    assert int(watch.query["resourceVersion"]) >= 1005
    assert fake.seen("GET", "/api/v1/nodes/edge-1")


def test_watch_events_feed_the_full_set_and_status_does_not_loop(fake: FakeKube) -> None:
    fake.create("alpha", emd_spec("alpha"))

    async def scenario() -> None:
        async with watching(fake) as h:
            await wait_until(lambda: h.control.calls and h.control.last() == {"alpha": emd_spec("alpha")["image"]})
            fake.create("beta", emd_spec("beta", tag="3"))
            await wait_until(lambda: set(h.control.last()) == {"alpha", "beta"}, what="ADDED")
            fake.update_spec("alpha", emd_spec("alpha", tag="1.1"))
            await wait_until(lambda: h.control.last()["alpha"].endswith(":1.1"), what="MODIFIED")
            await wait_until(lambda: (fake.node_status("alpha") or {}).get("observedGeneration") == 2)
            assert fake.node_status("alpha")["version"] == "1.1"
            fake.delete("beta")
            await wait_until(lambda: set(h.control.last()) == {"alpha"}, what="DELETED")
            # Every call carried the whole set, never a delta.
            assert [sorted(d.model for d in deps) for _, deps in h.control.calls] == [
                ["alpha"],
                ["alpha", "beta"],
                ["alpha", "beta"],
                ["alpha"],
            ]
            # Our own status patches come back as MODIFIED events; they must not cause more patches or
            # more set_desired calls. A loop never falls quiet: wait for a quiet second (however long the
            # last patches take to come back on a loaded machine), which a feedback loop never gives.
            await until_quiet(lambda: (len(fake.seen("PATCH")), len(h.control.calls)), what="patches to stop")

    run(scenario())


def test_bookmarks_move_the_resource_version_the_next_watch_starts_from(fake: FakeKube) -> None:
    fake.bookmark_every = 0.1
    fake.create("alpha", emd_spec("alpha"))

    async def scenario() -> None:
        async with watching(fake, namespace="default", watch_timeout_s=1) as h:
            await wait_until(lambda: fake.node_status("alpha"), what="status patched")
            await until_quiet(lambda: len(fake.seen("PATCH")), what="the status patches to stop")
            with fake.cond:
                last_seen = int(fake.objects[("default", "alpha")]["metadata"]["resourceVersion"])
            # The patch comes back to the watch as MODIFIED: from then on only a bookmark can move it further.
            await wait_until(
                lambda: int(h.watcher.resource_version or 0) >= last_seen, what="the watch to see the patch"
            )
            # Changes elsewhere move the cluster's resourceVersion; this watch
            # sees none of them, only bookmarks carrying the new version.
            for i in range(3):
                fake.create(f"x{i}", emd_spec(f"x{i}"), namespace="elsewhere")

            def resumed_past_bookmark() -> bool:
                watches = fake.seen("GET", "namespaces/default/edgemodeldeployments", watch=True)
                return any(int(r.query["resourceVersion"]) > last_seen for r in watches)

            await wait_until(resumed_past_bookmark, what="a watch resuming from a bookmark")
            assert len(fake.seen("GET", "edgemodeldeployments", watch=False)) == 1, "no relist needed"
            assert h.control.last() == {"alpha": emd_spec("alpha")["image"]}

    run(scenario())


# -- failures -------------------------------------------------------------------------------


@pytest.mark.parametrize("gone_as_status", [False, True], ids=["410-error-event", "410-http-status"])
def test_gone_relists_and_catches_up_on_what_the_watch_missed(fake: FakeKube, gone_as_status: bool) -> None:
    fake.gone_as_status = gone_as_status
    fake.create("alpha", emd_spec("alpha"))
    fake.create("beta", emd_spec("beta"))

    async def scenario() -> None:
        async with watching(fake) as h:
            await wait_until(lambda: h.control.calls and set(h.control.last()) == {"alpha", "beta"})
            fake.stop()
            await wait_until(lambda: not h.watcher.connected, what="disconnection noticed")
            # While the node is cut off: a deletion and an addition it never
            # sees as events, then the server forgets that history.
            fake.delete("beta")
            fake.create("gamma", emd_spec("gamma"))
            fake.compact()
            lists_before = len(fake.seen("GET", "edgemodeldeployments", watch=False))
            fake.start()
            await wait_until(lambda: set(h.control.last()) == {"alpha", "gamma"}, what="catch-up after 410")
            assert len(fake.seen("GET", "edgemodeldeployments", watch=False)) > lists_before, "relisted"
            assert all(deps for _, deps in h.control.calls), "never an empty desired set"
            await wait_until(lambda: h.watcher.connected)

    run(scenario())


def test_server_errors_back_off_and_nothing_is_sent_until_a_list_succeeds(fake: FakeKube) -> None:
    fake.create("alpha", emd_spec("alpha"))
    fake.fail("GET", "edgemodeldeployments", 500, count=4, watch=False)

    async def scenario() -> None:
        # Waits long enough that a request's own time (longer on a loaded machine) cannot pass for backoff.
        async with watching(fake, backoff_initial_s=0.2, backoff_max_s=2.0) as h:
            await wait_until(lambda: len(fake.seen("GET", "edgemodeldeployments", watch=False)) >= 3)
            assert h.control.calls == []
            assert h.watcher.state()["connected"] is False and "500" in h.watcher.state()["last_error"]
            await wait_until(lambda: h.control.calls, what="set_desired after the errors")
            assert h.control.last() == {"alpha": emd_spec("alpha")["image"]}
            # A watch that fails (500) is retried from its resourceVersion, not relisted.
            fake.fail("GET", "edgemodeldeployments", 500, count=2, watch=True)
            fake.stop()
            fake.start()  # cut the live watch so the next ones hit the faults
            await wait_until(lambda: not [f for f in fake.faults if f.count], what="faults consumed")
            fake.create("beta", emd_spec("beta"))
            await wait_until(lambda: set(h.control.last()) == {"alpha", "beta"})
            assert len(fake.seen("GET", "edgemodeldeployments", watch=False)) == 5, "one good list, no relist"

    run(scenario())
    lists = [r.at for r in fake.seen("GET", "edgemodeldeployments", watch=False)]
    gaps = [b - a for a, b in itertools.pairwise(lists)][:4]
    # Exponential backoff with "equal jitter": the wait after failure n is at least half its ceiling,
    # min(max, initial * 2**n) / 2, so the floors double: 0.1, 0.2, 0.4, 0.8 s. Lower bounds only: a
    # loaded machine makes gaps longer, never shorter; a backoff that did not grow breaks the later ones.
    floors = [min(2.0, 0.2 * 2**n) / 2 for n in range(4)]
    assert all(g >= floor for g, floor in zip(gaps, floors, strict=True)), (gaps, floors)


def test_a_hung_watch_times_out_and_reconnects(fake: FakeKube) -> None:
    fake.create("alpha", emd_spec("alpha"))
    fake.hang_watches = True

    async def scenario() -> None:
        async with watching(fake, read_timeout_s=0.5) as h:
            await wait_until(lambda: h.control.calls)
            await wait_until(
                lambda: len(fake.seen("GET", "edgemodeldeployments", watch=True)) >= 2,
                what="a new watch after the read timeout",
            )
            with fake.cond:
                fake.hang_watches = False
                fake.cond.notify_all()
            fake.create("beta", emd_spec("beta"))
            await wait_until(lambda: set(h.control.last()) == {"alpha", "beta"}, what="events after the hang")

    run(scenario())


def test_node_autonomy_api_down_keeps_the_last_state_and_catches_up(fake: FakeKube) -> None:
    fake.create("alpha", emd_spec("alpha"))
    fake.create("beta", emd_spec("beta"))

    async def scenario() -> None:
        bus = EventBus()
        control = RecordingControl(bus)
        async with watching(fake, control=control, bus=bus) as h:
            await wait_until(lambda: control.calls and set(control.last()) == {"alpha", "beta"})
            calls = len(control.calls)
            fake.stop()
            await wait_until(lambda: not h.watcher.connected, what="the disconnection noticed")
            await asyncio.sleep(1.0)  # a window for several failed reconnects, which must change nothing
            assert not h.watcher.connected
            assert len(control.calls) == calls, "no set_desired while the API server is away"
            assert set(control.desired["k8s"]) == {"alpha", "beta"}, "the last desired state stands"
            fake.update_spec("alpha", emd_spec("alpha", tag="2.0"))
            fake.start()
            await wait_until(lambda: control.last()["alpha"].endswith(":2.0"), what="catch-up")
            await wait_until(lambda: (fake.node_status("alpha") or {}).get("version") == "2.0", what="status")

        # The agent restarts while the API server is away: the new watcher must
        # not tell the reconciler anything, least of all "nothing".
        fake.stop()
        calls = len(control.calls)
        async with watching(fake, control=control, bus=bus) as h:
            await wait_until(lambda: h.watcher.last_error, what="a failed connection attempt")
            await asyncio.sleep(1.0)  # a window for more failed attempts, which must tell the reconciler nothing
            assert not h.watcher.connected and h.watcher.lists == 0
            assert len(control.calls) == calls
            fake.start()
            await wait_until(lambda: h.watcher.lists == 1 and h.watcher.connected)
            await wait_until(lambda: len(control.calls) == calls + 1)
            assert set(control.last()) == {"alpha", "beta"}

    run(scenario())


def test_stop_is_prompt_even_while_a_watch_hangs(fake: FakeKube) -> None:
    """stop() must not wait for a hung watch to time out: here that would be 600 s (the read timeout, and the
    watch's own timeoutSeconds on the fake), so a 60 s hang guard tells "prompt" from "waited" on any machine."""
    fake.hang_watches = True

    async def scenario() -> None:
        async with watching(fake, read_timeout_s=600, watch_timeout_s=600) as h:
            await wait_until(lambda: fake.seen("GET", "edgemodeldeployments", watch=True))
            try:
                async with asyncio.timeout(60):
                    await h.watcher.stop()
            finally:
                with fake.cond:  # let a watch that stop() failed to abandon go, so the test ends either way
                    fake.hang_watches = False
                    fake.cond.notify_all()

    run(scenario())


# -- events, conflicts, labels ------------------------------------------------------------


def test_kubernetes_events_for_swaps_and_failures_land_on_the_resource(fake: FakeKube) -> None:
    ok = fake.create("alpha", emd_spec("alpha"))
    bad = fake.create("beta", emd_spec("beta", tag="broken"))

    async def scenario() -> None:
        bus = EventBus()
        control = RecordingControl(bus)
        control.failing[emd_spec("beta", tag="broken")["image"]] = "golden output mismatch"
        async with watching(fake, control=control, bus=bus):
            await wait_until(lambda: len(fake.events) >= 2, what="two events")
            await wait_until(lambda: (fake.node_status("beta") or {}).get("lastError"), what="beta's error")
            assert fake.node_status("beta")["lastError"] == "golden output mismatch"
            assert "version" not in fake.node_status("beta"), "nothing served"
            # Events about models no resource governs are not the cluster's business.
            bus.publish("model.swapped", model="local-only", version="9", previous=None, source="local")
            fake.stop()
            bus.publish("model.rollback", model="alpha", version="0.9", source="k8s")
            await asyncio.sleep(0.3)
            fake.start()
            await wait_until(lambda: any(e["reason"] == "RolledBack" for e in fake.events), what="queued event")

    run(scenario())
    by_reason = {e["reason"]: e for e in fake.events}
    assert set(by_reason) == {"Swapped", "SwapFailed", "RolledBack"}
    swapped, failed = by_reason["Swapped"], by_reason["SwapFailed"]
    assert swapped["type"] == "Normal" and failed["type"] == "Warning"
    assert swapped["involvedObject"] == {
        "apiVersion": "edge-agent.io/v1alpha1",
        "kind": "EdgeModelDeployment",
        "namespace": "default",
        "name": "alpha",
        "uid": ok["metadata"]["uid"],
        "resourceVersion": ok["metadata"]["resourceVersion"],
    }
    assert failed["involvedObject"]["uid"] == bad["metadata"]["uid"]
    assert "golden output mismatch" in failed["message"] and "edge-1" in failed["message"]
    assert swapped["source"] == {"component": "edge-agent", "host": "edge-1"}
    assert swapped["reportingInstance"] == "edge-1" and swapped["count"] == 1
    assert by_reason["RolledBack"]["type"] == "Warning"


def test_relabelled_node_moves_in_and_out_of_a_selector(fake: FakeKube) -> None:
    fake.create("zoned", emd_spec("alpha", selector={"matchLabels": {"topology.kubernetes.io/zone": "b"}}))

    async def scenario() -> None:
        async with watching(fake) as h:
            # A successful list that selects nothing *is* news: the empty set.
            await wait_until(lambda: h.control.calls)
            assert h.control.last() == {}
            fake.set_labels({**EDGE, "topology.kubernetes.io/zone": "b"})
            await wait_until(lambda: h.control.last() == {"alpha": emd_spec("alpha")["image"]}, what="selected")
            await wait_until(lambda: fake.node_status("zoned"), what="status entry")
            fake.set_labels(EDGE)
            await wait_until(lambda: h.control.last() == {}, what="deselected")
            await wait_until(lambda: fake.node_status("zoned") is None, what="status entry removed")

    run(scenario())


def test_conflicts_and_bad_specs_cost_only_their_own_resource(fake: FakeKube) -> None:
    fake.create("older", emd_spec("alpha", tag="1.0"), created="2024-01-01T00:00:00Z")
    fake.create("newer", emd_spec("alpha", tag="2.0"), created="2024-06-01T00:00:00Z")
    # An API server with an older CRD may hold what today's schema refuses.
    fake.create("both", {"model": "beta", "image": "r/beta:1", "version": "1"})
    fake.create("fine", emd_spec("gamma"))

    async def scenario() -> None:
        async with watching(fake) as h:
            await wait_until(lambda: h.control.calls)
            assert h.control.last() == {
                "alpha": "registry.local/models/alpha:1.0",
                "gamma": "registry.local/models/gamma:1.0",
            }
            await wait_until(lambda: all(fake.node_status(n) for n in ("older", "newer", "both", "fine")))
            assert "default/older" in fake.node_status("newer")["lastError"]
            assert fake.node_status("older")["lastError"] == ""
            assert "exactly one of image" in fake.node_status("both")["lastError"]
            assert h.watcher.state()["problems"].keys() == {"default/newer", "default/both"}

    run(scenario())


def test_disabled_integration_drops_the_desired_state_kubernetes_left() -> None:
    async def scenario() -> RecordingControl:
        bus = EventBus()
        control = RecordingControl(bus)
        await control.set_desired("k8s", [ModelDeployment("alpha", "r/alpha:1")])
        await control.set_desired("local", [ModelDeployment("beta", "store:beta:1")])
        control.calls.clear()
        watcher = KubeWatcher(
            settings=KubeSettings.from_table({"enabled": False}),
            control=control,
            events=bus,
            log=structlog.get_logger("test"),
        )
        await watcher.start()
        await watcher.stop()
        # A second start finds nothing left and leaves everything alone.
        await watcher.start()
        return control

    control = run(scenario())
    assert control.calls == [("k8s", [])]
    assert control.desired["local"], "other sources untouched"


# -- pins, retries, canaries ----------------------------------------------------------------


def test_spec_pinned_travels_to_the_reconciler_and_its_skips_are_reported(fake: FakeKube) -> None:
    """The reconciler owns pins: the watcher passes spec.pinned along and never pins by itself."""
    fake.create("alpha", emd_spec("alpha", tag="1.0", pinned=True))
    fake.create("beta", emd_spec("beta", tag="1.0"))

    async def scenario() -> None:
        async with watching(fake) as h:
            control = h.control
            await wait_until(lambda: control.models.get("alpha", {}).get("pinned"), what="alpha pinned")
            sent = {d.model: d for d in control.calls[-1][1]}
            assert sent["alpha"].pinned and not sent["beta"].pinned
            # An edit of a pinned resource is a new deployment, still pinned.
            fake.update_spec("alpha", emd_spec("alpha", tag="2.0", pinned=True))
            await wait_until(lambda: control.models["alpha"]["active_version"] == "2.0", what="edit applied")
            assert control.models["alpha"]["pinned"]
            # When the reconciler skips a model (held by a pin), the resource's status says why.
            control.held.add("beta")
            fake.update_spec("beta", emd_spec("beta", tag="2.0"))
            await wait_until(
                lambda: "pinned at 1.0" in (fake.node_status("beta") or {}).get("lastError", ""),
                what="beta's status explains the skip",
            )
            assert control.models["beta"]["active_version"] == "1.0"
            # pinned: false is a deployment without the pin; deleting the resource withdraws it.
            fake.update_spec("alpha", emd_spec("alpha", tag="2.0"))
            await wait_until(lambda: not control.models["alpha"]["pinned"], what="unpinned by the spec")
            fake.delete("alpha")
            await wait_until(lambda: "alpha" not in control.desired["k8s"], what="withdrawn with the resource")
            assert control.pins == [], "the watcher never pins by itself"

    run(scenario())


def test_a_model_that_failed_is_retried_with_backoff_until_it_is_served(fake: FakeKube) -> None:
    image = emd_spec("alpha", tag="2.0")["image"]
    fake.create("alpha", emd_spec("alpha", tag="2.0"))

    async def scenario() -> None:
        bus = EventBus()
        control = RecordingControl(bus)
        control.failing[image] = "registry unreachable"
        async with watching(fake, control=control, bus=bus, retry_initial_s=0.1, retry_max_s=0.4):
            await wait_until(lambda: len(control.calls) >= 4, what="retries")
            assert all(deps == control.calls[0][1] for _, deps in control.calls), "the same set, again"
            assert fake.node_status("alpha")["lastError"] == "registry unreachable"
            # The registry comes back: the next retry brings the node to the spec.
            del control.failing[image]
            await wait_until(lambda: (fake.node_status("alpha") or {}).get("version") == "2.0", what="served")
            assert fake.node_status("alpha")["lastError"] == ""
            calls = len(control.calls)
            await asyncio.sleep(0.6)
            assert len(control.calls) == calls, "no retries once it is served"

    run(scenario())


def test_a_canary_split_goes_to_the_reconciler_with_its_image_and_a_failed_pull_is_reported(fake: FakeKube) -> None:
    """The reconciler pulls a split's image (once, before routing it); the watcher pulls nothing itself.

    A pull that fails is that model's result from the reconciler: the resource's status
    and a Warning Event say so, and the model is retried like any other failure.
    """
    image = "registry.local/models/alpha@sha256:" + "ab" * 32
    fake.create(
        "alpha",
        {"model": "alpha", "image": image, "traffic": [{"version": "1", "weight": 90}, {"version": "2", "weight": 10}]},
    )

    async def scenario() -> None:
        bus = EventBus()
        control = RecordingControl(bus)
        control.unpullable[image] = f"cannot pull {image}: registry unreachable"
        async with watching(fake, control=control, bus=bus, retry_initial_s=0.1, retry_max_s=0.4):
            await wait_until(
                lambda: "registry unreachable" in (fake.node_status("alpha") or {}).get("lastError", ""),
                what="the failed pull in the resource's status",
            )
            sent = control.calls[0][1][0]
            assert sent.ref == image and sent.traffic == {"1": 90, "2": 10}
            await wait_until(
                lambda: [e for e in fake.events if e["reason"] == "ReconcileFailed"], what="a Warning Event"
            )
            # The registry comes back: the retry brings the split about.
            del control.unpullable[image]
            await wait_until(lambda: (fake.node_status("alpha") or {}).get("lastError") == "", what="served")
            assert all(deps == control.calls[0][1] for _, deps in control.calls), "the same set, again"

    run(scenario())


def test_each_watcher_has_its_own_client_configuration(fake: FakeKube) -> None:
    from kubernetes import client

    fake.create("alpha", emd_spec("alpha"))
    before = client.Configuration._default

    async def scenario() -> None:
        async with watching(fake) as h:
            await wait_until(lambda: fake.node_status("alpha"))
            h.bus.publish("model.swapped", model="alpha", version="1.1", previous="1.0", source="k8s")
            await wait_until(lambda: fake.events, what="an Event posted")

    run(scenario())
    assert client.Configuration._default is before, "the client's process-wide default was never touched"


# -- settings -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, False),
        ({"KUBERNETES_SERVICE_HOST": "10.43.0.1"}, True),
        ({"KUBERNETES_SERVICE_HOST": "10.43.0.1", "EDGE_AGENT_K8S__ENABLED": "false"}, False),
        ({"EDGE_AGENT_K8S__ENABLED": "true"}, True),
        ({"EDGE_AGENT_K8S__ENABLED": "auto"}, False),
    ],
    ids=["bare-hardware", "in-a-pod", "pod-but-off", "told-to", "auto-outside-a-pod"],
)
def test_the_integration_is_on_in_a_pod_or_when_told(env: dict[str, str], expected: bool) -> None:
    from agent.config import Config

    config = Config.load(env=env, overrides={"node_id": "edge-9"})
    settings = KubeSettings.from_config(config, env=env)
    assert settings.enabled is expected
    assert settings.node_name == "edge-9"
    assert KubeSettings.from_config(config, env={**env, "NODE_NAME": "n-1"}).node_name == "n-1", "downward API wins"


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"mode": "magic"}, "k8s.mode"),
        ({"mode": "url", "url": "localhost:8001"}, "k8s.url"),
        ({"backoff_initial_s": 0}, "backoff_initial_s"),
        ({"retry_initial_s": 60, "retry_max_s": 10}, "retry_max_s"),
        ({"watch_timeout": 5}, "unknown k8s setting.*watch_timeout"),
        ({"page_size": "many"}, "page_size"),
    ],
)
def test_bad_k8s_settings_name_the_key(table: dict[str, Any], message: str) -> None:
    from agent.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        KubeSettings.from_table({"enabled": True, **table}, default_node="n")

"""GpuScheduler: memory admission, refusal, concurrency, accounting and release.

The scheduler is given its devices (GpuDevice: index, name, total MiB) and its
clock explicitly, so these tests run on a node without a GPU; the NVML-backed
discovery is tested against the real NVML where there is one.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest

from agent.config import Config
from agent.errors import ConfigError, GpuBusy, GpuUnavailable
from agent.telemetry.gpu import GpuProbe, with_models
from agent.wasinn.gpu import GpuDevice, GpuScheduler, GpuSettings, discover_gpus

H200 = GpuDevice(index=0, name="NVIDIA H200", total_mb=143_771)
SMALL = GpuDevice(index=1, name="NVIDIA T4", total_mb=15_360)
HANG_GUARD_S = 30.0  # only ever waited in full if the scheduler is broken


class ManualClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def nvml_absent_reason() -> str | None:
    try:
        import pynvml
    except ImportError:
        return "nvidia-ml-py is not installed"
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        return f"NVML is absent on this machine ({exc}): no NVIDIA driver to discover GPUs through"
    try:
        if pynvml.nvmlDeviceGetCount() == 0:
            return "NVML reports no devices"
    finally:
        pynvml.nvmlShutdown()
    return None


NVML_ABSENT = nvml_absent_reason()


# -- settings -------------------------------------------------------------------------------------------
def test_default_budget_is_ninety_percent_of_each_device() -> None:
    scheduler = GpuScheduler(devices=[H200, SMALL])
    budgets = [d["budget_mb"] for d in scheduler.snapshot()["devices"]]
    assert budgets == [int(143_771 * 0.9), int(15_360 * 0.9)]


def test_budget_settings_one_for_all_a_list_per_device_and_capped_at_the_device() -> None:
    assert GpuSettings.from_mapping({"memory_budget_mb": 8000}).memory_budget_mb == (8000,)
    one = GpuScheduler(devices=[H200, SMALL], settings=GpuSettings.from_mapping({"memory_budget_mb": 20_000}))
    assert [d["budget_mb"] for d in one.snapshot()["devices"]] == [20_000, 15_360]  # the T4 has only 15 GiB
    each = GpuScheduler(devices=[H200, SMALL], settings=GpuSettings.from_mapping({"memory_budget_mb": [100_000, 0]}))
    assert [d["budget_mb"] for d in each.snapshot()["devices"]] == [100_000, int(15_360 * 0.9)]
    env = Config.load(env={"EDGE_AGENT_GPU__MEMORY_BUDGET_MB": "1000, 2000", "EDGE_AGENT_GPU__MAX_CONCURRENCY": "3"})
    settings = GpuSettings.from_config(env)
    assert settings.memory_budget_mb == (1000, 2000) and settings.max_concurrency == 3


@pytest.mark.parametrize(
    "table",
    [{"memory_budget_mb": -1}, {"memory_budget_mb": "lots"}, {"max_concurrency": 0}, {"wait_s": 0}, {"budget": 1}],
)
def test_bad_gpu_settings_are_config_errors(table: dict[str, object]) -> None:
    with pytest.raises(ConfigError, match="gpu"):
        GpuSettings.from_mapping(table)


# -- admission ------------------------------------------------------------------------------------------
def test_cpu_never_takes_a_gpu_and_auto_falls_back_without_one() -> None:
    none = GpuScheduler(devices=[])
    assert none.admit("m:1", 100, "cpu") is None
    assert none.admit("m:1", 100, "auto") is None
    with pytest.raises(GpuUnavailable, match="m:1 asks for target gpu, but this node has no GPU"):
        none.admit("m:1", 100, "gpu")
    assert GpuScheduler(devices=[H200]).admit("m:1", 100, "cpu") is None


def test_admission_places_on_the_device_with_most_room_and_refuses_past_the_budget() -> None:
    settings = GpuSettings(memory_budget_mb=(10_000, 6_000))
    scheduler = GpuScheduler(devices=[H200, SMALL], settings=settings)
    a = scheduler.admit("llm:1", 7_000, "gpu")
    assert a is not None and a.device == "cuda:0"
    b = scheduler.admit("resnet:2", 4_000, "gpu")  # 3,000 left on cuda:0, 6,000 on cuda:1
    assert b is not None and b.device == "cuda:1"
    c = scheduler.admit("bert:1", 2_500, "auto")
    assert c is not None and c.device == "cuda:0"
    assert scheduler.lease_of("bert:1") == "cuda:0"
    # 500 MiB left on cuda:0, 2,000 on cuda:1: 3,000 fits nowhere.
    with pytest.raises(GpuUnavailable) as refused:
        scheduler.admit("whisper:3", 3_000, "gpu")
    message = str(refused.value)
    assert message.startswith("whisper:3 needs 3000 MiB of GPU memory")
    assert "cuda:0 (NVIDIA H200) 500 of 10000 MiB free, held by llm:1 7000 MiB, bert:1 2500 MiB" in message
    assert "cuda:1 (NVIDIA T4) 2000 of 6000 MiB free, held by resnet:2 4000 MiB" in message
    assert refused.value.http_status == 503 and refused.value.wire_code == "gpu_unavailable"
    assert scheduler.admit("whisper:3", 3_000, "auto") is None  # auto: the CPU
    assert scheduler.lease_of("whisper:3") is None


def test_release_gives_the_memory_back_once() -> None:
    scheduler = GpuScheduler(devices=[H200], settings=GpuSettings(memory_budget_mb=(1_000,)))
    lease = scheduler.admit("a:1", 800, "gpu")
    assert lease is not None
    with pytest.raises(GpuUnavailable, match="held by a:1 800 MiB"):
        scheduler.admit("b:1", 400, "gpu")
    lease.release()
    lease.release()  # idempotent: an unload path may run twice
    assert scheduler.snapshot()["devices"][0]["free_mb"] == 1_000
    assert scheduler.lease_of("a:1") is None
    assert scheduler.admit("b:1", 400, "gpu") is not None


def test_a_version_reloaded_under_its_label_holds_its_own_lease() -> None:
    """Other content under the same name:version loads while the old one still serves its holders."""
    scheduler = GpuScheduler(devices=[H200], settings=GpuSettings(memory_budget_mb=(1_000,), wait_s=0.05))
    old = scheduler.admit("a:1", 300, "gpu")
    new = scheduler.admit("a:1", 500, "gpu")
    assert old is not None and new is not None
    assert scheduler.snapshot()["models"]["a:1"]["memory_mb"] == 800  # both held
    with pytest.raises(GpuUnavailable, match="held by a:1 500 MiB, a:1 300 MiB"):
        scheduler.admit("b:1", 300, "gpu")
    with old.compute():
        pass
    old.release()
    assert scheduler.snapshot()["models"]["a:1"] == {
        "device": "cuda:0",
        "memory_mb": 500,
        "gpu_time_s": 0.0,
        "calls": 0,
    }
    with new.compute(), pytest.raises(GpuBusy, match="held by a:1"), scheduler.compute("a:1"):
        pass  # the label's newest lease: the same device, whose one slot new holds
    new.release()
    assert scheduler.snapshot()["models"] == {}


# -- run time -------------------------------------------------------------------------------------------
@pytest.fixture
def two_models() -> Iterator[GpuScheduler]:
    scheduler = GpuScheduler(devices=[H200], settings=GpuSettings(max_concurrency=1, wait_s=HANG_GUARD_S))
    assert scheduler.admit("a:1", 100, "gpu") is not None
    assert scheduler.admit("b:1", 100, "gpu") is not None
    yield scheduler


def test_one_call_at_a_time_per_device_across_models(two_models: GpuScheduler) -> None:
    inside, release, b_entered = threading.Event(), threading.Event(), threading.Event()

    def run_a() -> None:
        with two_models.compute("a:1"):
            inside.set()
            release.wait(HANG_GUARD_S)

    def run_b() -> None:
        with two_models.compute("b:1"):
            b_entered.set()

    ta = threading.Thread(target=run_a)
    ta.start()
    assert inside.wait(HANG_GUARD_S)
    tb = threading.Thread(target=run_b)
    tb.start()
    assert not b_entered.wait(0.2)  # b waits while a holds the device's one slot
    assert two_models.snapshot()["devices"][0]["running"] == 1
    release.set()
    assert b_entered.wait(HANG_GUARD_S)
    ta.join(HANG_GUARD_S)
    tb.join(HANG_GUARD_S)
    models = two_models.snapshot()["models"]
    assert models["a:1"]["calls"] == 1 and models["b:1"]["calls"] == 1


def test_a_bounded_wait_ends_in_gpu_busy_naming_the_holder() -> None:
    scheduler = GpuScheduler(devices=[H200], settings=GpuSettings(max_concurrency=1, wait_s=0.05))
    scheduler.admit("a:1", 0, "gpu")
    scheduler.admit("b:1", 0, "gpu")
    with scheduler.compute("a:1"), pytest.raises(GpuBusy) as busy, scheduler.compute("b:1"):
        pass
    assert str(busy.value) == "b:1 waited 0.05s for a slot on cuda:0: 1 of 1 held by a:1 (gpu.max_concurrency 1)"
    assert busy.value.wire_code == "gpu_busy"
    assert scheduler.snapshot()["models"]["b:1"]["calls"] == 0  # the refused call is not accounted
    with scheduler.compute("b:1"):  # the slot is free again
        pass


def test_max_concurrency_admits_that_many_at_once() -> None:
    scheduler = GpuScheduler(devices=[H200], settings=GpuSettings(max_concurrency=2, wait_s=0.05))
    for label in ("a:1", "b:1", "c:1"):
        scheduler.admit(label, 0, "gpu")
    with scheduler.compute("a:1"), scheduler.compute("b:1"):
        assert scheduler.snapshot()["devices"][0]["running"] == 2
        with pytest.raises(GpuBusy, match="held by a:1, b:1"), scheduler.compute("c:1"):
            pass


def test_devices_have_their_own_slots() -> None:
    settings = GpuSettings(memory_budget_mb=(2_000, 2_000), wait_s=0.05)
    scheduler = GpuScheduler(devices=[H200, SMALL], settings=settings)
    for label in ("a:1", "b:1", "c:1"):  # equal room: the lower index; then the one with more room
        assert scheduler.admit(label, 1_000, "gpu") is not None
    assert [scheduler.lease_of(label) for label in ("a:1", "b:1", "c:1")] == ["cuda:0", "cuda:1", "cuda:0"]
    busy = pytest.raises(GpuBusy, match="on cuda:0: 1 of 1 held by a:1")
    with scheduler.compute("a:1"), scheduler.compute("b:1"), busy, scheduler.compute("c:1"):
        pass


def test_gpu_time_is_accounted_per_model_from_the_clock() -> None:
    clock = ManualClock()
    scheduler = GpuScheduler(devices=[H200], clock=clock)
    lease = scheduler.admit("a:1", 512, "gpu")
    assert lease is not None
    with lease.compute():
        clock.now += 2.5
    with scheduler.compute("a:1"):
        clock.now += 0.25
    with pytest.raises(RuntimeError), scheduler.compute("a:1"):
        clock.now += 1.0
        raise RuntimeError("the model failed: its time on the GPU still counts")
    assert scheduler.snapshot()["models"] == {
        "a:1": {"device": "cuda:0", "memory_mb": 512, "gpu_time_s": 3.75, "calls": 3}
    }
    with pytest.raises(ValueError, match="holds no GPU lease"), scheduler.compute("nobody:1"):
        pass


def test_telemetry_reads_devices_with_the_models_they_hold() -> None:
    scheduler = GpuScheduler(devices=[H200, SMALL], settings=GpuSettings(memory_budget_mb=(10_000,)))
    scheduler.admit("a:1", 6_000, "gpu")
    scheduler.admit("b:1", 1_000, "gpu")
    gpus = scheduler.read()
    assert gpus is not None
    assert [(g["index"], [m["model"] for m in g["models"]]) for g in gpus] == [(0, ["a:1"]), (1, ["b:1"])]
    assert gpus[0]["admitted_mb"] == 6_000 and gpus[0]["free_mb"] == 4_000
    assert gpus[0]["models"][0] == {"model": "a:1", "memory_mb": 6_000, "gpu_time_s": 0.0, "calls": 0}
    assert GpuScheduler(devices=[]).read() is None  # no GPU: telemetry's gpu section stays absent
    merged = with_models([{"index": 0, "utilization_percent": 37}], {0: [{"model": "z"}, {"model": "a"}]})
    assert merged == [{"index": 0, "utilization_percent": 37, "models": [{"model": "a"}, {"model": "z"}]}]


# -- discovery through NVML -----------------------------------------------------------------------------
@pytest.mark.skipif(NVML_ABSENT is not None, reason=f"needs NVML: {NVML_ABSENT}")
def test_discovery_finds_the_nodes_gpus_through_nvml() -> None:
    probe = GpuProbe()
    devices = discover_gpus(probe)
    assert devices and all(d.total_mb > 0 and d.name for d in devices)
    scheduler = GpuScheduler(devices=devices, probe=probe)
    snap = scheduler.snapshot()["devices"][0]
    assert snap["memory_total_bytes"] >> 20 == devices[0].total_mb  # NVML's figures next to the budget
    scheduler.close()


@pytest.mark.skipif(NVML_ABSENT is None, reason="this machine has NVML and a GPU: the absent case cannot be shown")
def test_discovery_without_nvml_finds_no_gpu_and_auto_runs_on_the_cpu() -> None:
    probe = GpuProbe()
    scheduler = GpuScheduler(devices=discover_gpus(probe), probe=probe)
    assert scheduler.devices == []
    assert scheduler.admit("m:1", 1, "auto") is None
    with pytest.raises(GpuUnavailable):
        scheduler.admit("m:1", 1, "gpu")
    assert scheduler.read() is None
    scheduler.close()


def test_a_call_waiting_when_its_version_unloads_is_told_so() -> None:
    scheduler = GpuScheduler(devices=[H200], settings=GpuSettings(wait_s=HANG_GUARD_S))
    a, b = scheduler.admit("a:1", 0, "gpu"), scheduler.admit("b:1", 0, "gpu")
    assert a is not None and b is not None
    outcome: list[BaseException] = []
    waiting = threading.Event()

    def run_b() -> None:
        try:
            waiting.set()
            with scheduler.compute("b:1"):
                pass
        except GpuUnavailable as exc:
            outcome.append(exc)

    with scheduler.compute("a:1"):
        tb = threading.Thread(target=run_b)
        tb.start()
        assert waiting.wait(HANG_GUARD_S)
        b.release()  # the unload wakes the waiter
        tb.join(HANG_GUARD_S)
    assert [str(e) for e in outcome] == ["b:1 was unloaded while its call waited for a GPU slot"]


def test_gpu_switched_off_probes_nothing_and_finds_no_device() -> None:
    settings = GpuSettings.from_mapping({"enabled": "false"})
    assert settings.enabled is False
    probe = GpuProbe(enabled=settings.enabled)
    assert discover_gpus(probe) == [] and probe.read() is None

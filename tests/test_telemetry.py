"""Telemetry snapshots: per model and version counts, errors, latency; swaps; cache; process; GPU (real or absent)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from conftest import ROLLBACK_GRACE_S, http

from agent.metrics import LATENCY_BUCKETS, Metrics
from agent.telemetry.gpu import GpuProbe
from agent.telemetry.snapshot import CpuMeter, build_snapshot, cache_used_bytes, node_gauges

DIGITS_INPUT = [0.0] * 64


def test_snapshot_groups_metrics_per_model_and_version() -> None:
    metrics = Metrics()
    requests, latency = metrics.model_children("digits", "1")
    for seconds in (0.0001, 0.0003, 0.002):
        requests.inc()
        latency.observe(seconds)
    metrics.errors.labels("digits", "1", "trap").inc(2)
    metrics.model_children("digits", "2")[0].inc()
    metrics.swaps.labels("digits").inc(3)
    metrics.rollbacks.labels("digits").inc()
    snap = build_snapshot(
        metrics.snapshot(), started=metrics.started, serving=[("digits", "2"), ("other", "5")], now=metrics.started + 9
    )
    models = {(m["model"], m["version"]): m for m in snap["models"]}
    v1 = models[("digits", "1")]
    assert v1["inference_requests"] == 3
    assert v1["inference_errors"] == {"trap": 2}
    hist = v1["inference_seconds"]
    assert hist["count"] == 3 and hist["sum"] == pytest.approx(0.0024)
    assert [b[0] for b in hist["buckets"]] == [*LATENCY_BUCKETS, "+Inf"]
    assert dict((b[0], b[1]) for b in hist["buckets"])[0.0005] == 2  # cumulative, as Prometheus keeps them
    assert models[("digits", "2")]["inference_requests"] == 1 and models[("digits", "2")]["serving"]
    assert models[("other", "5")] == {"model": "other", "version": "5", "serving": True, "inference_requests": 0}
    assert "serving" not in v1  # served no more, still reported: its counts are history
    assert snap["per_model"]["digits"] == {"swaps": 3, "rollbacks": 1}
    assert snap["node"]["rss_bytes"] > 1_000_000 and snap["node"]["cpu_seconds"] > 0
    assert snap["uptime_s"] == 9
    assert "gpu" not in snap


def test_cpu_percent_between_snapshots() -> None:
    meter = CpuMeter()
    assert meter.percent(10.0, 100.0) is None  # nothing to compare with yet
    assert meter.percent(10.5, 102.0) == 25.0


def test_node_gauges_count_the_cache_and_loaded_versions(make_agent: Any) -> None:
    agent = make_agent().agent
    serving = node_gauges(agent.models, agent.metrics, cache=agent.cache, blobs=agent.blobs)
    assert serving == [("digits", "1")]
    stored = sum(agent.blobs.size(d) for d in agent.blobs.digests())
    assert stored > 10_000 and cache_used_bytes(agent.cache, agent.blobs) == stored
    snap = agent.metrics.snapshot()
    assert snap["edge_agent_cache_bytes"][0]["value"] == stored
    assert snap["edge_agent_loaded_versions"][0]["value"] == 1


# -- GPU ----------------------------------------------------------------------------------------
class FakeNvmlError(Exception):
    pass


class FakeNvml:
    """The slice of pynvml the probe uses, for one device without power readings (as on many boards)."""

    NVMLError = FakeNvmlError
    NVML_TEMPERATURE_GPU = 0

    def __init__(self, devices: int = 1, fail_init: bool = False):
        self.devices = devices
        self.fail_init = fail_init
        self.shutdowns = 0

    def nvmlInit(self) -> None:
        if self.fail_init:
            raise FakeNvmlError("Driver Not Loaded")

    def nvmlDeviceGetCount(self) -> int:
        return self.devices

    def nvmlDeviceGetHandleByIndex(self, i: int) -> int:
        return i

    def nvmlDeviceGetName(self, h: int) -> bytes:
        return b"Jetson Orin"

    def nvmlDeviceGetUUID(self, h: int) -> str:
        return f"GPU-{h}"

    def nvmlDeviceGetUtilizationRates(self, h: int) -> Any:
        return type("U", (), {"gpu": 37, "memory": 12})()

    def nvmlDeviceGetMemoryInfo(self, h: int) -> Any:
        return type("M", (), {"used": 1 << 30, "total": 8 << 30})()

    def nvmlDeviceGetTemperature(self, h: int, sensor: int) -> int:
        return 51

    def nvmlDeviceGetPowerUsage(self, h: int) -> int:
        raise FakeNvmlError("Not Supported")

    def nvmlDeviceGetEnforcedPowerLimit(self, h: int) -> int:
        raise FakeNvmlError("Not Supported")

    def nvmlShutdown(self) -> None:
        self.shutdowns += 1


def test_gpu_present_reports_what_the_device_supports() -> None:
    nvml = FakeNvml(devices=2)
    probe = GpuProbe(nvml=nvml)
    gpus = probe.read()
    assert gpus is not None and len(gpus) == 2
    assert gpus[0] == {
        "index": 0,
        "name": "Jetson Orin",
        "uuid": "GPU-0",
        "utilization_percent": 37,
        "memory_utilization_percent": 12,
        "memory_used_bytes": 1 << 30,
        "memory_total_bytes": 8 << 30,
        "temperature_c": 51,
    }  # no power_w: unsupported, left out rather than reported as 0
    probe.close()
    assert nvml.shutdowns == 1


class ListLogger:
    def __init__(self) -> None:
        self.infos: list[tuple[str, dict[str, Any]]] = []

    def info(self, event: str, **kw: Any) -> None:
        self.infos.append((event, kw))


def test_no_gpu_is_said_once_at_info_level() -> None:
    log = ListLogger()
    probe = GpuProbe(log, nvml=FakeNvml(fail_init=True))
    assert [probe.read() for _ in range(5)] == [None] * 5
    assert len(log.infos) == 1 and "omitted" in log.infos[0][0] and log.infos[0][1]["reason"] == "Driver Not Loaded"
    off = ListLogger()
    assert GpuProbe(off, nvml=FakeNvml(), enabled=False).read() is None and off.infos == []


NVIDIA_SMI_FIELDS = (
    "index,name,uuid,memory.total,memory.used,utilization.gpu,utilization.memory,temperature.gpu,"
    "power.draw,enforced.power.limit"
)


def _nvidia_smi() -> list[dict[str, str]]:
    out = subprocess.run(
        ["nvidia-smi", f"--query-gpu={NVIDIA_SMI_FIELDS}", "--format=csv,noheader,nounits"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    names = NVIDIA_SMI_FIELDS.split(",")
    return [dict(zip(names, (v.strip() for v in line.split(",")), strict=True)) for line in out.splitlines() if line]


def _number(text: str) -> float | None:
    """nvidia-smi writes "[N/A]" or "[Not Supported]" where the device has no reading."""
    try:
        return float(text)
    except ValueError:
        return None


def test_real_nvml_on_this_machine() -> None:
    """With the real pynvml: each GPU's fields match nvidia-smi's own readings, or (no driver) one log line."""
    log = ListLogger()
    probe = GpuProbe(log)
    first, second = probe.read(), probe.read()
    probe.close()
    if first is None:
        assert second is None and len(log.infos) == 1
        assert shutil.which("nvidia-smi") is None or subprocess.run(["nvidia-smi"], capture_output=True).returncode
        return
    if shutil.which("nvidia-smi") is None:
        pytest.skip("a GPU is present but nvidia-smi is not installed to compare NVML's readings against")
    smi = _nvidia_smi()
    assert [d["index"] for d in first] == list(range(len(smi)))
    mib = 1024 * 1024
    for ours, theirs in zip(first, smi, strict=True):
        assert ours["name"] == theirs["name"] and ours["uuid"] == theirs["uuid"], (ours, theirs)
        assert ours["memory_total_bytes"] // mib == int(theirs["memory.total"]), (ours, theirs)
        # Readings that move: equal within what can change between the two reads.
        assert abs(ours["memory_used_bytes"] / mib - float(theirs["memory.used"])) <= 512, (ours, theirs)
        # Utilization is a sampled percentage that can jump between two reads: present
        # exactly when nvidia-smi has it, and a percentage. The others move slowly.
        for key, field, slack in (
            ("utilization_percent", "utilization.gpu", None),
            ("memory_utilization_percent", "utilization.memory", None),
            ("temperature_c", "temperature.gpu", 10),
            ("power_w", "power.draw", 100),
            ("power_limit_w", "enforced.power.limit", 1),
        ):
            value = _number(theirs[field])
            if value is None:
                assert key not in ours, f"{key}: nvidia-smi has no reading, NVML reported {ours.get(key)}"
            elif slack is None:
                assert key in ours and 0 <= ours[key] <= 100, (key, ours.get(key), value)
            else:
                assert key in ours and abs(ours[key] - value) <= slack, (key, ours.get(key), value)


# -- on a running agent ------------------------------------------------------------------------------
def test_metrics_endpoint_and_telemetry_agree_after_requests(make_agent: Any, tmp_path: Path) -> None:
    from agent.mqtt.channel import MqttChannel
    from agent.mqtt.settings import MqttSettings
    from agent.telemetry.settings import TelemetrySettings
    from agent.wiring import attach_lifecycle

    # A channel that is never started: snapshot() alone is what the telemetry clock publishes.
    holder: dict[str, Any] = {}

    def setup(agent: Any) -> None:
        control = attach_lifecycle(agent, rollback_grace_s=ROLLBACK_GRACE_S)
        holder["channel"] = MqttChannel(
            settings=MqttSettings.from_mapping({"host": "127.0.0.1"}),
            telemetry=TelemetrySettings(),
            node_id=agent.config.node_id,
            state_dir=agent.config.state_dir,
            control=control,
            events=agent.events,
            metrics=agent.metrics,
            models=agent.models,
            blobs=agent.blobs,
            cache=agent.cache,
            gpu=GpuProbe(enabled=False),
        )

    running = make_agent(setup=setup)
    body = {"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 64], "data": DIGITS_INPUT}]}
    for _ in range(4):
        assert http("POST", running.url + "/v2/models/digits/infer", body)[0] == 200
    assert http("POST", running.url + "/v2/models/digits/infer", {"inputs": []})[0] == 400
    snap = holder["channel"].snapshot()
    digits = next(m for m in snap["models"] if m["model"] == "digits")
    assert digits["inference_requests"] == 4 and digits["inference_seconds"]["count"] == 4
    assert snap["node"]["cache_bytes"] > 0 and snap["node"]["loaded_versions"] == 1
    assert snap["mqtt"]["connected"] is False and "gpu" not in snap
    json.dumps(snap)  # plain data, ready for the wire
    status, text = http("GET", running.url + "/metrics")
    assert status == 200
    assert b'edge_agent_inference_requests_total{model="digits",version="1"} 4.0' in text

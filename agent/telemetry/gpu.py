"""NVIDIA GPU statistics through NVML (``pynvml`` from ``nvidia-ml-py``).

Most edge nodes have no NVIDIA GPU: the first attempt finds no NVML library
or no device, says so once at info level, and from then on GPU telemetry is
simply absent. A field a device does not support (power on many Jetson or
consumer boards) is left out of that device's entry, not reported as zero.
NVML calls block for up to milliseconds; callers run :meth:`GpuProbe.read`
off the event loop.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import structlog

try:
    import pynvml
except ImportError:  # the dependency is declared, but a stripped install must still run
    pynvml = None


class GpuProbe:
    def __init__(self, log: Any = None, nvml: Any = None, enabled: bool = True):
        self.log = log or structlog.get_logger("edge_agent.telemetry")
        self._nvml = nvml if nvml is not None else pynvml
        self._lock = threading.Lock()
        # new | ready | absent | off (telemetry.gpu = false: not even probed, nothing logged)
        self._state = "new" if enabled else "off"
        self._handles: list[Any] = []

    @property
    def available(self) -> bool:
        with self._lock:
            self._ensure()
            return self._state == "ready"

    def _ensure(self) -> None:
        if self._state != "new":
            return
        nvml = self._nvml
        if nvml is None:
            self._absent("nvidia-ml-py is not installed")
            return
        try:
            nvml.nvmlInit()
            count = nvml.nvmlDeviceGetCount()
            self._handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
        except nvml.NVMLError as exc:
            self._absent(str(exc))
            return
        if not self._handles:
            self._absent("NVML reports no devices")
            return
        self._state = "ready"
        self.log.info("gpu telemetry enabled", devices=len(self._handles))

    def _absent(self, why: str) -> None:
        self._state = "absent"
        self.log.info("no NVIDIA GPU; GPU telemetry omitted", reason=why)

    def read(self) -> list[dict[str, Any]] | None:
        """One entry per device, or None when there is no GPU to report."""
        with self._lock:
            self._ensure()
            if self._state != "ready":
                return None
            return [self._device(i, handle) for i, handle in enumerate(self._handles)]

    def _device(self, index: int, handle: Any) -> dict[str, Any]:
        nvml = self._nvml
        entry: dict[str, Any] = {"index": index}

        def field(name: str, read: Callable[[], Any]) -> None:
            # Not supported on this device: leave it out rather than report a false zero.
            with contextlib.suppress(nvml.NVMLError):
                entry[name] = read()

        field("name", lambda: _text(nvml.nvmlDeviceGetName(handle)))
        field("uuid", lambda: _text(nvml.nvmlDeviceGetUUID(handle)))
        try:
            util = nvml.nvmlDeviceGetUtilizationRates(handle)
            entry["utilization_percent"] = util.gpu
            entry["memory_utilization_percent"] = util.memory
        except nvml.NVMLError:
            pass
        try:
            memory = nvml.nvmlDeviceGetMemoryInfo(handle)
            entry["memory_used_bytes"] = memory.used
            entry["memory_total_bytes"] = memory.total
        except nvml.NVMLError:
            pass
        field("temperature_c", lambda: nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU))
        field("power_w", lambda: nvml.nvmlDeviceGetPowerUsage(handle) / 1000.0)
        field("power_limit_w", lambda: nvml.nvmlDeviceGetEnforcedPowerLimit(handle) / 1000.0)
        return entry

    def close(self) -> None:
        with self._lock:
            if self._state == "ready":
                with contextlib.suppress(self._nvml.NVMLError):
                    self._nvml.nvmlShutdown()
            if self._state != "off":
                self._state = "absent"
            self._handles = []


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


# -- per-model figures next to the device's (agent/wasinn/gpu.py) -------------------------------------
class GpuReader(Protocol):
    """What telemetry reads its GPU section from: a :class:`GpuProbe`, or the agent's GPU scheduler,
    whose entries also list the versions each device holds."""

    def read(self) -> list[dict[str, Any]] | None: ...
    def close(self) -> None: ...


def with_models(devices: list[dict[str, Any]], models: Mapping[int, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Each device entry with ``models``: the versions it holds (memory, GPU time), in label order."""
    out = []
    for entry in devices:
        held = sorted(models.get(entry["index"], []), key=lambda m: str(m.get("model")))
        out.append(dict(entry) | {"models": held})
    return out

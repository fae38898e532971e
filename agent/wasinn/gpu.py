"""The node's GPUs as a shared resource: memory admission at load, a concurrency bound at run time.

One :class:`GpuScheduler` per agent. A WASI-NN version whose ``wasi_nn.target``
is ``gpu`` or ``auto`` asks :meth:`GpuScheduler.admit` at load for the
``gpu_memory_mb`` its model.json declares; the scheduler places it on the
device with the most room left in that device's budget (``[gpu]
memory_budget_mb``, by default 90% of the device, leaving room for the CUDA
context and fragmentation), and the :class:`GpuLease` it returns is released
when the version unloads. ``gpu`` refuses with :class:`~agent.errors.GpuUnavailable`
when no device has room (or there is no device), naming what was asked, what
is free and who holds it; ``auto`` falls back to the CPU instead.

Memory is what versions *declare*, not what the driver reports: a CUDA
allocator keeps freed blocks cached, so the device's used memory (NVML, shown
next to the budget in :meth:`GpuScheduler.snapshot`) lags loads and unloads
and cannot decide admission.

At run time every call of a leased version holds a slot of its device
(:meth:`GpuScheduler.compute`, ``[gpu] max_concurrency`` per device, 1 by
default: two models time-slicing one GPU each run slower than one after the
other and both hold their activations at once). A call waits at most
``[gpu] wait_s`` for a slot, then fails with :class:`~agent.errors.GpuBusy`.
The time each version holds a slot is its GPU time.

Devices come in through the constructor (:class:`GpuDevice`): :func:`discover_gpus`
finds them through NVML (:class:`~agent.telemetry.gpu.GpuProbe`); tests pass
a list.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from agent.config import GpuSettings
from agent.errors import GpuBusy, GpuUnavailable
from agent.telemetry.gpu import with_models
from agent.wasinn.abi import Errno, ExecutionTarget, NnError
from agent.wasinn.backend import ExecutionContext, Graph, Tensor

if TYPE_CHECKING:
    from agent.telemetry.gpu import GpuProbe

__all__ = ["GpuDevice", "GpuLease", "GpuScheduler", "GpuSettings", "discover_gpus", "placement"]

TARGETS = ("cpu", "gpu", "auto")
# The share of a device admitted by default: the rest is the CUDA context, cuBLAS/cuDNN workspaces, fragmentation.
DEFAULT_BUDGET_SHARE = 0.9


@dataclasses.dataclass(frozen=True)
class GpuDevice:
    """A GPU as the scheduler sees it: an explicit input (from NVML, or a test's list)."""

    index: int
    name: str
    total_mb: int


def discover_gpus(probe: GpuProbe) -> list[GpuDevice]:
    """The node's NVIDIA GPUs through NVML, or none (no driver, no pynvml, no device)."""
    devices = []
    for entry in probe.read() or []:
        total = entry.get("memory_total_bytes")
        if total is None:
            continue  # a device that will not say its memory cannot be budgeted
        devices.append(GpuDevice(index=entry["index"], name=str(entry.get("name", "gpu")), total_mb=total >> 20))
    return devices


def budget_mb(settings: GpuSettings, device: GpuDevice) -> int:
    """The MiB admitted on ``device``: its ``[gpu] memory_budget_mb``, else 90% of it; never more than it has."""
    budgets = settings.memory_budget_mb
    # One number is every device's budget; a list gives each device (by index) its own.
    chosen = budgets[0] if len(budgets) == 1 else (budgets[device.index] if device.index < len(budgets) else 0)
    if chosen <= 0:
        return int(device.total_mb * DEFAULT_BUDGET_SHARE)
    return min(chosen, device.total_mb)


@dataclasses.dataclass
class _Usage:
    """What one version holds and has used."""

    label: str
    device: int
    memory_mb: int
    gpu_time_s: float = 0.0
    calls: int = 0


class GpuLease:
    """A version's place on one device; :meth:`release` (idempotent) gives it back at unload."""

    def __init__(self, scheduler: GpuScheduler, key: int, label: str, index: int, memory_mb: int):
        self._scheduler = scheduler
        self.key = key  # one per admission: a version replaced by other content under its label holds its own
        self.label = label
        self.index = index
        self.device = f"cuda:{index}"
        self.memory_mb = memory_mb
        self.released = False

    def compute(self) -> contextlib.AbstractContextManager[None]:
        """One call of this version on its device (see :meth:`GpuScheduler.compute`)."""
        return self._scheduler._compute(self.key, self.label)

    def release(self) -> None:
        self._scheduler._release(self)


class _Device:
    def __init__(self, device: GpuDevice, budget_mb: int, slots: int):
        self.info = device
        self.budget_mb = budget_mb
        self.slots = slots
        self.running: list[str] = []  # labels holding a slot now (one entry per call)

    def admitted_mb(self, usage: Mapping[int, _Usage]) -> int:
        return sum(u.memory_mb for u in usage.values() if u.device == self.info.index)


class GpuScheduler:
    """GPU memory admission and concurrency for one agent. Thread-safe: loads and calls run on worker threads."""

    def __init__(
        self,
        *,
        devices: Sequence[GpuDevice],
        settings: GpuSettings | None = None,
        probe: GpuProbe | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.settings = settings or GpuSettings()
        self._probe = probe  # NVML figures for snapshots; None: budgets and per-model figures only
        self._clock = clock
        self._devices = {
            d.index: _Device(d, budget_mb(self.settings, d), self.settings.max_concurrency) for d in devices
        }
        self._usage: dict[int, _Usage] = {}  # by lease key
        self._next_key = 0
        self._cond = threading.Condition()

    @property
    def devices(self) -> list[GpuDevice]:
        return [d.info for d in self._devices.values()]

    # -- admission ---------------------------------------------------------------------------------
    def admit(self, label: str, memory_mb: int, target: str) -> GpuLease | None:
        """Place ``label`` (a version, "model:version") on a device; None: it runs on the CPU.

        ``target`` is model.json's ``wasi_nn.target``: ``cpu`` never takes a GPU, ``gpu`` must have
        one (else :class:`GpuUnavailable`), ``auto`` takes one when one has room.
        """
        if target not in TARGETS:
            raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
        if memory_mb < 0:
            raise ValueError(f"memory_mb must be 0 or more, got {memory_mb}")
        if target == "cpu":
            return None
        with self._cond:
            if not self._devices:
                if target == "auto":
                    return None
                raise GpuUnavailable(f"{label} asks for target gpu, but this node has no GPU (NVML found none)")
            free = {i: d.budget_mb - d.admitted_mb(self._usage) for i, d in self._devices.items()}
            # The device with the most room: spreads versions, keeps the largest hole for the next one.
            index = max(free, key=lambda i: (free[i], -i))
            if free[index] < memory_mb:
                if target == "auto":
                    return None
                raise GpuUnavailable(self._no_room(label, memory_mb, free))
            # Keyed per admission, not per label: a version reloaded with other content under the same
            # name:version holds its own memory until the old one's last holder lets it go.
            key = self._next_key
            self._next_key += 1
            self._usage[key] = _Usage(label=label, device=index, memory_mb=memory_mb)
            return GpuLease(self, key, label, index, memory_mb)

    def _no_room(self, label: str, memory_mb: int, free: Mapping[int, int]) -> str:
        parts = []
        for index, device in self._devices.items():
            holders = sorted(
                (u for u in self._usage.values() if u.device == index), key=lambda u: (-u.memory_mb, u.label)
            )
            held = ", ".join(f"{u.label} {u.memory_mb} MiB" for u in holders) or "nobody"
            parts.append(
                f"cuda:{index} ({device.info.name}) {free[index]} of {device.budget_mb} MiB free, held by {held}"
            )
        return f"{label} needs {memory_mb} MiB of GPU memory; " + "; ".join(parts)

    def _release(self, lease: GpuLease) -> None:
        with self._cond:
            if lease.released:
                return
            lease.released = True
            self._usage.pop(lease.key, None)
            self._cond.notify_all()

    def _key_of(self, label: str) -> int | None:
        """The newest lease of ``label`` (the caller holds the lock)."""
        keys = [key for key, usage in self._usage.items() if usage.label == label]
        return max(keys) if keys else None

    def lease_of(self, label: str) -> str | None:
        """The device ``label`` holds ("cuda:0"), or None."""
        with self._cond:
            key = self._key_of(label)
            return None if key is None else f"cuda:{self._usage[key].device}"

    # -- run time ----------------------------------------------------------------------------------
    def compute(self, label: str) -> contextlib.AbstractContextManager[None]:
        """Hold a slot of ``label``'s device for one call, waiting at most ``wait_s``; account its GPU time.

        ``label``'s newest lease; a version's graphs use their own lease (:meth:`GpuLease.compute`).
        """
        with self._cond:
            key = self._key_of(label)
        if key is None:
            raise ValueError(f"{label} holds no GPU lease")
        return self._compute(key, label)

    @contextlib.contextmanager
    def _compute(self, key: int, label: str) -> Iterator[None]:
        deadline = self._clock() + self.settings.wait_s
        with self._cond:
            usage = self._usage.get(key)
            if usage is None:
                raise ValueError(f"{label} holds no GPU lease")
            device = self._devices[usage.device]
            while len(device.running) >= device.slots:
                if self._usage.get(key) is not usage:
                    raise GpuUnavailable(f"{label} was unloaded while its call waited for a GPU slot")
                left = deadline - self._clock()
                if left <= 0:
                    raise GpuBusy(
                        f"{label} waited {self.settings.wait_s:g}s for a slot on cuda:{usage.device}: "
                        f"{device.slots} of {device.slots} held by {', '.join(sorted(device.running))} "
                        f"(gpu.max_concurrency {device.slots})"
                    )
                self._cond.wait(left)
            device.running.append(label)
            started = self._clock()
        try:
            yield
        finally:
            with self._cond:
                device.running.remove(label)
                usage.gpu_time_s += self._clock() - started
                usage.calls += 1
                self._cond.notify_all()

    # -- figures -----------------------------------------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        """Per-version figures, and per device its budget next to NVML's figures (when NVML answers)."""
        with self._cond:
            models: dict[str, dict[str, Any]] = {}
            for _, u in sorted(self._usage.items(), key=lambda item: (item[1].label, item[0])):
                # One entry per label: a version reloaded under its label sums with its predecessor
                # while both are held; the device is the newest one's.
                entry = models.setdefault(u.label, {"device": "", "memory_mb": 0, "gpu_time_s": 0.0, "calls": 0})
                entry["device"] = f"cuda:{u.device}"
                entry["memory_mb"] += u.memory_mb
                entry["gpu_time_s"] = round(entry["gpu_time_s"] + u.gpu_time_s, 6)
                entry["calls"] += u.calls
            devices = []
            for index, device in sorted(self._devices.items()):
                admitted = device.admitted_mb(self._usage)
                devices.append(
                    {
                        "index": index,
                        "name": device.info.name,
                        "total_mb": device.info.total_mb,
                        "budget_mb": device.budget_mb,
                        "admitted_mb": admitted,
                        "free_mb": device.budget_mb - admitted,
                        "max_concurrency": device.slots,
                        "running": len(device.running),
                    }
                )
        nvml = {entry["index"]: entry for entry in (self._probe.read() if self._probe is not None else None) or []}
        for entry in devices:
            # NVML's own figures (utilization, memory used/total, temperature, power) beside the budget.
            entry.update({k: v for k, v in nvml.get(entry["index"], {}).items() if k not in entry})
        return {"devices": devices, "models": models}

    def read(self) -> list[dict[str, Any]] | None:
        """Telemetry's GPU section (:class:`~agent.telemetry.gpu.GpuReader`): NVML's device entries,
        each with the versions it holds; None when there is no GPU to report."""
        snap = self.snapshot()
        if not snap["devices"]:
            return self._probe.read() if self._probe is not None else None
        per_device: dict[int, list[dict[str, Any]]] = {}
        for label, figures in snap["models"].items():
            index = int(figures["device"].removeprefix("cuda:"))
            per_device.setdefault(index, []).append(
                {"model": label} | {k: v for k, v in figures.items() if k != "device"}
            )
        return with_models(snap["devices"], per_device)

    def close(self) -> None:
        if self._probe is not None:
            self._probe.close()


# -- a leased version's graphs ------------------------------------------------------------------------
class GpuGraph:
    """A backend graph of a leased version: every ``compute`` holds a slot of the lease's device.

    The slot is taken per compute, not per request: a guest's own work between calls (tokenising,
    pre- and post-processing in wasm) does not keep other models off the GPU.
    """

    def __init__(self, graph: Graph, lease: GpuLease):
        self._graph = graph
        self.lease = lease
        self.backend = graph.backend
        self.device = graph.device
        self.truncates_output = graph.truncates_output
        if graph.device == "cpu":
            # ``auto`` on a backend without GPU support here (a CPU-only onnxruntime or llama.cpp):
            # the model takes no GPU memory, so the memory it declared goes back to the budget.
            lease.release()

    def init_execution_context(self) -> ExecutionContext:
        context = self._graph.init_execution_context()
        if self.device == "cpu":
            return context  # no GPU slot to hold
        return GpuContext(context, self.lease)

    def close(self) -> None:
        self._graph.close()


class GpuContext:
    def __init__(self, context: ExecutionContext, lease: GpuLease):
        self._context = context
        self._lease = lease

    def set_input(self, index: int, tensor: Tensor) -> None:
        self._context.set_input(index, tensor)

    def compute(self) -> None:
        with self._busy_is_an_errno(), self._lease.compute():
            self._context.compute()

    def get_output(self, index: int) -> bytes:
        return self._context.get_output(index)

    def compute_single(self) -> None:
        with self._busy_is_an_errno(), self._lease.compute():
            self._context.compute_single()

    @staticmethod
    @contextlib.contextmanager
    def _busy_is_an_errno() -> Iterator[None]:
        # WASI-NN has an errno for this: the guest sees ``busy`` and may retry, the host logs no failure.
        try:
            yield
        except GpuBusy as exc:
            raise NnError(Errno.BUSY, str(exc)) from None

    def get_output_single(self, index: int) -> bytes:
        return self._context.get_output_single(index)

    def fini_single(self) -> None:
        self._context.fini_single()

    def close(self) -> None:
        self._context.close()


def placement(target: ExecutionTarget, lease: GpuLease | None) -> tuple[ExecutionTarget, dict[str, Any]]:
    """The target and graph options a version's named model is loaded with, once admission has spoken.

    ``auto`` without a lease (no GPU, or no room in the budget) becomes ``cpu``: the backend must not
    take a GPU the scheduler did not give. With a lease the target stays (``auto`` lets a backend
    without GPU support fall back to the CPU, see :class:`GpuGraph`) and the backend is told the device.
    """
    if lease is None:
        return (ExecutionTarget.CPU if target is ExecutionTarget.AUTO else target), {}
    return target, {"device_index": lease.index}

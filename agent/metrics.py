"""Per-agent metrics, kept in a prometheus-client registry of the agent's own.

No default (process-global) registry: the fleet simulator runs hundreds of
agents in one process and each must count only its own requests. The local
API exposes the registry on ``/metrics``; MQTT telemetry snapshots it. Every
series is listed in docs/METRICS.md.

Process metrics (CPU seconds, resident memory, open file descriptors, start
time) come from prometheus-client's ``ProcessCollector``, registered on this
registry too: they read ``/proc/self`` when scraped, so several agents in one
process each report that same process.

No ``*_created`` series: prometheus-client adds one per counter and histogram
child unless ``disable_created_metrics()`` is called, and that switch is a
module global, read at every collect, for every registry of the process (other
agents, the host program's own). So the agent filters them out of its own
exposition instead (:class:`WithoutCreated`) and leaves the library's
switch alone.
"""

from __future__ import annotations

import importlib.metadata
import time
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from agent import __version__
from agent.events import Event

# Rows per batched call (dynamic batching, agent/server/batching.py): powers of two.
BATCH_SIZE_BUCKETS = tuple(float(2**i) for i in range(11))
LATENCY_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)

# Which image pull outcome each event of agent/images/pull.py means (one event per pull or import).
PULL_RESULTS = {
    "image.pulled": "pulled",
    "image.imported": "imported",
    "image.offline": "offline",
    "image.refused": "refused",
    "pull.failed": "failed",
}
# The drop-in folder's outcomes (agent/inbox.py): imported and deployed, or moved to inbox/refused/.
DROP_RESULTS = {"inbox.imported": "deployed", "inbox.refused": "refused"}
# The fleet telemetry snapshot keeps the node keys it always had (docs/MQTT.md: cpu_seconds, rss_bytes).
TELEMETRY_NAMES = {
    "process_cpu_seconds": "edge_agent_cpu_seconds",
    "process_resident_memory_bytes": "edge_agent_rss_bytes",
}
CREATED_TYPES = ("counter", "histogram", "summary", "gaugehistogram")


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        labels = ("model", "version")
        self.requests = Counter(
            "edge_agent_inference_requests", "Inference requests served", labels, registry=self.registry
        )
        self.errors = Counter(
            "edge_agent_inference_errors", "Inference requests that failed", (*labels, "kind"), registry=self.registry
        )
        self.latency = Histogram(
            "edge_agent_inference_seconds",
            "Inference latency, model compute and tensor copies",
            labels,
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.batch_queue_depth = Gauge(
            "edge_agent_batch_queue_depth",
            "Requests waiting in a version's dynamic batching queue",
            labels,
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "edge_agent_batch_size",
            "Rows per model call made by dynamic batching",
            labels,
            buckets=BATCH_SIZE_BUCKETS,
            registry=self.registry,
        )
        self.batched_calls = Counter(
            "edge_agent_batched_calls", "Model calls made by dynamic batching", labels, registry=self.registry
        )
        self.swaps = Counter("edge_agent_swaps", "Version switches", ("model",), registry=self.registry)
        self.rollbacks = Counter("edge_agent_rollbacks", "Rollbacks", ("model",), registry=self.registry)
        self.instance_replacements = Counter(
            "edge_agent_instance_replacements",
            "Instances discarded after a trap or timeout",
            labels,
            registry=self.registry,
        )
        self.cache_bytes = Gauge("edge_agent_cache_bytes", "Bytes held in the blob store", registry=self.registry)
        self.loaded_versions = Gauge(
            "edge_agent_loaded_versions", "Model versions loaded and warm", registry=self.registry
        )
        self.image_pulls = Counter(
            "edge_agent_image_pulls",
            "Image pulls and layout imports, by result",
            ("result",),
            registry=self.registry,
        )
        self.image_fetched_bytes = Counter(
            "edge_agent_image_fetched_bytes",
            "Blob bytes written into the store by pulls and imports (blobs already held count nothing)",
            registry=self.registry,
        )
        self.inbox_drops = Counter(
            "edge_agent_inbox_drops", "Drop-in folder entries processed, by result", ("result",), registry=self.registry
        )
        # Every result from the start, at 0: a rate over a series that appears late misses its first increase.
        for result in PULL_RESULTS.values():
            self.image_pulls.labels(result)
        for result in DROP_RESULTS.values():
            self.inbox_drops.labels(result)
        self.build = Info("edge_agent_build", "The agent's build", registry=self.registry)
        self.build.info({"version": __version__, "wasmtime": _wasmtime_version()})
        ProcessCollector(registry=self.registry)
        self.started = time.time()

    def track_instances(self, budget: Any) -> None:
        """Expose the node's instance budget (``agent.runtime.InstanceBudget``: ``live``, ``limit``,
        ``evicted``, ``reaped``), read when scraped."""
        self.registry.register(_InstanceCollector(budget))

    def model_children(self, model: str, version: str) -> tuple[Any, Any]:
        """(requests counter, latency histogram) bound to one version, for the hot path."""
        return self.requests.labels(model, version), self.latency.labels(model, version)

    def observe_event(self, event: Event) -> None:
        """An :class:`agent.events.EventBus` listener: counts pulls and drop-in entries as they finish."""
        if (result := PULL_RESULTS.get(event.kind)) is not None:
            self.image_pulls.labels(result).inc()
            fetched = event.fields.get("fetched_bytes")
            if isinstance(fetched, int) and fetched > 0:
                self.image_fetched_bytes.inc(fetched)
        elif (result := DROP_RESULTS.get(event.kind)) is not None:
            self.inbox_drops.labels(result).inc()

    def exposition(self) -> bytes:
        return generate_latest(WithoutCreated(self.registry))

    def snapshot(self) -> dict[str, Any]:
        """Every sample as plain data, for telemetry messages (process CPU and RSS under their telemetry names)."""
        out: dict[str, Any] = {}
        for family in WithoutCreated(self.registry).collect():
            name = family.name
            if name.startswith("process_") or name == "edge_agent_build":
                if name not in TELEMETRY_NAMES:
                    continue  # the rest of the process collector, and build info, are for Prometheus
                name = TELEMETRY_NAMES[name]
            out[name] = [
                {
                    "name": name + sample.name.removeprefix(family.name),
                    "labels": dict(sample.labels),
                    "value": sample.value,
                }
                for sample in family.samples
            ]
        return out


class WithoutCreated:
    """A view of a registry whose families have no ``*_created`` samples (see the module docstring)."""

    def __init__(self, registry: CollectorRegistry):
        self.registry = registry

    def collect(self) -> Iterator[Metric]:
        for family in self.registry.collect():
            if family.type not in CREATED_TYPES:
                yield family
                continue
            created = family.name + "_created"
            # A copy: the family may be a collector's own object, kept between scrapes.
            copy = Metric(family.name, family.documentation, family.type, family.unit)
            copy.samples = [s for s in family.samples if s.name != created]
            yield copy


class _InstanceCollector:
    """Live wasm instances and why instances were dropped, from the node's instance budget."""

    def __init__(self, budget: Any):
        self.budget = budget

    def collect(self) -> Iterator[Metric]:
        budget = self.budget
        yield GaugeMetricFamily(
            "edge_agent_instances", "Live wasm instances across every model version", value=budget.live
        )
        yield GaugeMetricFamily(
            "edge_agent_max_instances",
            "The node's bound on live instances (max_instances; 0: none)",
            value=budget.limit,
        )
        drops = CounterMetricFamily(
            "edge_agent_instance_drops",
            "Idle instances dropped: evicted for another version's at max_instances, or idle for instance_idle_s",
            labels=("reason",),
        )
        drops.add_metric(("evicted",), budget.evicted)
        drops.add_metric(("idle",), budget.reaped)
        yield drops


def _wasmtime_version() -> str:
    try:
        return importlib.metadata.version("wasmtime")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - vendored copies
        return "unknown"

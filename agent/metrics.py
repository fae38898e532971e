"""Per-agent metrics, kept in a prometheus-client registry of the agent's own.

No default (process-global) registry: the fleet simulator runs hundreds of
agents in one process and each must count only its own requests. The local
API exposes the registry on ``/metrics``; MQTT telemetry snapshots it.
"""

from __future__ import annotations

import os
import resource
import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)


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
        self.rss_bytes = Gauge("edge_agent_rss_bytes", "Resident set size of the agent", registry=self.registry)
        self.cpu_seconds = Gauge("edge_agent_cpu_seconds", "CPU time used by the process", registry=self.registry)
        self.started = time.time()

    def model_children(self, model: str, version: str) -> tuple[Any, Any]:
        """(requests counter, latency histogram) bound to one version, for the hot path."""
        return self.requests.labels(model, version), self.latency.labels(model, version)

    def refresh_process(self) -> None:
        self.rss_bytes.set(current_rss_bytes())
        usage = resource.getrusage(resource.RUSAGE_SELF)
        self.cpu_seconds.set(usage.ru_utime + usage.ru_stime)

    def exposition(self) -> bytes:
        self.refresh_process()
        return generate_latest(self.registry)

    def snapshot(self) -> dict[str, Any]:
        """Every sample as plain data, for telemetry messages."""
        self.refresh_process()
        out: dict[str, Any] = {}
        for family in self.registry.collect():
            samples = []
            for sample in family.samples:
                samples.append({"name": sample.name, "labels": dict(sample.labels), "value": sample.value})
            out[family.name] = samples
        return out


def current_rss_bytes() -> int:
    """Current (not peak) RSS, from /proc; falls back to the peak elsewhere."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

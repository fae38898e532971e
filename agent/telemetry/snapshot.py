"""A telemetry snapshot: the agent's metrics registry, regrouped for a fleet consumer.

Prometheus exposition is one flat list of samples; a fleet dashboard wants
"this model, this version: requests, errors, latency". Families are grouped
generically by their labels, so a metric added to :class:`agent.metrics.Metrics`
later shows up here without a change:

- labels ``model`` + ``version`` -> an entry of ``models`` (other labels, such
  as an error's ``kind``, become a nested object);
- label ``model`` only -> ``per_model[model]`` (swaps, rollbacks);
- no labels -> ``node`` (cache bytes, RSS, CPU seconds, loaded versions).

Every version being served has an entry, with zero counts until its first
request, so "deployed but idle" is told apart from "not deployed".

Counters are totals since the agent started (``uptime_s`` says when); a
consumer derives rates from consecutive snapshots. Histograms keep their
cumulative Prometheus buckets as ``[[le, count], ...]`` with ``"+Inf"`` last.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

from agent.errors import NotFound

if TYPE_CHECKING:
    from agent.cas import BlobStore
    from agent.metrics import Metrics
    from agent.models import ModelManager

PREFIX = "edge_agent_"


class CpuMeter:
    """CPU use between two snapshots, as a percentage of one core."""

    def __init__(self) -> None:
        self._last: tuple[float, float] | None = None

    def percent(self, cpu_seconds: float | None, now: float) -> float | None:
        if cpu_seconds is None:
            return None
        last, self._last = self._last, (cpu_seconds, now)
        if last is None or now <= last[1]:
            return None
        return round(100.0 * (cpu_seconds - last[0]) / (now - last[1]), 2)


def build_snapshot(
    samples: dict[str, list[dict[str, Any]]],
    *,
    started: float,
    gpu: list[dict[str, Any]] | None = None,
    cpu: CpuMeter | None = None,
    serving: Sequence[tuple[str, str]] = (),
    now: float | None = None,
    wasi_nn: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """``samples`` is :meth:`agent.metrics.Metrics.snapshot`; ``serving`` the (model, version) pairs routed;
    ``wasi_nn`` the node's WASI-NN backends (``BackendRegistry.describe``), as ``wasi_nn_backends``."""
    now = time.time() if now is None else now
    models: dict[tuple[str, str], dict[str, Any]] = {}
    for model, version in serving:
        models[(model, version)] = {"model": model, "version": version, "serving": True, "inference_requests": 0}
    per_model: dict[str, dict[str, Any]] = {}
    node: dict[str, Any] = {}
    for family, family_samples in samples.items():
        short = family.removeprefix(PREFIX)
        for sample in family_samples:
            name: str = sample["name"]
            if name.endswith("_created"):
                continue  # creation timestamps of each series: noise for a consumer
            labels = dict(sample["labels"])
            value = sample["value"]
            model, version = labels.pop("model", None), labels.pop("version", None)
            if model is not None and version is not None:
                target = models.setdefault((model, version), {"model": model, "version": version})
            elif model is not None:
                target = per_model.setdefault(model, {})
            else:
                target = node
            _place(target, short, name.removeprefix(PREFIX), labels, value)
    snapshot: dict[str, Any] = {
        "uptime_s": round(now - started, 3),
        "models": [models[key] for key in sorted(models)],
        "per_model": per_model,
        "node": node,
    }
    if cpu is not None:
        percent = cpu.percent(node.get("cpu_seconds"), now)
        if percent is not None:
            node["cpu_percent"] = percent
    if gpu is not None:
        snapshot["gpu"] = gpu
    if wasi_nn is not None:
        snapshot["wasi_nn_backends"] = wasi_nn
    return snapshot


def _place(target: dict[str, Any], family: str, sample: str, labels: dict[str, str], value: float) -> None:
    le = labels.pop("le", None)
    suffix = sample.removeprefix(family)
    if suffix in ("_sum", "_count") or (suffix == "_bucket" and le is not None):
        # A histogram: one object per label set, cumulative buckets in the registry's order.
        hist = target.setdefault(family, {})
        for name in sorted(labels):
            hist = hist.setdefault(labels[name], {})
        if suffix == "_bucket" and le is not None:  # le is set for a bucket (checked above)
            hist.setdefault("buckets", []).append(["+Inf" if le == "+Inf" else float(le), _number(value)])
        else:
            hist[suffix[1:]] = _number(value)
        return
    # Counters arrive as <family>_total, gauges under the family name itself.
    key = family if suffix in ("", "_total") else sample
    if not labels:
        target[key] = _number(value)
        return
    holder = target.setdefault(key, {})
    names = sorted(labels)
    for name in names[:-1]:
        holder = holder.setdefault(labels[name], {})
    holder[labels[names[-1]]] = _number(value)


def _number(value: float) -> float | int:
    return int(value) if float(value).is_integer() else value


class CacheSize(Protocol):
    """What the image cache (``agent.images.service.CacheControl``) tells telemetry."""

    def used_bytes(self) -> int: ...


def node_gauges(
    models: ModelManager, metrics: Metrics, *, cache: CacheSize | None, blobs: BlobStore
) -> list[tuple[str, str]]:
    """Bring the gauges only a walk can know (cache bytes, loaded versions) up to date; return what is served.

    Blocking (it stats the blob store); run it off the event loop.
    """
    serving = [(name, m.version) for name, route in list(models.routes.items()) for m in route.versions()]
    metrics.loaded_versions.set(len(serving))
    metrics.cache_bytes.set(cache_used_bytes(cache, blobs))
    return serving


def cache_used_bytes(cache: CacheSize | None, blobs: BlobStore) -> int:
    """Bytes in the content-addressed store: the image cache's own count when image pulls are on."""
    if cache is not None:
        return int(cache.used_bytes())
    total = 0
    for digest in blobs.digests():
        with contextlib.suppress(OSError, NotFound):  # a blob collected while we count
            total += blobs.size(digest)
    return total

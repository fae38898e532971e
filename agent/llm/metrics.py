"""The language models' series, on the agent's own registry (docs/METRICS.md).

``edge_agent_llm_tokens_generated_total{model,version}``: tokens sampled (a generation cut short
by its client counts only what it sampled: how a test, or an operator, sees that a disconnect
stopped it); ``edge_agent_llm_requests_total{model,version,outcome}`` with outcome ``ok``,
``cancelled`` (the client left), ``rejected`` (429), ``error``; ``edge_agent_llm_running`` and
``edge_agent_llm_waiting`` per version.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

OUTCOMES = ("ok", "cancelled", "rejected", "error")


class LlmMetrics:
    def __init__(self, *, registry: CollectorRegistry):
        labels = ("model", "version")
        self.tokens = Counter(
            "edge_agent_llm_tokens_generated", "Tokens sampled by language models", labels, registry=registry
        )
        self.requests = Counter(
            "edge_agent_llm_requests",
            "Language model requests by outcome (ok, cancelled, rejected, error)",
            (*labels, "outcome"),
            registry=registry,
        )
        self.running = Gauge(
            "edge_agent_llm_running", "Generations running (each holds a llama.cpp context)", labels, registry=registry
        )
        self.waiting = Gauge(
            "edge_agent_llm_waiting", "Language model requests waiting for a generation slot", labels, registry=registry
        )

"""The ``[llm]`` table: how many generations each language model runs at once, and how many wait.

Every key applies to each model on its own (docs/CONFIG.md):

* ``max_concurrency``: generations of one model running at once (1: one llama.cpp context, requests
  take turns); each running one holds a context of ``ctx-size`` tokens, so memory grows with it;
* ``max_queue``: requests of one model waiting for a slot; the next gets 429 (OpenAI's rate-limit
  error), a command app's v2 request 503;
* ``max_messages``, ``max_prompt_chars``, ``max_stop``: bounds on a request body beyond the HTTP
  server's byte limit, so a request cannot make the agent template or tokenize without end;
* ``stream_buffer``: chunks a generation may run ahead of a client that reads slowly; past it the
  worker waits, so a slow reader holds neither memory nor, for long, the worker.

WASI-NN command apps served per v2 request (``agent/llm/command_apps.py``) run on
``command_workers`` threads of their own, each run bounded by ``command_timeout_s`` (generation
takes seconds, so the agent's ``request_timeout_ms`` does not apply; a model's ``timeout_ms``
lowers it) and its output by ``command_max_output_bytes``; their concurrency and queue are
``max_concurrency`` and ``max_queue`` per version too (beyond: 503).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from agent.config import Config, section_values
from agent.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class LlmSettings:
    max_concurrency: int = 1
    max_queue: int = 16
    max_messages: int = 1024
    max_prompt_chars: int = 1 << 20
    max_stop: int = 16
    stream_buffer: int = 64
    command_workers: int = 4
    command_timeout_s: int = 600
    command_max_output_bytes: int = 16 << 20

    # Inclusive bounds of each key.
    BOUNDS = {
        "max_concurrency": (1, 256),
        "max_queue": (0, 65536),
        "max_messages": (1, 1 << 20),
        "max_prompt_chars": (1, 1 << 30),
        "max_stop": (0, 64),
        "stream_buffer": (1, 1 << 16),
        "command_workers": (1, 1024),
        "command_timeout_s": (1, 86400),
        "command_max_output_bytes": (1, 1 << 30),
    }

    @classmethod
    def from_config(cls, config: Config) -> LlmSettings:
        return cls.from_mapping(config.section("llm"))

    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any]) -> LlmSettings:
        settings = cls(**section_values("llm", raw, cls))
        for name, (low, high) in cls.BOUNDS.items():
            value = getattr(settings, name)
            if not low <= value <= high:
                raise ConfigError(f"llm.{name} must be an integer in {low}..{high}, got {value!r}")
        return settings

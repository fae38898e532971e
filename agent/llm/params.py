"""An OpenAI request body, checked field by field, as the arguments of one llama.cpp generation.

``POST /v1/chat/completions`` takes ``messages``; ``POST /v1/completions`` a ``prompt``. Both take
``model``, ``stream``, ``max_tokens`` (or ``max_completion_tokens``), ``temperature``, ``top_p``,
``stop`` (a string or a list), ``seed``, ``presence_penalty``, ``frequency_penalty`` and
llama.cpp's ``repeat_penalty`` and ``top_k``. A field the agent does not use is ignored, as
OpenAI-compatible servers do (clients send ``user``, ``stream_options``...), except those whose
meaning it cannot honour (``n`` above 1, tools, logprobs): those are refused, never dropped silently.

Every refusal is an :class:`InvalidField` naming the field, which the API answers with 400 and
OpenAI's error body.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from agent.llm.options import LlamaOptions
from agent.llm.settings import LlmSettings

ROLES = ("system", "user", "assistant", "developer", "tool")
# Fields whose meaning this server cannot honour: refused rather than ignored.
_UNSUPPORTED = ("tools", "functions", "tool_choice", "function_call", "logprobs", "top_logprobs", "logit_bias")


class InvalidField(ValueError):
    """A request field the API refuses (400); ``param`` names it, as OpenAI's error body does."""

    def __init__(self, param: str | None, message: str):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class GenerationRequest:
    """One request's generation; None fields take the model's defaults (:meth:`llama_kwargs`)."""

    kind: str  # "chat" or "completion"
    model: str
    messages: list[dict[str, str]] = field(default_factory=list)
    prompt: str = ""
    stream: bool = False
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    stop: tuple[str, ...] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repeat_penalty: float | None = None

    def llama_kwargs(self, defaults: LlamaOptions) -> dict[str, Any]:
        """Keyword arguments for ``Llama.create_chat_completion`` / ``create_completion``."""
        kwargs: dict[str, Any] = {
            "max_tokens": self.max_tokens if self.max_tokens is not None else defaults.max_tokens,
            "temperature": self.temperature if self.temperature is not None else defaults.temperature,
            "top_p": self.top_p if self.top_p is not None else defaults.top_p,
            "stop": list(self.stop if self.stop is not None else defaults.stop),
            "seed": self.seed if self.seed is not None else defaults.seed,
            "presence_penalty": _pick(self.presence_penalty, defaults.presence_penalty),
            "frequency_penalty": _pick(self.frequency_penalty, defaults.frequency_penalty),
            "repeat_penalty": _pick(self.repeat_penalty, defaults.repeat_penalty),
        }
        if self.top_k is not None:
            kwargs["top_k"] = self.top_k
        return kwargs


def _pick(value: float | None, default: float) -> float:
    return value if value is not None else default


def parse_chat(doc: Any, settings: LlmSettings) -> GenerationRequest:
    common = _common(doc, settings)
    messages = doc.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidField("messages", "'messages' must be a non-empty list of messages")
    if len(messages) > settings.max_messages:
        raise InvalidField("messages", f"at most {settings.max_messages} messages are accepted, got {len(messages)}")
    out: list[dict[str, str]] = []
    chars = 0
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            raise InvalidField(where, f"{where} must be an object")
        role = message.get("role")
        if role not in ROLES:
            raise InvalidField(f"{where}.role", f"{where}.role must be one of {', '.join(ROLES)}, got {role!r}")
        content = _content(message.get("content"), f"{where}.content")
        chars += len(content)
        entry = {"role": "system" if role == "developer" else role, "content": content}
        name = message.get("name")
        if name is not None:
            if not isinstance(name, str) or len(name) > 256:
                raise InvalidField(f"{where}.name", f"{where}.name must be a string of at most 256 characters")
            entry["name"] = name
        out.append(entry)
    if chars > settings.max_prompt_chars:
        raise InvalidField("messages", f"the messages hold {chars} characters; at most {settings.max_prompt_chars}")
    return GenerationRequest(kind="chat", messages=out, **common)


def parse_completion(doc: Any, settings: LlmSettings) -> GenerationRequest:
    common = _common(doc, settings)
    prompt = doc.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]  # a batch of one, as clients often send it
    if not isinstance(prompt, str):
        raise InvalidField("prompt", "'prompt' must be a string (or a list of one string)")
    if len(prompt) > settings.max_prompt_chars:
        raise InvalidField("prompt", f"the prompt holds {len(prompt)} characters; at most {settings.max_prompt_chars}")
    for name in ("echo", "suffix", "best_of"):
        value = doc.get(name)
        if value not in (None, False, 1, ""):
            raise InvalidField(name, f"'{name}' is not supported by this server")
    return GenerationRequest(kind="completion", prompt=prompt, **common)


def _common(doc: Any, settings: LlmSettings) -> dict[str, Any]:
    if not isinstance(doc, dict):
        raise InvalidField(None, "the request body must be a JSON object")
    model = doc.get("model")
    if not isinstance(model, str) or not model or len(model) > 256:
        raise InvalidField("model", "'model' must name a model (name, or name:version)")
    for name in _UNSUPPORTED:
        value = doc.get(name)
        if value not in (None, False, [], {}):
            raise InvalidField(name, f"'{name}' is not supported by this server")
    n = doc.get("n")
    if n not in (None, 1):
        raise InvalidField("n", "only one choice per request is supported ('n' must be 1)")
    stream = doc.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise InvalidField("stream", "'stream' must be true or false")
    max_tokens = _opt_int(doc, "max_completion_tokens", 1, 1 << 24)
    if max_tokens is None:
        max_tokens = _opt_int(doc, "max_tokens", 1, 1 << 24)
    return {
        "model": model,
        "stream": stream,
        "max_tokens": max_tokens,
        "temperature": _opt_float(doc, "temperature", 0.0, 2.0),
        "top_p": _opt_float(doc, "top_p", 0.0, 1.0),
        "top_k": _opt_int(doc, "top_k", 0, 1 << 20),
        "stop": _stop(doc.get("stop"), settings),
        "seed": _opt_int(doc, "seed", -(2**63), 2**64 - 1, mod=2**32),
        "presence_penalty": _opt_float(doc, "presence_penalty", -2.0, 2.0),
        "frequency_penalty": _opt_float(doc, "frequency_penalty", -2.0, 2.0),
        "repeat_penalty": _opt_float(doc, "repeat_penalty", 0.0, 10.0),
    }


def _content(value: Any, where: str) -> str:
    """A message's content: a string, or OpenAI's list of parts (text parts only); null is empty."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        texts = []
        for index, part in enumerate(value):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                message = f"{where}[{index}] must be a text part (only text is supported)"
                raise InvalidField(f"{where}[{index}]", message)
            texts.append(part["text"])
        return "".join(texts)
    raise InvalidField(where, f"{where} must be a string or a list of text parts")


def _stop(value: Any, settings: LlmSettings) -> tuple[str, ...] | None:
    if value is None:
        return None
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(s, str) and s for s in items):
        raise InvalidField("stop", "'stop' must be a non-empty string or a list of them")
    if len(items) > settings.max_stop:
        raise InvalidField("stop", f"at most {settings.max_stop} stop sequences are accepted, got {len(items)}")
    if any(len(s) > 1024 for s in items):
        raise InvalidField("stop", "a stop sequence may hold at most 1024 characters")
    return tuple(items)


def _opt_int(doc: dict[str, Any], name: str, low: int, high: int, *, mod: int = 0) -> int | None:
    value = doc.get(name)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise InvalidField(name, f"'{name}' must be an integer in {low}..{high}, got {value!r}")
    return value % mod if mod else value


def _opt_float(doc: dict[str, Any], name: str, low: float, high: float) -> float | None:
    value = doc.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InvalidField(name, f"'{name}' must be a number, got {value!r}")
    if not low <= value <= high:
        raise InvalidField(name, f"'{name}' must be in {low:g}..{high:g}, got {value!r}")
    return float(value)

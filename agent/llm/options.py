"""What a language model's ``wasi_nn.config`` says: its llama.cpp context and its sampling defaults.

The keys are WasmEdge's ggml plugin's (the metadata LlamaEdge passes), so a model.json written for
WasmEdge means the same here: ``ctx-size``, ``batch-size``, ``threads``, ``n-gpu-layers``,
``main-gpu``, ``use-mmap`` for the context; ``n-predict``, ``temp``, ``top-p``, ``repeat-penalty``,
``presence-penalty``, ``frequency-penalty``, ``reverse-prompt``, ``seed`` as defaults a request's
own fields override. Other keys (logging, multimodal ones) are WasmEdge's and ignored here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from agent.errors import InvalidModel
from agent.spec import WasiNnSpec

# Tokens of context when the model does not say: enough for a chat, a few MB of KV cache for a small model.
DEFAULT_CTX = 4096
MAX_CTX = 1 << 20
DEFAULT_BATCH = 512
_CTX_PAD = 256


@dataclass(frozen=True)
class LlamaOptions:
    n_ctx: int = DEFAULT_CTX
    n_batch: int = DEFAULT_BATCH
    n_threads: int | None = None  # None: llama.cpp's choice (half the CPUs)
    n_gpu_layers: int = 0
    main_gpu: int = 0
    use_mmap: bool = True
    # Sampling defaults (a request's fields override them); OpenAI's where the model says nothing.
    max_tokens: int | None = None  # None: until the context is full
    temperature: float = 1.0
    top_p: float = 1.0
    repeat_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop: tuple[str, ...] = ()
    seed: int | None = None

    @classmethod
    def from_spec(cls, nn: WasiNnSpec) -> LlamaOptions:
        """Layers go to a GPU as ``n-gpu-layers`` says; without the key, all of them when the model's
        target is ``gpu`` or ``auto``, none for ``cpu`` (the engine puts none there when its llama.cpp
        build has no GPU offload)."""
        config = nn.config
        where = "wasi_nn.config"
        gpu_layers = _int(config, "n-gpu-layers", where, -1, 1 << 20)
        if gpu_layers is None:
            gpu_layers = -1 if nn.target != "cpu" else 0
        if nn.target == "cpu":
            gpu_layers = 0
        stop = config.get("reverse-prompt")
        if stop is not None and not isinstance(stop, str):
            raise InvalidModel(f"{where}.reverse-prompt must be a string")
        use_mmap = config.get("use-mmap", True)
        if not isinstance(use_mmap, bool):
            raise InvalidModel(f"{where}.use-mmap must be true or false")
        n_predict = _int(config, "n-predict", where, -2, 1 << 24)
        return cls(
            n_ctx=_padded(_int(config, "ctx-size", where, 16, MAX_CTX) or DEFAULT_CTX),
            n_batch=_int(config, "batch-size", where, 1, MAX_CTX) or DEFAULT_BATCH,
            n_threads=_int(config, "threads", where, 1, 1024),
            n_gpu_layers=gpu_layers,
            main_gpu=_int(config, "main-gpu", where, 0, 64) or 0,
            use_mmap=use_mmap,
            # WasmEdge: -1 (or -2) is "until the context is full".
            max_tokens=n_predict if n_predict is not None and n_predict > 0 else None,
            temperature=_float(config, "temp", where, 0.0, 2.0, 1.0),
            top_p=_float(config, "top-p", where, 0.0, 1.0, 1.0),
            repeat_penalty=_float(config, "repeat-penalty", where, 0.0, 10.0, 1.0),
            presence_penalty=_float(config, "presence-penalty", where, -2.0, 2.0, 0.0),
            frequency_penalty=_float(config, "frequency-penalty", where, -2.0, 2.0, 0.0),
            stop=(stop,) if stop else (),
            seed=_seed(_int(config, "seed", where, -1, 2**32 - 1)),
        )


def _int(config: dict[str, Any], key: str, where: str, low: int, high: int) -> int | None:
    value = config.get(key)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise InvalidModel(f"{where}.{key} must be an integer in {low}..{high}, got {value!r}")
    return value


def _padded(n_ctx: int) -> int:
    """llama.cpp pads a context to a multiple of 256 tokens; llama-cpp-python (0.3) sizes its token
    buffer from the unpadded number and then overruns it on a prompt between the two (a ValueError
    from NumPy instead of its "exceed context window"). Asked for padded, both agree."""
    return -(-n_ctx // _CTX_PAD) * _CTX_PAD


def _seed(value: int | None) -> int | None:
    return None if value is None or value < 0 else value  # WasmEdge: -1 is a random seed


def _float(config: dict[str, Any], key: str, where: str, low: float, high: float, default: float) -> float:
    value = config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InvalidModel(f"{where}.{key} must be a number, got {value!r}")
    if not low <= value <= high:
        raise InvalidModel(f"{where}.{key} must be in {low:g}..{high:g}, got {value!r}")
    return float(value)

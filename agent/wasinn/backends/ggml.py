"""The ggml backend: llama.cpp (through llama-cpp-python's bindings) for GGUF language models.

It follows WasmEdge's WASI-NN ggml plugin, whose conventions the published
example apps and LlamaEdge rely on:

- the graph config (``load_by_name_with_config``, or builder 1 of ``load``) and
  ``set_input`` index 1 are JSON options: ``ctx-size``, ``batch-size``,
  ``n-predict``, ``temp``, ``top-p``, ``seed``, ``reverse-prompt``,
  ``stream-stdout``, ``embedding``... (:data:`_OPTIONS`); unknown keys are
  ignored, a value of the wrong JSON type is ``invalid_argument``, a body that
  is not JSON ``invalid_encoding``;
- ``set_input`` of any other index is the prompt (UTF-8 bytes), tokenized at once
  with the model's special tokens (so ``get_output(1)`` tells ``input_tokens``
  before ``compute``);
- ``compute`` starts afresh (empty KV cache, sampler reset), evaluates the prompt
  and samples up to ``n-predict`` tokens (-1: until end of generation or a full
  context); ``get_output(0)`` is the text, ``get_output(1)`` JSON metadata
  (``input_tokens``, ``output_tokens``, ``llama_build_number``, ``llama_commit``);
- ``compute_single`` / ``get_output_single`` / ``fini_single`` stream one token a
  call; the end of generation is ``END_OF_SEQUENCE`` (100); a full context
  ``CONTEXT_FULL`` (101); a prompt longer than the context less 4
  ``PROMPT_TOO_LONG`` (102); a named model whose file is missing
  ``MODEL_NOT_FOUND`` (103);
- like WasmEdge, a generated end-of-generation token's text is part of the output.

Sampling is llama.cpp's sampler chain in the order both llama.cpp's common
sampler and llama-cpp-python build it (penalties, top-k, typical, top-p, min-p,
temperature, seeded distribution; temperature 0 is greedy) with WasmEdge's
defaults, so the same settings and seed give the same text as llama-cpp-python.

Graphs (one loaded model each) may be shared by many instances; every execution
context has its own llama.cpp context (KV cache) and sampler.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import logging
import math
import os
import re
import sys
import tempfile
import threading
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Concatenate, ParamSpec, TypeVar

import llama_cpp
import orjson

from agent.wasinn import guest_stdout
from agent.wasinn.abi import Errno, ExecutionTarget, GraphEncoding, NnError
from agent.wasinn.backend import Tensor

log = logging.getLogger(__name__)
_LLAMA_LOG = logging.getLogger("agent.wasinn.llama_cpp")

GGUF_MAGIC = b"GGUF"
DEFAULT_SEED = llama_cpp.LLAMA_DEFAULT_SEED  # 0xFFFFFFFF: a random seed per sampler reset
# Options parsed before the model is known are bounded by this; the graph's own bound follows.
PARSE_MAX_CTX = 1 << 24
# A prompt longer than this many bytes per token of the largest context can never be evaluated;
# refused before tokenizing, which costs tens of bytes of memory per prompt byte (hostile review).
MAX_PROMPT_BYTES_PER_TOKEN = 128
# A grammar, or a JSON schema (which llama-cpp-python's converter turns into one): llama.cpp's parse
# grows with its text; real ones are kilobytes.
MAX_GRAMMAR_BYTES = 1 << 20
# The converter writes a rule out once per repetition a schema asks for (minLength, maxItems, a
# pattern's {m,n}: 10**8 is a 500 MB grammar); their sum bounds what it writes.
MAX_SCHEMA_REPEATS = 1 << 16
_SCHEMA_REPEAT_KEYS = frozenset(
    {"minItems", "maxItems", "minLength", "maxLength", "minProperties", "maxProperties", "minContains", "maxContains"}
)
_QUANTIFIER = re.compile(r"\{\s*(\d+)\s*(?:,\s*(\d*)\s*)?\}")


@llama_cpp.llama_log_callback
def _llama_log(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    # llama.cpp's own chatter (model loading, KV sizes) goes to the debug log, never to the
    # app's stdout/stderr; `enable-log` adds the backend's own lines to stderr, as WasmEdge's do.
    _LLAMA_LOG.debug("%s", text.decode("utf-8", "replace").rstrip("\n"))


@dataclasses.dataclass(frozen=True)
class GgmlOptions:
    """WasmEdge's ggml options (the subset llama-cpp-python can honour), with WasmEdge's defaults."""

    enable_log: bool = False
    enable_debug_log: bool = False
    stream_stdout: bool = False
    n_predict: int = -1
    reverse_prompt: str = ""
    embedding: bool = False
    # The context.
    ctx_size: int = 4096
    batch_size: int = 2048
    ubatch_size: int = 512
    threads: int = 0  # 0: the backend's default
    threads_batch: int = 0
    n_gpu_layers: int = -1  # llama.cpp's default: every layer on the GPU when there is one
    flash_attn: bool = False  # llama-cpp-python's default (llama.cpp's own is "auto")
    # The sampler (llama.cpp's common_params_sampling defaults).
    temp: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    typ_p: float = 1.0
    repeat_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    last_n_penalty: int = 64
    seed: int = DEFAULT_SEED
    ignore_eos: bool = False
    grammar: str = ""

    def context_key(self) -> tuple[Any, ...]:
        return (
            self.ctx_size,
            self.batch_size,
            self.ubatch_size,
            self.threads,
            self.threads_batch,
            self.embedding,
            self.flash_attn,
        )

    def sampler_key(self) -> tuple[Any, ...]:
        return (
            self.temp,
            self.top_k,
            self.top_p,
            self.min_p,
            self.typ_p,
            self.repeat_penalty,
            self.presence_penalty,
            self.frequency_penalty,
            self.last_n_penalty,
            self.seed,
            self.grammar,
        )


# JSON key -> (field, kind). Kinds follow WasmEdge's parser: "int" must be a JSON integer,
# "float" any JSON number, "bool" a JSON boolean, "str" a JSON string.
_OPTIONS: dict[str, tuple[str, str]] = {
    "enable-log": ("enable_log", "bool"),
    "enable-debug-log": ("enable_debug_log", "bool"),
    "stream-stdout": ("stream_stdout", "bool"),
    "n-predict": ("n_predict", "int"),
    "reverse-prompt": ("reverse_prompt", "str"),
    "embedding": ("embedding", "bool"),
    "ctx-size": ("ctx_size", "int"),
    "batch-size": ("batch_size", "int"),
    "ubatch-size": ("ubatch_size", "int"),
    "threads": ("threads", "int"),
    "threads-batch": ("threads_batch", "int"),
    "n-gpu-layers": ("n_gpu_layers", "int"),
    "flash-attn": ("flash_attn", "bool"),
    "temp": ("temp", "float"),
    "top-k": ("top_k", "int"),
    "top-p": ("top_p", "float"),
    "min-p": ("min_p", "float"),
    "typ-p": ("typ_p", "float"),
    "repeat-penalty": ("repeat_penalty", "float"),
    "presence-penalty": ("presence_penalty", "float"),
    "frequency-penalty": ("frequency_penalty", "float"),
    "last-n-penalty": ("last_n_penalty", "int"),
    "seed": ("seed", "int"),
    "ignore-eos": ("ignore_eos", "bool"),
    "grammar": ("grammar", "str"),
    "json-schema": ("grammar", "json-schema"),
}
# WasmEdge features this backend does not have: refused rather than silently ignored.
_UNSUPPORTED = ("mmproj", "image", "tts", "model-vocoder")
# Options that WasmEdge clamps at zero rather than refuses.
_NON_NEGATIVE = {"temp", "top_p", "repeat_penalty", "presence_penalty", "frequency_penalty"}


def parse_options(base: GgmlOptions, raw: bytes | str | dict[str, Any], *, max_ctx_size: int) -> GgmlOptions:
    """``base`` updated by WasmEdge-style JSON options."""
    if isinstance(raw, dict):
        doc: Any = raw
    else:
        try:
            doc = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise NnError(Errno.INVALID_ENCODING, f"ggml options are not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise NnError(Errno.INVALID_ENCODING, "ggml options must be a JSON object")
    for key in _UNSUPPORTED:
        if doc.get(key) not in (None, False, ""):
            raise NnError(Errno.UNSUPPORTED_OPERATION, f"ggml option {key!r} (multimodal/TTS) is not supported here")
    changes: dict[str, Any] = {}
    for key, value in doc.items():
        spec = _OPTIONS.get(key)
        if spec is None:
            continue
        name, kind = spec
        changes[name] = _typed(key, value, kind)
        if name == "grammar" and len(changes[name]) > MAX_GRAMMAR_BYTES * (4 if kind == "json-schema" else 1):
            raise NnError(Errno.INVALID_ARGUMENT, f"ggml option {key!r} makes a grammar of {len(changes[name])} bytes")
    for name in _NON_NEGATIVE:
        if name in changes and changes[name] < 0:
            changes[name] = 0.0
    opts = dataclasses.replace(base, **changes)
    if not 0 <= opts.ctx_size <= max_ctx_size:
        raise NnError(Errno.INVALID_ARGUMENT, f"ctx-size {opts.ctx_size} outside 0..{max_ctx_size}")
    for name in ("batch_size", "ubatch_size"):
        if not 1 <= getattr(opts, name) <= max(max_ctx_size, 1):
            raise NnError(
                Errno.INVALID_ARGUMENT, f"{name.replace('_', '-')} {getattr(opts, name)} outside 1..{max_ctx_size}"
            )
    for name in ("threads", "threads_batch"):
        if not 0 <= getattr(opts, name) <= 1024:
            raise NnError(Errno.INVALID_ARGUMENT, f"{name.replace('_', '-')} {getattr(opts, name)} outside 0..1024")
    return dataclasses.replace(opts, seed=opts.seed & 0xFFFFFFFF)


def _typed(key: str, value: Any, kind: str) -> Any:
    if kind == "bool" and isinstance(value, bool):
        return value
    if kind == "int" and isinstance(value, int) and not isinstance(value, bool):
        if not -(1 << 63) <= value < (1 << 64):
            raise NnError(Errno.INVALID_ARGUMENT, f"ggml option {key!r} is out of range")
        return value
    if kind == "float" and isinstance(value, (int, float)) and not isinstance(value, bool):
        if not math.isfinite(value):
            raise NnError(Errno.INVALID_ARGUMENT, f"ggml option {key!r} is not finite")
        return float(value)
    if kind == "str" and isinstance(value, str):
        return value
    if kind == "json-schema" and isinstance(value, (str, dict)):
        from llama_cpp.llama_grammar import json_schema_to_gbnf

        schema = value if isinstance(value, str) else orjson.dumps(value).decode()
        if len(schema) > MAX_GRAMMAR_BYTES:
            raise NnError(Errno.INVALID_ARGUMENT, f"ggml option 'json-schema' is {len(schema)} bytes")
        try:
            repeats = _schema_repeats(orjson.loads(schema))
        except orjson.JSONDecodeError as exc:
            raise NnError(Errno.INVALID_ARGUMENT, f"ggml option 'json-schema' is not JSON: {exc}") from None
        if repeats > MAX_SCHEMA_REPEATS:
            raise NnError(
                Errno.INVALID_ARGUMENT,
                f"ggml option 'json-schema' asks for {repeats} repetitions (minLength, maxItems, patterns' {{m,n}}...);"
                f" at most {MAX_SCHEMA_REPEATS}",
            )
        try:
            return json_schema_to_gbnf(schema)
        except Exception as exc:  # noqa: BLE001 -- the converter raises assorted errors on a bad schema
            raise NnError(Errno.INVALID_ARGUMENT, f"ggml option 'json-schema': {exc}") from None
    raise NnError(Errno.INVALID_ARGUMENT, f"ggml option {key!r} must be a JSON {kind}, got {value!r:.80}")


def _schema_repeats(schema: Any) -> int:
    """The sum of the repetitions a JSON schema asks for (each is a rule written out that many times)."""
    total, stack = 0, [schema]
    while stack:  # iterative: a schema nests as deep as its JSON (orjson allows 1024 levels)
        node = stack.pop()
        if isinstance(node, dict):
            for key, value in node.items():
                if key in _SCHEMA_REPEAT_KEYS and isinstance(value, int | float) and not isinstance(value, bool):
                    total += max(int(value), 0)
                elif key == "pattern" and isinstance(value, str):
                    for found in _QUANTIFIER.finditer(value):
                        # A number too long to convert cheaply is surely too large.
                        for digits in filter(None, found.groups()):
                            total += int(digits) if len(digits) <= 9 else MAX_SCHEMA_REPEATS + 1
                else:
                    stack.append(value)
        elif isinstance(node, list):
            stack.extend(node)
    return total


class GgmlBackend:
    name = "llama.cpp"
    encoding = GraphEncoding.GGML

    def __init__(self, *, options: dict[str, Any]):
        # Backend options (agent config / `wasi run` flags), none of which a guest can set:
        # threads: llama.cpp threads when a graph sets none (llama-cpp-python's default: half the cores);
        # seed: the sampler seed when a graph sets none (default random, as WasmEdge).
        self._threads = int(options.get("threads", 0)) or max((os.cpu_count() or 2) // 2, 1)
        self._seed = int(options.get("seed", DEFAULT_SEED)) & 0xFFFFFFFF
        # max_ctx_size: the largest ctx-size a guest may ask for (it sizes the KV cache we allocate);
        # by default the model's training context, and at least 8192.
        self._max_ctx_size: int | None = int(options["max_ctx_size"]) if "max_ctx_size" in options else None
        # max_contexts: llama.cpp contexts (each with its KV cache) alive at once per graph.
        self._max_contexts = int(options.get("max_contexts", 32))
        self._gpu = bool(llama_cpp.llama_supports_gpu_offload())
        llama_cpp.llama_backend_init()
        llama_cpp.llama_log_set(_llama_log, ctypes.c_void_p(0))

    def describe(self) -> dict[str, Any]:
        return {
            "version": f"llama-cpp-python {llama_cpp.__version__}",
            "devices": ["cpu"] + (["cuda"] if self._gpu else []),
        }

    def defaults(self) -> GgmlOptions:
        return GgmlOptions(threads=self._threads, threads_batch=self._threads, seed=self._seed)

    def load_bytes(self, builders: Sequence[bytes], target: ExecutionTarget, config: dict[str, Any]) -> GgmlGraph:
        if not 1 <= len(builders) <= 2:
            raise NnError(
                Errno.INVALID_ARGUMENT, f"a ggml graph is the model and optional options, got {len(builders)}"
            )
        opts = self.defaults()
        if config:
            opts = parse_options(opts, config, max_ctx_size=PARSE_MAX_CTX)
        if len(builders) == 2:
            opts = parse_options(opts, builders[1], max_ctx_size=PARSE_MAX_CTX)
        model = builders[0]
        # WasmEdge reads "preload:PATH" as a host path; a guest naming host files is refused here.
        if not model.startswith(GGUF_MAGIC):
            raise NnError(Errno.INVALID_ARGUMENT, "the ggml graph builder is not a GGUF model")
        # llama.cpp loads from a file: a private one, unlinked once loaded (the mapping keeps it).
        with tempfile.TemporaryDirectory(prefix="edge-agent-gguf-") as tmp:
            path = Path(tmp) / "model.gguf"
            path.write_bytes(model)
            return self._load(path, target, opts, config)

    def load_file(self, path: Path, target: ExecutionTarget, config: dict[str, Any]) -> GgmlGraph:
        opts = self.defaults()
        if config:
            opts = parse_options(opts, config, max_ctx_size=PARSE_MAX_CTX)
        if not path.is_file():
            # WasmEdge: a preloaded model whose file is missing is ModelNotFound.
            raise NnError(Errno.MODEL_NOT_FOUND, f"model file {path} not found")
        return self._load(path, target, opts, config)

    def _load(self, path: Path, target: ExecutionTarget, opts: GgmlOptions, config: dict[str, Any]) -> GgmlGraph:
        if target is ExecutionTarget.TPU:
            raise NnError(Errno.UNSUPPORTED_OPERATION, "target tpu is not supported by the llama.cpp backend")
        if target is ExecutionTarget.GPU and not self._gpu:
            raise NnError(Errno.UNSUPPORTED_OPERATION, "target gpu asked, but this llama.cpp has no GPU offload")
        params = llama_cpp.llama_model_default_params()
        n_gpu_layers = 0 if target is ExecutionTarget.CPU or not self._gpu else opts.n_gpu_layers
        params.n_gpu_layers = n_gpu_layers
        # The node's placement (a GPU lease names its device): the whole model on that one GPU.
        device_index = config.get("device_index")
        if isinstance(device_index, int) and not isinstance(device_index, bool) and n_gpu_layers != 0:
            params.main_gpu = device_index
            params.split_mode = llama_cpp.LLAMA_SPLIT_MODE_NONE
        model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
        if not model:
            raise NnError(Errno.INVALID_ARGUMENT, f"llama.cpp cannot load {path.name} as a GGUF model")
        device = f"cuda:{device_index or 0}" if self._gpu and n_gpu_layers != 0 else "cpu"
        graph = GgmlGraph(model=model, options=opts, device=device, max_contexts=self._max_contexts)
        graph.max_ctx_size = self._max_ctx_size or max(graph.n_ctx_train, 8192)
        if opts.ctx_size > graph.max_ctx_size:
            graph.close()
            raise NnError(Errno.INVALID_ARGUMENT, f"ctx-size {opts.ctx_size} is more than {graph.max_ctx_size}")
        return graph


class GgmlGraph:
    backend = "llama.cpp"
    # WasmEdge's ggml get_output copies what fits and reports the whole length; the apps take
    # min(buffer, length) (their buffers are sized for 4096 tokens).
    truncates_output = True

    def __init__(self, *, model: Any, options: GgmlOptions, device: str, max_contexts: int):
        self._model = model
        self.vocab = llama_cpp.llama_model_get_vocab(model)
        self.n_vocab = int(llama_cpp.llama_vocab_n_tokens(self.vocab))
        self.n_ctx_train = int(llama_cpp.llama_model_n_ctx_train(model))
        self.n_embd = int(llama_cpp.llama_model_n_embd(model))
        self.options = options
        self.device = device
        self.max_ctx_size = PARSE_MAX_CTX
        self._max_contexts = max_contexts
        self._live_contexts = 0  # llama.cpp contexts (KV caches) allocated now
        self._lock = threading.Lock()
        self._contexts: weakref.WeakSet[GgmlContext] = weakref.WeakSet()
        # Context calls running now (enter/leave): a graph closed meanwhile (a version unloaded after
        # its drain timed out) is freed by the last of them, never under them.
        self._busy = 0
        self.closed = False

    def enter(self) -> None:
        with self._lock:
            if self.closed:
                raise NnError(Errno.INVALID_ARGUMENT, "the graph was unloaded")
            self._busy += 1

    def leave(self) -> None:
        with self._lock:
            self._busy -= 1
            last = self.closed and self._busy == 0
        if last:
            self._free()

    def init_execution_context(self) -> GgmlContext:
        with self._lock:
            if self.closed:
                raise NnError(Errno.INVALID_ARGUMENT, "the graph was unloaded")
            ctx = GgmlContext(self)
            self._contexts.add(ctx)
        return ctx

    def new_llama_context(self, params: Any) -> Any:
        """A llama.cpp context on this model, counted against ``max_contexts`` (a KV cache each)."""
        with self._lock:
            if self.closed:
                raise NnError(Errno.INVALID_ARGUMENT, "the graph was unloaded")
            if self._live_contexts >= self._max_contexts:
                raise NnError(Errno.BUSY, f"{self._max_contexts} llama.cpp contexts of this model are in use")
            self._live_contexts += 1
        lctx = llama_cpp.llama_init_from_model(self._model, params)
        if not lctx:
            self.free_llama_context(None)
            raise NnError(Errno.RUNTIME_ERROR, f"llama.cpp cannot make a context of {params.n_ctx} tokens")
        return lctx

    def free_llama_context(self, lctx: Any) -> None:
        if lctx is not None:
            llama_cpp.llama_free(lctx)
        with self._lock:
            self._live_contexts -= 1

    def tokenize(self, text: bytes) -> list[int]:
        # A prompt no context of this graph could hold is refused before llama.cpp tokenizes it
        # (its memory grows with the text) and its tokens are never held beyond that bound.
        # The bound allows for llama.cpp padding a context up to a multiple of 256 tokens.
        limit = self.max_ctx_size + 256
        if len(text) > self.max_ctx_size * MAX_PROMPT_BYTES_PER_TOKEN:
            raise NnError(Errno.PROMPT_TOO_LONG, f"the prompt is {len(text)} bytes; no context here holds it")
        # At most one token per byte, plus BOS/EOS.
        room = min(len(text) + 8, limit)
        while True:
            buf = (llama_cpp.llama_token * room)()
            n = llama_cpp.llama_tokenize(self.vocab, text, len(text), buf, room, True, True)
            if n >= 0:
                return list(buf[:n])
            if -n > limit:
                raise NnError(Errno.PROMPT_TOO_LONG, f"the prompt is {-n} tokens; at most {limit} fit a context here")
            room = -n

    def piece(self, token: int) -> bytes:
        # special=True, as WasmEdge's common_token_to_piece renders control tokens.
        room = 64
        while True:
            buf = ctypes.create_string_buffer(room)
            n = llama_cpp.llama_token_to_piece(self.vocab, token, buf, room, 0, True)
            if n >= 0:
                return buf.raw[:n]
            room = -n

    def is_eog(self, token: int) -> bool:
        return bool(llama_cpp.llama_vocab_is_eog(self.vocab, token))

    def close(self) -> None:
        with self._lock:
            if self.closed:
                return
            self.closed = True
            if self._busy:
                return  # the last running call frees it (leave); its generation stops at its next token
        self._free()

    def _free(self) -> None:
        with self._lock:
            contexts = list(self._contexts)
            model, self._model = self._model, None
        if model is None:
            return
        # Contexts first: a llama context must not outlive its model.
        for ctx in contexts:
            ctx.close()
        llama_cpp.llama_model_free(model)


_P = ParamSpec("_P")
_T = TypeVar("_T")


def _in_use(method: Callable[Concatenate[GgmlContext, _P], _T]) -> Callable[Concatenate[GgmlContext, _P], _T]:
    """A WASI-NN call on a context: its graph's model stays alive until the call returns."""

    @functools.wraps(method)
    def call(self: GgmlContext, *args: _P.args, **kwargs: _P.kwargs) -> _T:
        self._graph.enter()
        try:
            return method(self, *args, **kwargs)
        finally:
            self._graph.leave()

    return call


class GgmlContext:
    """One guest execution context: its own llama.cpp context, sampler, prompt and output."""

    def __init__(self, graph: GgmlGraph):
        self._graph = graph
        self.options = graph.options
        self._lctx: Any = None
        self._lctx_key: tuple[Any, ...] | None = None
        self._n_ctx = 0
        self._sampler: Any = None
        self._sampler_key: tuple[Any, ...] | None = None
        self._inputs: list[int] = []
        self._outputs = bytearray()
        self._output_tokens: list[int] = []
        self._n_pos = 0
        self._single_started = False
        self.closed = False
        self._close_lock = threading.Lock()  # closed by its instance, or with its graph on another thread

    # -- logging (enable-log: the backend's own lines on stderr, as WasmEdge prints them) --------
    def _info(self, message: str) -> None:
        log.debug("ggml: %s", message)
        if self.options.enable_log:
            print(f"[WASI-NN] GGML backend: {message}", file=sys.stderr, flush=True)

    # -- llama.cpp resources ----------------------------------------------------------------
    def _context(self) -> Any:
        opts = self.options
        key = opts.context_key()
        if self._lctx is not None and self._lctx_key == key:
            return self._lctx
        self._free_context()
        params = llama_cpp.llama_context_default_params()
        # 0: the trained context (WasmEdge), within the node's bound on the KV cache a guest may make.
        params.n_ctx = opts.ctx_size or min(self._graph.n_ctx_train, self._graph.max_ctx_size)
        params.n_batch = opts.batch_size
        # An embedding is computed in one micro-batch (as llama.cpp's embedding example sizes it):
        # a non-causal model asserts (abort) on a decode larger than its micro-batch.
        params.n_ubatch = opts.batch_size if opts.embedding else min(opts.ubatch_size, opts.batch_size)
        params.n_threads = opts.threads
        params.n_threads_batch = opts.threads_batch or opts.threads
        params.embeddings = opts.embedding
        params.flash_attn_type = (
            llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED if opts.flash_attn else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        )
        lctx = self._graph.new_llama_context(params)
        self._lctx, self._lctx_key = lctx, key
        self._n_ctx = int(llama_cpp.llama_n_ctx(lctx))
        self._n_pos = 0
        return lctx

    def _sampler_chain(self) -> Any:
        opts = self.options
        key = opts.sampler_key()
        if self._sampler is not None and self._sampler_key == key:
            return self._sampler
        self._free_sampler()
        chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
        add = llama_cpp.llama_sampler_chain_add
        add(
            chain,
            llama_cpp.llama_sampler_init_penalties(
                self._graph.n_vocab,
                # llama.cpp allocates this window at once (2**31 tokens: 8 GiB); none can outgrow the context.
                min(opts.last_n_penalty, self._n_ctx),
                opts.repeat_penalty,
                opts.frequency_penalty,
                opts.presence_penalty,
            ),
        )
        if opts.grammar:
            grammar = llama_cpp.llama_sampler_init_grammar(self._graph.vocab, opts.grammar.encode(), b"root")
            if not grammar:
                llama_cpp.llama_sampler_free(chain)
                raise NnError(Errno.INVALID_ARGUMENT, "the grammar does not parse")
            add(chain, grammar)
        if opts.temp == 0.0:
            add(chain, llama_cpp.llama_sampler_init_greedy())
        else:
            add(chain, llama_cpp.llama_sampler_init_top_k(opts.top_k))
            add(chain, llama_cpp.llama_sampler_init_typical(opts.typ_p, 1))
            add(chain, llama_cpp.llama_sampler_init_top_p(opts.top_p, 1))
            add(chain, llama_cpp.llama_sampler_init_min_p(opts.min_p, 1))
            add(chain, llama_cpp.llama_sampler_init_temp(opts.temp))
            add(chain, llama_cpp.llama_sampler_init_dist(opts.seed))
        self._sampler, self._sampler_key = chain, key
        return chain

    def _free_context(self) -> None:
        if self._lctx is not None:
            self._graph.free_llama_context(self._lctx)
            self._lctx = None
            self._lctx_key = None

    def _free_sampler(self) -> None:
        if self._sampler is not None:
            llama_cpp.llama_sampler_free(self._sampler)
            self._sampler = None
            self._sampler_key = None

    def _clear(self) -> None:
        """WasmEdge's clearContext: empty KV cache, sampler reset, no output yet."""
        lctx = self._context()
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(lctx), True)
        llama_cpp.llama_sampler_reset(self._sampler_chain())
        self._n_pos = 0
        self._outputs.clear()
        self._output_tokens.clear()

    def _evaluate(self, tokens: Sequence[int]) -> None:
        if self._n_pos + len(tokens) > self._n_ctx:
            self._info(f"the context is full ({self._n_pos + len(tokens)} / {self._n_ctx} tokens)")
            raise NnError(Errno.CONTEXT_FULL, f"context full ({self._n_pos + len(tokens)} > {self._n_ctx} tokens)")
        # llama.cpp clamps its batch to the ctx-size asked for (and a non-causal model's to its
        # micro-batch) and asserts -- abort() -- on a larger decode: pieces of its own micro-batch.
        step = int(llama_cpp.llama_n_ubatch(self._lctx))
        for start in range(0, len(tokens), step):
            chunk = tokens[start : start + step]
            arr = (llama_cpp.llama_token * len(chunk))(*chunk)
            status = llama_cpp.llama_decode(self._lctx, llama_cpp.llama_batch_get_one(arr, len(chunk)))
            if status != 0:
                raise NnError(Errno.RUNTIME_ERROR, f"llama_decode failed ({status})")
            self._n_pos += len(chunk)

    def _evaluate_input(self) -> None:
        if not self._inputs:
            raise NnError(Errno.INVALID_ARGUMENT, "no prompt set before compute")
        limit = self._n_ctx - 4  # WasmEdge keeps 4 tokens for special tokens
        if len(self._inputs) > limit:
            raise NnError(Errno.PROMPT_TOO_LONG, f"the prompt is {len(self._inputs)} tokens; at most {limit}")
        self._evaluate(self._inputs)

    def _sample(self, single: bool) -> None:
        """One token: sample, append its text, stop on reverse prompt or end of generation, evaluate it."""
        graph = self._graph
        if graph.closed:
            raise NnError(Errno.INVALID_ARGUMENT, "the graph was unloaded")
        token = int(llama_cpp.llama_sampler_sample(self._sampler_chain(), self._lctx, -1))  # also accepts it
        self._output_tokens.append(token)
        piece = graph.piece(token)
        self._outputs += piece
        if not single:
            if self.options.stream_stdout:
                guest_stdout.write(piece)
            if self.options.reverse_prompt and self.options.reverse_prompt.encode() in self._outputs:
                self._info("reverse prompt found")
                raise NnError(Errno.END_OF_SEQUENCE, "reverse prompt found")
        if not self.options.ignore_eos and graph.is_eog(token):
            self._info("EOS token found")
            raise NnError(Errno.END_OF_SEQUENCE, "end of generation")
        self._evaluate([token])

    # -- the WASI-NN calls ----------------------------------------------------------------------
    @_in_use
    def set_input(self, index: int, tensor: Tensor) -> None:
        self._check_open()
        if index == 1:
            self.options = parse_options(self.options, tensor.data, max_ctx_size=self._graph.max_ctx_size)
            return
        # Any other index is the prompt (WasmEdge reads every index but 1 so).
        self._inputs = self._graph.tokenize(tensor.data)
        if self._lctx is not None:
            llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self._lctx), True)
            self._n_pos = 0
        self._single_started = False

    @_in_use
    def compute(self) -> None:
        self._check_open()
        self._clear()
        if self.options.embedding:
            self._embed()
            return
        self._evaluate_input()
        remaining = self.options.n_predict if self.options.n_predict >= 0 else math.inf
        try:
            while remaining > 0:
                remaining -= 1
                self._sample(single=False)
        except NnError as exc:
            if exc.errno != Errno.END_OF_SEQUENCE:
                raise

    def _embed(self) -> None:
        batch = min(self.options.batch_size, int(llama_cpp.llama_n_ubatch(self._lctx)))
        if len(self._inputs) > batch:
            raise NnError(
                Errno.PROMPT_TOO_LONG,
                f"the input is {len(self._inputs)} tokens, more than batch-size {batch}",
            )
        self._evaluate_input()
        n = self._graph.n_embd
        ptr = llama_cpp.llama_get_embeddings_seq(self._lctx, 0)
        if not ptr:
            ptr = llama_cpp.llama_get_embeddings_ith(self._lctx, -1)
        if not ptr:
            raise NnError(Errno.RUNTIME_ERROR, "llama.cpp returned no embedding")
        values = [float(ptr[i]) for i in range(n)]
        # WasmEdge's default normalisation: Euclidean (common_embd_normalize with 2).
        norm = math.sqrt(sum(v * v for v in values))
        scale = 1.0 / norm if norm > 0 else 0.0
        body = ",".join(format(v * scale, ".10g") for v in values)
        self._outputs = bytearray(f'{{"n_embedding": {n}, "embedding": [{body}]}}'.encode())

    @_in_use
    def get_output(self, index: int) -> bytes:
        self._check_open()
        if index == 1:
            return self._metadata()
        return bytes(self._outputs)

    @_in_use
    def compute_single(self) -> None:
        self._check_open()
        try:
            if not self._single_started:
                self._single_started = True
                self._clear()
                self._evaluate_input()
            self._sample(single=True)
        except NnError:
            self._single_started = False
            raise

    @_in_use
    def get_output_single(self, index: int) -> bytes:
        self._check_open()
        if index == 1:
            return self._metadata()
        if not self._output_tokens:
            return b""
        return self._graph.piece(self._output_tokens[-1])

    @_in_use
    def fini_single(self) -> None:
        self._check_open()
        self._outputs.clear()
        self._output_tokens.clear()
        if self._sampler is not None:
            llama_cpp.llama_sampler_reset(self._sampler)
        self._single_started = False
        self._n_pos = 0

    def _metadata(self) -> bytes:
        return orjson.dumps(
            {
                "input_tokens": len(self._inputs),
                "output_tokens": len(self._output_tokens),
                "llama_build_number": 0,
                "llama_commit": llama_cpp.llama_version().decode(errors="replace"),
            }
        )

    def _check_open(self) -> None:
        if self.closed:
            raise NnError(Errno.INVALID_ARGUMENT, "the execution context was closed with its graph")

    def close(self) -> None:
        with self._close_lock:
            if self.closed:
                return
            self.closed = True
        self._free_sampler()
        self._free_context()
        self._inputs = []
        self._outputs.clear()
        self._output_tokens.clear()

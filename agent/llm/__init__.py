"""Language models served on an OpenAI-compatible API, and WASI-NN command apps served per request.

A WASI-NN model whose ``wasi_nn.encoding`` is ``ggml`` is a language model: its
weights blob is a GGUF file, which llama.cpp (llama-cpp-python) maps and runs.

- ``settings``: the ``[llm]`` table (per-model concurrency and queue, request bounds);
- ``options``: what ``wasi_nn.config`` says about a model's context and sampling defaults;
- ``params``: an OpenAI request body checked and turned into one generation's arguments;
- ``admission``: each model's concurrency limit and bounded queue (beyond it: 429);
- ``channel``: the bounded hand-off of streamed chunks from a worker thread to the event loop;
- ``engine``: one version's llama.cpp contexts, made lazily, generation on worker threads,
  stopped at the next token when its client goes away;
- ``metrics``: the ``edge_agent_llm_*`` series;
- ``service``: the engines of the loaded versions (closed with them) and the one way to run a generation;
- ``command_apps``: a command app (``wasi_nn.app == "command"``) run per v2 request on its prompt.

Nothing here imports llama_cpp until a language model is first used.
"""

from __future__ import annotations

from agent.spec import ModelSpec


def is_llm(spec: ModelSpec) -> bool:
    """A language model: a WASI-NN model whose weights are a GGUF file for the ggml (llama.cpp) backend."""
    return spec.wasi_nn is not None and spec.wasi_nn.encoding == "ggml"


def is_command_app(spec: ModelSpec) -> bool:
    """A WASI command app (WasmEdge's example apps), run once per request with the prompt as its last argument."""
    return spec.wasi_nn is not None and spec.wasi_nn.app == "command"

"""WASI-NN (``wasi_ephemeral_nn``, the preview1 witx ABI): the agent as a WASI-NN host.

- ``abi``: the spec's numbers (encodings, targets, tensor types, errnos incl. WasmEdge's), struct
  layouts, bounds-checked guest memory access;
- ``backend``: the backend/graph/context protocols, discovery and the registry, named models;
- ``host``: the host functions, one ``NnHost`` per wasm instance;
- ``backends/``: onnxruntime, llama.cpp (ggml), TorchScript.
"""

"""A language model served by a real agent, for tests: a tiny GGUF (tests/ggufkit.py) behind a WASI
command app (WAT, below), imported as a WASI-NN ggml model directory.

The app is what WasmEdge's ggml example apps are, reduced: ``app.wasm [CONFIG_JSON] PROMPT``. It
loads the named model ``default`` (``load_by_name_with_config`` with ``CONFIG_JSON`` when given),
sets the prompt (its last argument) as input 0 (U8 bytes), computes, and writes output 0 to stdout.
Exit codes: 2 no prompt, 3 arguments too large, 10 + errno a failed WASI-NN call.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import wasmtime
from ggufkit import make_tiny_llama

# Memory layout of the app (one 4 MiB memory).
_ARGV = 16  # argv pointers, at most 64
_NAME = 512  # "default"
_GRAPH, _CTX, _WRITTEN = 600, 604, 608
_DIMS, _TENSOR, _IOV, _NWRITTEN = 640, 672, 700, 720
_ARGBUF, _ARGBUF_MAX = 65536, 1 << 20
_OUT, _OUT_MAX = 2 << 20, 1 << 20

COMMAND_APP_WAT = f"""
(module
  (import "wasi_snapshot_preview1" "args_sizes_get" (func $args_sizes_get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "args_get" (func $args_get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "proc_exit" (func $proc_exit (param i32)))
  (import "wasi_ephemeral_nn" "load_by_name" (func $load_by_name (param i32 i32 i32) (result i32)))
  (import "wasi_ephemeral_nn" "load_by_name_with_config"
    (func $load_by_name_with_config (param i32 i32 i32 i32 i32) (result i32)))
  (import "wasi_ephemeral_nn" "init_execution_context" (func $init_ctx (param i32 i32) (result i32)))
  (import "wasi_ephemeral_nn" "set_input" (func $set_input (param i32 i32 i32) (result i32)))
  (import "wasi_ephemeral_nn" "compute" (func $compute (param i32) (result i32)))
  (import "wasi_ephemeral_nn" "get_output" (func $get_output (param i32 i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 64)
  (data (i32.const {_NAME}) "default")
  (func $strlen (param $p i32) (result i32)
    (local $n i32)
    (block $done
      (loop $next
        (br_if $done (i32.eqz (i32.load8_u (i32.add (local.get $p) (local.get $n)))))
        (local.set $n (i32.add (local.get $n) (i32.const 1)))
        (br $next)))
    (local.get $n))
  (func $check (param $errno i32)
    (if (local.get $errno) (then (call $proc_exit (i32.add (i32.const 10) (local.get $errno))))))
  (func (export "_start")
    (local $argc i32) (local $prompt i32) (local $config i32)
    (call $check (call $args_sizes_get (i32.const 0) (i32.const 4)))
    (local.set $argc (i32.load (i32.const 0)))
    (if (i32.lt_u (local.get $argc) (i32.const 2)) (then (call $proc_exit (i32.const 2))))
    (if (i32.or (i32.gt_u (local.get $argc) (i32.const 64))
                (i32.gt_u (i32.load (i32.const 4)) (i32.const {_ARGBUF_MAX})))
      (then (call $proc_exit (i32.const 3))))
    (call $check (call $args_get (i32.const {_ARGV}) (i32.const {_ARGBUF})))
    (local.set $prompt
      (i32.load (i32.add (i32.const {_ARGV}) (i32.mul (i32.sub (local.get $argc) (i32.const 1)) (i32.const 4)))))
    (if (i32.ge_u (local.get $argc) (i32.const 3))
      (then
        (local.set $config (i32.load (i32.const {_ARGV + 4})))
        (call $check (call $load_by_name_with_config (i32.const {_NAME}) (i32.const 7)
          (local.get $config) (call $strlen (local.get $config)) (i32.const {_GRAPH}))))
      (else
        (call $check (call $load_by_name (i32.const {_NAME}) (i32.const 7) (i32.const {_GRAPH})))))
    (call $check (call $init_ctx (i32.load (i32.const {_GRAPH})) (i32.const {_CTX})))
    (i32.store (i32.const {_DIMS}) (call $strlen (local.get $prompt)))
    (i32.store (i32.const {_TENSOR}) (i32.const {_DIMS}))
    (i32.store (i32.const {_TENSOR + 4}) (i32.const 1))
    (i32.store (i32.const {_TENSOR + 8}) (i32.const 3))
    (i32.store (i32.const {_TENSOR + 12}) (local.get $prompt))
    (i32.store (i32.const {_TENSOR + 16}) (i32.load (i32.const {_DIMS})))
    (call $check (call $set_input (i32.load (i32.const {_CTX})) (i32.const 0) (i32.const {_TENSOR})))
    (call $check (call $compute (i32.load (i32.const {_CTX}))))
    (call $check (call $get_output (i32.load (i32.const {_CTX})) (i32.const 0)
      (i32.const {_OUT}) (i32.const {_OUT_MAX}) (i32.const {_WRITTEN})))
    (i32.store (i32.const {_IOV}) (i32.const {_OUT}))
    (i32.store (i32.const {_IOV + 4}) (i32.load (i32.const {_WRITTEN})))
    (call $check (call $fd_write (i32.const 1) (i32.const {_IOV}) (i32.const 1) (i32.const {_NWRITTEN})))))
"""


def command_app_wasm() -> bytes:
    return wasmtime.wat2wasm(COMMAND_APP_WAT)


def llm_model_dir(
    path: Path,
    *,
    name: str = "tinychat",
    version: str = "1",
    seed: int = 0,
    ctx_size: int = 8192,
    args: tuple[str, ...] = (),
    config: dict[str, Any] | None = None,
    gguf: Path | None = None,
    app: Path | None = None,
    eos_bias: bool = False,
    env: dict[str, str] | None = None,
) -> Path:
    """A WASI-NN ggml model directory: model.json, the command app (ours, or ``app``'s bytes: one of
    WasmEdge's example apps), the tiny GGUF (made, with ``eos_bias`` as ggufkit has it, or ``gguf``'s bytes)."""
    path.mkdir(parents=True, exist_ok=True)
    weights = path / "model.gguf"
    if gguf is None:
        make_tiny_llama(weights, seed=seed, eos_bias=eos_bias)
    else:
        weights.write_bytes(gguf.read_bytes())
    (path / "app.wasm").write_bytes(command_app_wasm() if app is None else app.read_bytes())
    doc = {
        "schema": "edge-agent.model/v1",
        "name": name,
        "version": version,
        "abi_version": 1,
        "max_batch": 1,
        "inputs": [{"name": "prompt", "datatype": "BYTES", "shape": [-1]}],
        "outputs": [{"name": "text", "datatype": "BYTES", "shape": [-1]}],
        "params": [],
        "files": {"module": "app.wasm", "weights": "model.gguf"},
        "wasi_nn": {
            "encoding": "ggml",
            "target": "cpu",
            "name": "default",
            "app": "command",
            "args": list(args),
            "config": {"ctx-size": ctx_size, **(config or {})},
            **({"env": env} if env else {}),
        },
    }
    (path / "model.json").write_text(json.dumps(doc, indent=2))
    return path

"""Builds small ABI v1 model directories from WAT for tests.

The ``scale`` model computes ``y = x * scale`` for FP32 rows of 4, and
misbehaves on purpose when the first input element is a magic value, so
tests can drive every failure mode through the real runtime:
``-1`` loops forever, ``13`` traps (unreachable), ``99`` grows memory until
the store limit refuses and returns EA_ERR_NOMEM, ``7`` spins ~30M iterations
(tens of milliseconds) and then answers normally: a slow but healthy request;
``8`` does the same for ~400M iterations (most of a second): a slow warm-up.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import safetensors.numpy
import wasmtime

SCALE_WAT = """
(module
  (memory (export "memory") 1)
  (global $heap (mut i32) (i32.const 1024))
  (global $scale (mut i32) (i32.const 0))
  (global $ready (mut i32) (i32.const 0))
  (func (export "ea_abi_version") (result i32) (i32.const ABI))
  (func (export "ea_max_batch") (result i32) (i32.const 8))
  (func (export "ea_alloc") (param $n i32) (result i32)
    (local $p i32) (local $end i32) (local $have i32)
    (local.set $p (i32.and (i32.add (global.get $heap) (i32.const 15)) (i32.const -16)))
    (local.set $end (i32.add (local.get $p) (local.get $n)))
    (local.set $have (i32.mul (memory.size) (i32.const 65536)))
    (if (i32.gt_u (local.get $end) (local.get $have))
      (then
        (if (i32.eq
              (memory.grow (i32.shr_u (i32.add (i32.sub (local.get $end) (local.get $have)) (i32.const 65535))
                                      (i32.const 16)))
              (i32.const -1))
          (then (return (i32.const 0))))))
    (global.set $heap (local.get $end))
    (local.get $p))
  (func (export "ea_init") (param $t i32) (param $c i32) (result i32)
    (if (i32.ne (local.get $c) (i32.const 1)) (then (return (i32.const -2))))
    (if (i32.ne (i32.load offset=4 (local.get $t)) (i32.const 16)) (then (return (i32.const -2))))
    (global.set $scale (i32.load (local.get $t)))
    (global.set $ready (i32.const 1))
    (i32.const 0))
  (func (export "ea_input") (param i32) (result i32)
    (if (result i32) (local.get 0) (then (i32.const 0)) (else (i32.const 256))))
  (func (export "ea_output") (param i32) (result i32)
    (if (result i32) (local.get 0) (then (i32.const 0)) (else (i32.const 512))))
  (func (export "ea_run") (param $b i32) (result i32)
    (local $i i32) (local $x f32)
    (if (i32.eqz (global.get $ready)) (then (return (i32.const -5))))
    (if (i32.or (i32.lt_s (local.get $b) (i32.const 1)) (i32.gt_s (local.get $b) (i32.const 8)))
      (then (return (i32.const -1))))
    (local.set $x (f32.load (i32.const 256)))
    (if (f32.eq (local.get $x) (f32.const -1)) (then (loop $spin (br $spin))))
    (if (f32.eq (local.get $x) (f32.const 13)) (then unreachable))
    (if (f32.eq (local.get $x) (f32.const 7))
      (then
        (local.set $i (i32.const 30000000))
        (loop $slow (local.set $i (i32.sub (local.get $i) (i32.const 1))) (br_if $slow (local.get $i)))))
    (if (f32.eq (local.get $x) (f32.const 8))
      (then
        (local.set $i (i32.const 400000000))
        (loop $slower (local.set $i (i32.sub (local.get $i) (i32.const 1))) (br_if $slower (local.get $i)))))
    (if (f32.eq (local.get $x) (f32.const 99))
      (then
        (loop $grow (br_if $grow (i32.ne (memory.grow (i32.const 16)) (i32.const -1))))
        (return (i32.const -3))))
    (loop $row
      (f32.store offset=512 (local.get $i)
        (f32.mul (f32.load offset=256 (local.get $i))
                 (f32.load (i32.add (global.get $scale) (i32.and (local.get $i) (i32.const 15))))))
      (local.set $i (i32.add (local.get $i) (i32.const 4)))
      (br_if $row (i32.lt_u (local.get $i) (i32.mul (local.get $b) (i32.const 16)))))
    (i32.const 0))
)
"""


def scale_wasm(abi: int = 1) -> bytes:
    return wasmtime.wat2wasm(SCALE_WAT.replace("(i32.const ABI)", f"(i32.const {abi})"))


def make_scale_model(
    directory: Path,
    name: str = "scale",
    version: str = "1",
    scale: tuple[float, float, float, float] = (1.0, 2.0, 3.0, 4.0),
    golden: bool = True,
    golden_override: list[float] | None = None,
    warmup_x: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0),
    abi: int = 1,
    memory_limit_mb: int = 4,
    timeout_ms: int = 200,
    wasm: bytes | None = None,
) -> Path:
    """Write model.json, model.wasm and weights.safetensors into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    scale_arr = np.asarray(scale, dtype=np.float32)
    x = np.asarray([warmup_x], dtype=np.float32)
    warmup: dict = {"inputs": {"x": {"shape": [1, 4], "data": x.ravel().tolist()}}}
    if golden:
        y = golden_override if golden_override is not None else (x * scale_arr).ravel().tolist()
        warmup["outputs"] = {"y": {"shape": [1, 4], "data": y}}
    meta = {
        "schema": "edge-agent.model/v1",
        "name": name,
        "version": version,
        "abi_version": 1,
        "max_batch": 8,
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}],
        "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 4]}],
        "params": [{"name": "scale", "datatype": "FP32", "shape": [4]}],
        "warmup": warmup,
        "resources": {"memory_limit_mb": memory_limit_mb, "timeout_ms": timeout_ms},
        "description": "test model: y = x * scale",
    }
    (directory / "model.json").write_text(json.dumps(meta, indent=1))
    (directory / "model.wasm").write_bytes(wasm if wasm is not None else scale_wasm(abi))
    safetensors.numpy.save_file({"scale": scale_arr}, str(directory / "weights.safetensors"))
    return directory

"""The bundled ``digits`` model and the native kernels, driven through plain wasmtime.

The loader here follows docs/MODEL_ABI.md step by step on purpose, independent of
``agent.runtime``: these tests pin the module's side of the contract, so a bug in the
host cannot hide a bug in the module (or the other way round).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import safetensors.numpy
import wasmtime

REPO = Path(__file__).resolve().parent.parent
NATIVE = REPO / "native"
BUNDLED = REPO / "agent" / "bundled" / "digits"

sys.path.insert(0, str(NATIVE / "models"))
from digits_reference import reference  # noqa: E402
from train_digits import load_split  # noqa: E402

ABI_EXPORTS = {"ea_abi_version", "ea_max_batch", "ea_alloc", "ea_init", "ea_input", "ea_output", "ea_run"}
EA_OK, EA_ERR_BATCH, EA_ERR_PARAMS, EA_ERR_STATE = 0, -1, -2, -5
NUMPY_DTYPES = {"FP32": np.float32, "INT64": np.int64}
# One engine for every module and store here: wasmtime requires stores and modules to share it.
ENGINE = wasmtime.Engine()


# --------------------------------------------------------------------------- loader


class Instance:
    """One instantiated module with typed helpers over its exports and memory."""

    def __init__(self, module: wasmtime.Module, memory_limit: int | None = None):
        self.store = wasmtime.Store(ENGINE)
        if memory_limit is not None:
            self.store.set_limits(memory_size=memory_limit)
        exports = wasmtime.Instance(self.store, module, []).exports(self.store)
        memory = exports["memory"]
        assert isinstance(memory, wasmtime.Memory)
        self.memory = memory
        self.exports = exports

    def call(self, name: str, *args: int) -> int:
        func = self.exports[name]
        assert isinstance(func, wasmtime.Func)
        return func(self.store, *args)

    def write(self, offset: int, data: bytes) -> None:
        self.memory.write(self.store, data, offset)

    def read(self, offset: int, nbytes: int) -> bytes:
        return bytes(self.memory.read(self.store, offset, offset + nbytes))


class Model:
    """An instance loaded per the ABI loading sequence, steps 1-4."""

    def __init__(self, module: wasmtime.Module, meta: dict[str, Any], weights: dict[str, np.ndarray]):
        self.meta = meta
        self.inst = Instance(module)
        assert self.inst.call("ea_abi_version") == 1
        assert self.inst.call("ea_max_batch") == meta["max_batch"]
        status = init_params(self.inst, [weights[p["name"]].tobytes() for p in meta["params"]])
        assert status == EA_OK
        self.inputs = [self.inst.call("ea_input", i) for i in range(len(meta["inputs"]))]
        self.outputs = [self.inst.call("ea_output", i) for i in range(len(meta["outputs"]))]
        assert all(self.inputs) and all(self.outputs)

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        batch = len(next(iter(inputs.values())))
        for spec, offset in zip(self.meta["inputs"], self.inputs, strict=True):
            data = np.ascontiguousarray(inputs[spec["name"]], dtype=NUMPY_DTYPES[spec["datatype"]])
            self.inst.write(offset, data.astype(data.dtype.newbyteorder("<")).tobytes())
        status = self.inst.call("ea_run", batch)
        assert status == EA_OK, status
        results = {}
        for spec, offset in zip(self.meta["outputs"], self.outputs, strict=True):
            dtype = np.dtype(NUMPY_DTYPES[spec["datatype"]]).newbyteorder("<")
            shape = [batch, *spec["shape"][1:]]
            raw = self.inst.read(offset, int(np.prod(shape)) * dtype.itemsize)
            results[spec["name"]] = np.frombuffer(raw, dtype=dtype).reshape(shape)
        return results


def init_params(inst: Instance, tensors: list[bytes]) -> int:
    """Steps 2-3: copy each tensor into ea_alloc'd memory, write the table, call ea_init."""
    table = []
    for data in tensors:
        ptr = inst.call("ea_alloc", len(data))
        assert ptr != 0 and ptr % 16 == 0
        inst.write(ptr, data)
        table.append((ptr, len(data)))
    table_ptr = inst.call("ea_alloc", 8 * max(len(table), 1))
    inst.write(table_ptr, np.array(table, dtype="<u4").tobytes())
    return inst.call("ea_init", table_ptr, len(table))


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def meta() -> dict[str, Any]:
    return json.loads((BUNDLED / "model.json").read_text())


@pytest.fixture(scope="module")
def weights() -> dict[str, np.ndarray]:
    return safetensors.numpy.load_file(str(BUNDLED / "weights.safetensors"))


@pytest.fixture(scope="module")
def module() -> wasmtime.Module:
    return wasmtime.Module.from_file(ENGINE, str(BUNDLED / "model.wasm"))


@pytest.fixture
def model(module: wasmtime.Module, meta: dict[str, Any], weights: dict[str, np.ndarray]) -> Model:
    return Model(module, meta, weights)


@pytest.fixture(scope="module")
def held_out() -> tuple[np.ndarray, np.ndarray]:
    _, x_test, _, y_test = load_split()
    return x_test, y_test


def batches(x: np.ndarray, size: int) -> Iterator[np.ndarray]:
    for start in range(0, len(x), size):
        yield x[start : start + size]


# --------------------------------------------------------------------------- interface


def test_exports_imports_and_version(module: wasmtime.Module, meta: dict[str, Any]) -> None:
    assert module.imports == []
    exports = {e.name: e.type for e in module.exports}
    assert set(exports) == ABI_EXPORTS | {"memory"}
    assert isinstance(exports["memory"], wasmtime.MemoryType)
    for name in ABI_EXPORTS:
        functype = exports[name]
        assert isinstance(functype, wasmtime.FuncType)
        n_params = {"ea_alloc": 1, "ea_init": 2, "ea_input": 1, "ea_output": 1, "ea_run": 1}.get(name, 0)
        assert [str(t) for t in functype.params] == ["i32"] * n_params, name
        assert [str(t) for t in functype.results] == ["i32"], name
    inst = Instance(module)
    assert inst.call("ea_abi_version") == 1 == meta["abi_version"]
    assert inst.call("ea_max_batch") == meta["max_batch"] == 64


def test_model_json_shape(meta: dict[str, Any]) -> None:
    assert meta["schema"] == "edge-agent.model/v1"
    assert meta["name"] == "digits"
    assert meta["inputs"] == [{"name": "pixels", "datatype": "FP32", "shape": [-1, 64]}]
    assert [(o["name"], o["datatype"], o["shape"]) for o in meta["outputs"]] == [
        ("probabilities", "FP32", [-1, 10]),
        ("label", "INT64", [-1]),
    ]
    assert [p["name"] for p in meta["params"]] == ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]
    assert meta["resources"] == {"memory_limit_mb": 32, "timeout_ms": 1000}
    assert meta["files"] == {"module": "model.wasm", "weights": "weights.safetensors"}
    assert "accuracy" in meta["description"]


def test_weights_match_params(meta: dict[str, Any], weights: dict[str, np.ndarray]) -> None:
    # Extra tensors in the file are an error per the ABI, so compare the exact name sets.
    assert set(weights) == {p["name"] for p in meta["params"]}
    for param in meta["params"]:
        tensor = weights[param["name"]]
        assert tensor.dtype == NUMPY_DTYPES[param["datatype"]], param["name"]
        assert list(tensor.shape) == param["shape"], param["name"]
        assert np.all(np.isfinite(tensor)), param["name"]


def test_buffers_stable_and_unknown_indices(model: Model) -> None:
    inst = model.inst
    assert [inst.call("ea_input", 0)] == model.inputs
    assert [inst.call("ea_output", 0), inst.call("ea_output", 1)] == model.outputs
    assert all(offset % 16 == 0 for offset in model.inputs + model.outputs)
    assert inst.call("ea_input", 1) == 0
    assert inst.call("ea_input", -1) == 0
    assert inst.call("ea_output", 2) == 0


# --------------------------------------------------------------------------- numerics


def test_held_out_accuracy(model: Model, held_out: tuple[np.ndarray, np.ndarray]) -> None:
    x_test, y_test = held_out
    labels = np.concatenate([model.run({"pixels": chunk})["label"] for chunk in batches(x_test, 64)])
    accuracy = float(np.mean(labels == y_test))
    assert len(labels) == len(y_test) == 450
    assert accuracy >= 0.95, accuracy


@pytest.mark.parametrize("batch", [1, 7, 32, 64])
def test_matches_reference(
    model: Model, weights: dict[str, np.ndarray], held_out: tuple[np.ndarray, np.ndarray], batch: int
) -> None:
    x_test, _ = held_out
    # Run every held-out row at this batch size, so tails (450 % batch) are covered too.
    for chunk in batches(x_test, batch):
        got = model.run({"pixels": chunk})
        want = reference(weights, chunk)
        np.testing.assert_allclose(got["probabilities"], want["probabilities"], rtol=0, atol=1e-5)
        np.testing.assert_array_equal(got["label"], want["label"])
        np.testing.assert_allclose(got["probabilities"].sum(axis=1), 1.0, atol=1e-5)


def test_rerun_is_deterministic(model: Model, held_out: tuple[np.ndarray, np.ndarray]) -> None:
    chunk = held_out[0][:13]
    first = model.run({"pixels": chunk})
    model.run({"pixels": held_out[0][100:164]})  # different data in between, larger batch
    second = model.run({"pixels": chunk})
    for name in first:
        np.testing.assert_array_equal(first[name], second[name])


def test_warmup_golden(model: Model, meta: dict[str, Any], weights: dict[str, np.ndarray]) -> None:
    warmup = meta["warmup"]
    pixels = np.array(warmup["inputs"]["pixels"]["data"], dtype=np.float32).reshape(warmup["inputs"]["pixels"]["shape"])
    got = model.run({"pixels": pixels})
    golden = warmup["outputs"]
    assert set(golden) == {"probabilities", "label"}
    np.testing.assert_array_equal(got["label"], np.array(golden["label"]["data"]).reshape(golden["label"]["shape"]))
    # The host's default warm-up tolerances (MODEL_ABI.md): rtol 1e-4, atol 1e-5.
    want = np.array(golden["probabilities"]["data"], dtype=np.float32).reshape(golden["probabilities"]["shape"])
    np.testing.assert_allclose(got["probabilities"], want, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(reference(weights, pixels)["probabilities"], want, rtol=0, atol=0)


# --------------------------------------------------------------------------- statuses


def test_bad_batch(model: Model) -> None:
    for batch in (0, -1, 65, 1 << 30):
        assert model.inst.call("ea_run", batch) == EA_ERR_BATCH, batch
    assert model.inst.call("ea_run", 64) == EA_OK


def test_run_before_init(module: wasmtime.Module) -> None:
    inst = Instance(module)
    assert inst.call("ea_run", 1) == EA_ERR_STATE


def test_wrong_params(module: wasmtime.Module, meta: dict[str, Any], weights: dict[str, np.ndarray]) -> None:
    tensors = [weights[p["name"]].tobytes() for p in meta["params"]]
    cases = {
        "too few": tensors[:3],
        "too many": [*tensors, tensors[-1]],
        "none": [],
        "short tensor": [tensors[0][:-4], *tensors[1:]],
        "swapped": [tensors[1], tensors[0], *tensors[2:]],
    }
    for why, case in cases.items():
        inst = Instance(module)
        assert init_params(inst, case) == EA_ERR_PARAMS, why
        assert inst.call("ea_run", 1) == EA_ERR_STATE, why


def test_table_out_of_bounds_is_a_status(module: wasmtime.Module) -> None:
    inst = Instance(module)
    size = inst.memory.data_len(inst.store)
    assert inst.call("ea_init", size - 8, 4) == EA_ERR_PARAMS
    table = inst.call("ea_alloc", 32)
    inst.write(table, np.array([size, 16384, 0, 256, 0, 2560, 0, 40], dtype="<u4").tobytes())
    assert inst.call("ea_init", table, 4) == EA_ERR_PARAMS


def test_alloc_alignment_and_exhaustion(module: wasmtime.Module) -> None:
    inst = Instance(module, memory_limit=1 << 20)
    offsets = [inst.call("ea_alloc", n) for n in (1, 3, 17, 0, 100)]
    assert all(p != 0 and p % 16 == 0 for p in offsets)
    assert offsets == sorted(set(offsets))
    # Growing past the store's limit must be a 0, not a trap.
    assert inst.call("ea_alloc", 2 << 20) == 0
    assert inst.call("ea_alloc", 0xFFFFFFF0 - (1 << 32)) == 0  # i32 view of a 4 GiB request
    assert inst.call("ea_alloc", 64) % 16 == 0


# --------------------------------------------------------------------------- build


def _make(*args: str) -> None:
    if shutil.which("make") is None or shutil.which("clang") is None:
        pytest.skip("clang (or make) not installed: cannot build native/ (apt install clang lld)")
    proc = subprocess.run(["make", "-s", "-C", str(NATIVE), *args], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_reproducible_build(tmp_path: Path) -> None:
    _make(f"BUILD_DIR={tmp_path}")
    built = (tmp_path / "digits.wasm").read_bytes()
    committed = (BUNDLED / "model.wasm").read_bytes()
    assert built == committed, "rebuilt digits.wasm differs from agent/bundled/digits/model.wasm"


# --------------------------------------------------------------------------- kernels


class Kernels:
    """The bare kernels module (``make -C native kernels``) with a scratch bump allocator."""

    def __init__(self, path: Path):
        self.inst = Instance(wasmtime.Module.from_file(ENGINE, str(path)))
        heap_base = self.inst.exports["__heap_base"]
        assert isinstance(heap_base, wasmtime.Global)
        self.base = int(heap_base.value(self.inst.store))
        self.reset()

    def reset(self) -> None:
        self.next = (self.base + 15) & ~15

    def put(self, array: np.ndarray, align: int = 16, misalign: int = 0) -> int:
        """Copies array at a fresh offset (optionally misaligned by bytes) and returns it."""
        data = np.ascontiguousarray(array).tobytes()
        ptr = ((self.next + align - 1) & ~(align - 1)) + misalign
        self.next = ptr + max(len(data), 1)
        need = self.next + 16 - self.inst.memory.data_len(self.inst.store)
        if need > 0:
            self.inst.memory.grow(self.inst.store, (need + 65535) // 65536)
        self.inst.write(ptr, data)
        return ptr

    def get(self, ptr: int, shape: tuple[int, ...], dtype: type) -> np.ndarray:
        n = int(np.prod(shape)) * np.dtype(dtype).itemsize
        return np.frombuffer(self.inst.read(ptr, n), dtype=dtype).reshape(shape).copy()


@pytest.fixture(scope="module")
def kernels(tmp_path_factory: pytest.TempPathFactory) -> Kernels:
    build = tmp_path_factory.mktemp("kernels")
    _make(f"BUILD_DIR={build}", "kernels")
    return Kernels(build / "ea_kernels.wasm")


def np_softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


@pytest.mark.parametrize("rows", [1, 2, 3, 5])
@pytest.mark.parametrize("n_in", [1, 3, 8, 13])
@pytest.mark.parametrize("n_out", [1, 2, 3, 4, 5, 7, 8, 10, 12, 16, 19, 33])
def test_dense_any_shape(kernels: Kernels, rows: int, n_in: int, n_out: int) -> None:
    rng = np.random.default_rng(rows * 10000 + n_in * 100 + n_out)
    x = rng.standard_normal((rows, n_in), dtype=np.float32)
    w = rng.standard_normal((n_in, n_out), dtype=np.float32)
    b = rng.standard_normal(n_out, dtype=np.float32)
    for relu in (0, 1):
        for bias in (True, False):
            kernels.reset()
            # Odd offsets: the kernels promise to work on unaligned tensors.
            px, pw = kernels.put(x, misalign=4), kernels.put(w, misalign=8)
            pb = kernels.put(b) if bias else 0
            py = kernels.put(np.full((rows, n_out), np.nan, dtype=np.float32), misalign=12)
            kernels.inst.call("ea_dense_f32", px, pw, pb, py, rows, n_in, n_out, relu)
            want = x @ w + (b if bias else 0)
            if relu:
                want = np.maximum(want, 0)
            got = kernels.get(py, (rows, n_out), np.float32)
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=f"relu={relu} bias={bias}")


def test_dense_leaves_neighbours_alone(kernels: Kernels) -> None:
    # The overlapping tail tile must not write outside y.
    kernels.reset()
    x, w = np.ones((3, 5), np.float32), np.ones((5, 7), np.float32)
    px, pw = kernels.put(x), kernels.put(w)
    guard = np.full(3 * 7 + 8, 123.0, np.float32)
    pg = kernels.put(guard)
    kernels.inst.call("ea_dense_f32", px, pw, 0, pg + 16, 3, 5, 7, 0)
    got = kernels.get(pg, guard.shape, np.float32)
    np.testing.assert_array_equal(got[:4], 123.0)
    np.testing.assert_array_equal(got[4 : 4 + 21], 5.0)
    np.testing.assert_array_equal(got[25:], 123.0)


@pytest.mark.parametrize("cols", [1, 2, 3, 4, 5, 10, 16, 17, 100])
def test_softmax_and_argmax_any_shape(kernels: Kernels, cols: int) -> None:
    rng = np.random.default_rng(cols)
    x = (rng.standard_normal((6, cols)) * 20).astype(np.float32)
    x[1] = 0.0  # all ties
    x[2, -1] = x[2].max() + 50  # max in the tail
    kernels.reset()
    px = kernels.put(x, misalign=4)
    py = kernels.put(np.zeros_like(x))
    pl = kernels.put(np.zeros(6, np.int64))
    kernels.inst.call("ea_argmax_rows_f32_i64", px, pl, 6, cols)
    np.testing.assert_array_equal(kernels.get(pl, (6,), np.int64), np.argmax(x, axis=1))
    kernels.inst.call("ea_softmax_rows_f32", px, py, 6, cols)
    np.testing.assert_allclose(kernels.get(py, x.shape, np.float32), np_softmax(x), rtol=1e-5, atol=1e-7)
    # In place gives the same bits.
    kernels.inst.call("ea_softmax_rows_f32", px, px, 6, cols)
    np.testing.assert_array_equal(kernels.get(px, x.shape, np.float32), kernels.get(py, x.shape, np.float32))


def test_argmax_nan_and_first_max(kernels: Kernels) -> None:
    x = np.array([[1, 3, 3, 2], [np.nan, 5, 1, 0], [1, np.nan, 9, np.nan], [-np.inf] * 4], np.float32)
    kernels.reset()
    px, pl = kernels.put(x), kernels.put(np.zeros(4, np.int64))
    kernels.inst.call("ea_argmax_rows_f32_i64", px, pl, 4, 4)
    np.testing.assert_array_equal(kernels.get(pl, (4,), np.int64), np.argmax(x, axis=1))


def test_exp_accuracy_and_edges(kernels: Kernels) -> None:
    grid = np.linspace(-110, 90, 200001, dtype=np.float32)
    special = np.array([0.0, -0.0, -np.inf, np.inf, np.nan, 88.72, 88.73, -87.3, -103.0, -104.5], np.float32)
    x = np.concatenate([grid, special, np.float32(2.0) ** -np.arange(1, 30, dtype=np.float32)])
    kernels.reset()
    px = kernels.put(x)
    py = kernels.put(np.zeros_like(x))
    kernels.inst.call("ea_exp_f32", px, py, len(x))
    got = kernels.get(py, x.shape, np.float32)
    with np.errstate(over="ignore", under="ignore"):
        want = np.exp(x.astype(np.float64)).astype(np.float32)
    normal = np.isfinite(want) & (want >= np.finfo(np.float32).tiny)
    ulps = np.abs(got[normal].view(np.int32).astype(np.int64) - want[normal].view(np.int32).astype(np.int64))
    assert ulps.max() <= 2, (ulps.max(), x[normal][ulps.argmax()])
    # Subnormal results: absolute error within a few subnormal steps.
    np.testing.assert_allclose(
        got[~normal & np.isfinite(want)], want[~normal & np.isfinite(want)], rtol=0, atol=8 * 2.0**-149
    )
    edge = got[len(grid) : len(grid) + len(special)]
    assert edge[0] == 1.0 and edge[1] == 1.0  # exactly 1: softmax's max element relies on it
    assert edge[2] == 0.0 and edge[3] == np.inf
    assert np.isnan(edge[4])
    assert edge[6] == np.inf  # 88.73 is above log(FLT_MAX)
    assert edge[9] == 0.0  # exp(-104.5) is below half the smallest subnormal


def test_relu_tail_and_nan(kernels: Kernels) -> None:
    x = np.array([-1, 2, -0.5, np.nan, 3, -4, 5], np.float32)
    for n in range(1, len(x) + 1):
        kernels.reset()
        px = kernels.put(x[:n])
        py = kernels.put(np.full(n + 1, 7.0, np.float32))
        kernels.inst.call("ea_relu_f32", px, py, n)
        got = kernels.get(py, (n + 1,), np.float32)
        np.testing.assert_array_equal(got[:n], np.maximum(x[:n], 0))
        assert got[n] == 7.0  # no write past the end

"""The wasm runtime against real modules: loading, the fast call path, failures, the compile cache."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
import wasmtime
from modelkit import SCALE_WAT, make_scale_model

from agent.cas import BlobStore
from agent.errors import InferenceTimeout, InvalidModel, ModelError
from agent.repository import Artefacts, ModelRepository
from agent.runtime import LoadSettings, WasmRuntime, load_version
from agent.state import StateDB

# Eager: these tests count a whole pool; lazy pools (the agent's default) are tests/test_scale.py's.
SETTINGS = LoadSettings(pool_size=2, memory_limit_mb=64, request_timeout_ms=1000, eager_instances=True)


@pytest.fixture
def env(tmp_path: Path):
    blobs = BlobStore(tmp_path / "state")
    db = StateDB(tmp_path / "state" / "agent.db")
    repo = ModelRepository(blobs, db)
    runtime = WasmRuntime(tmp_path / "state" / "compiled", tick_ms=2)
    runtime.start()
    yield tmp_path, repo, runtime
    runtime.close()
    db.close()


def load(env, **model_kwargs):
    tmp_path, repo, runtime = env
    version = model_kwargs.pop("version", "1")
    directory = make_scale_model(tmp_path / f"m-{version}", version=version, **model_kwargs)
    record = repo.import_dir(directory)
    return load_version(runtime, repo.blobs, record, SETTINGS), record


def x(*rows: list[float]) -> dict[str, np.ndarray]:
    return {"x": np.asarray(rows, dtype=np.float32)}


def test_infer_computes_through_the_abi(env):
    model, _ = load(env, scale=(0.5, 2.0, -1.0, 3.0))
    out = model.infer(x([1, 2, 3, 4], [2, 2, 2, 2]))
    np.testing.assert_array_equal(out["y"], [[0.5, 4, -3, 12], [1, 4, -2, 6]])
    assert model.pool.size == 2 and model.pool.idle == 2


def test_batches_above_max_batch_are_split_and_joined(env):
    model, _ = load(env)
    rows = np.arange(20 * 4, dtype=np.float32).reshape(20, 4) + 100  # 20 rows > max_batch 8
    out = model.infer({"x": rows})
    np.testing.assert_array_equal(out["y"], rows * np.float32([1, 2, 3, 4]))


def test_trap_fails_one_request_and_the_instance_is_replaced(env):
    model, _ = load(env)
    with pytest.raises(ModelError, match="unreachable"):
        model.infer(x([13, 0, 0, 0]))
    assert model.pool.replaced == 1
    assert model.pool.idle == model.pool.size == 2
    np.testing.assert_array_equal(model.infer(x([1, 1, 1, 1]))["y"], [[1, 2, 3, 4]])


def test_endless_loop_is_interrupted_by_the_epoch_deadline(env):
    model, _ = load(env, timeout_ms=100)
    start = time.monotonic()
    with pytest.raises(InferenceTimeout, match=r"100 ms deadline"):
        model.infer(x([-1, 0, 0, 0]))
    # Interrupted: the loop never ends by itself, so getting here at all (with InferenceTimeout naming the
    # 100 ms deadline) is the proof. The bound only turns a hang into a failure; it is no speed check.
    assert time.monotonic() - start < 60
    np.testing.assert_array_equal(model.infer(x([2, 2, 2, 2]))["y"], [[2, 4, 6, 8]])


def test_memory_exhaustion_is_stopped_by_the_store_limit(env):
    model, _ = load(env, memory_limit_mb=2)
    with pytest.raises(ModelError, match="out of memory"):
        model.infer(x([99, 0, 0, 0]))
    np.testing.assert_array_equal(model.infer(x([1, 1, 1, 1]))["y"], [[1, 2, 3, 4]])


def test_parallel_calls_run_on_separate_stores(env):
    model, _ = load(env)
    errors: list[BaseException] = []

    def worker(k: int) -> None:
        try:
            for i in range(200):
                v = float(k * 1000 + i + 200)  # clear of the magic values
                out = model.infer(x([v, v, v, v]))
                assert out["y"].tolist() == [[v, 2 * v, 3 * v, 4 * v]]
        except BaseException as exc:  # noqa: BLE001 - collected and re-raised in the test thread
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]


def test_compiled_module_is_cached_on_disk_and_reused(env):
    tmp_path, repo, runtime = env
    _, record = load(env)
    assert runtime.compiled_fresh == 1
    cached = list((tmp_path / "state" / "compiled").glob("*.cwasm"))
    assert len(cached) == 1
    second = WasmRuntime(tmp_path / "state" / "compiled")
    second.start()
    try:
        model = load_version(second, repo.blobs, record, SETTINGS)
        assert second.compiled_from_cache == 1 and second.compiled_fresh == 0
        np.testing.assert_array_equal(model.infer(x([1, 1, 1, 1]))["y"], [[1, 2, 3, 4]])
    finally:
        second.close()


def test_corrupt_compile_cache_entry_is_recompiled(env):
    tmp_path, repo, _ = env
    _, record = load(env)
    entry = next((tmp_path / "state" / "compiled").glob("*.cwasm"))
    entry.write_bytes(b"garbage" * 100)
    second = WasmRuntime(tmp_path / "state" / "compiled")
    second.start()
    try:
        model = load_version(second, repo.blobs, record, SETTINGS)
        assert second.compiled_fresh == 1
        np.testing.assert_array_equal(model.infer(x([1, 1, 1, 1]))["y"], [[1, 2, 3, 4]])
    finally:
        second.close()


def test_malformed_wasm_is_refused_with_a_clear_error(env):
    with pytest.raises(InvalidModel, match="not valid WebAssembly"):
        load(env, wasm=b"\0asm\x01\0\0\0garbage")


def test_module_with_foreign_imports_is_refused(env):
    body = SCALE_WAT.replace("(i32.const ABI)", "(i32.const 1)").strip()[len("(module") :]
    wat = '(module (import "env" "steal" (func))' + body
    with pytest.raises(InvalidModel, match=r"env\.steal"):
        load(env, wasm=wasmtime.wat2wasm(wat))


def test_abi_version_mismatch_is_refused(env):
    with pytest.raises(InvalidModel, match="ABI version 7"):
        load(env, abi=7)


def test_golden_output_mismatch_fails_the_load(env):
    with pytest.raises(ModelError, match="does not match the golden output"):
        load(env, golden_override=[9, 9, 9, 9])


def test_trap_during_warmup_fails_the_load(env):
    with pytest.raises(ModelError, match="warm-up failed"):
        load(env, warmup_x=(13, 0, 0, 0), golden=False)


def test_weights_not_matching_declared_params_are_refused(env):
    tmp_path, repo, _ = env
    directory = make_scale_model(tmp_path / "bad")
    import safetensors.numpy

    safetensors.numpy.save_file({"scale": np.ones(5, np.float32)}, str(directory / "weights.safetensors"))
    with pytest.raises(InvalidModel, match="parameter scale"):
        repo.add_artefacts(Artefacts.from_dir(directory), source="test")

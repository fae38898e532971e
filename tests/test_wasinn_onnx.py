"""Classification through WASI-NN's ONNX backend answers what onnxruntime answers, bit for bit.

C guests (native/wasinn, committed under tests/data/wasinn) on the agent's
NnHost and onnxruntime backend: the command app (``load_by_name`` and ``load``
from the guest's own bytes), the Model ABI reactors driven through plain
wasmtime, and the same reactors as the agent runs them (ModelInstance with
the version's NnVersion). Each output is compared with ``np.array_equal``
against an onnxruntime session made directly on the same file.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
from wasinn_kit import (
    CLASSIFY_CMD,
    REACTOR_4_TO_3,
    REACTOR_RESNET,
    NnApps,
    app_path,
    cnn_4_to_3,
    cnn_8x8,
    resnet_shaped,
)

from agent.runtime.engine import WasmRuntime
from agent.runtime.instance import ModelInstance
from agent.runtime.nn import NnVersion
from agent.spec import ModelSpec


@pytest.fixture(scope="module")
def apps() -> NnApps:
    return NnApps()


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("wasinn-onnx")
    return {
        "cnn4": cnn_4_to_3(root / "cnn_4_to_3.onnx"),
        "cnn8": cnn_8x8(root / "cnn_8x8.onnx"),
        "resnet": resnet_shaped(root / "resnet_shaped.onnx"),
    }


def reference(path: Path, x: np.ndarray) -> np.ndarray:
    """onnxruntime called directly, with the session options the backend uses (its default threads)."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 0
    session = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
    out: np.ndarray = session.run(None, {session.get_inputs()[0].name: x})[0]
    assert out.dtype == np.float32
    return out


@pytest.mark.parametrize("batch", [1, 3])
def test_command_app_by_name_matches_onnxruntime(
    apps: NnApps, models: dict[str, Path], tmp_path: Path, batch: int
) -> None:
    x = np.random.default_rng(batch).uniform(0, 16, (batch, 1, 8, 8)).astype(np.float32)
    (tmp_path / "x.bin").write_bytes(x.tobytes())
    named = apps.named({"digits-cnn": models["cnn8"]})
    host = apps.host(named)
    try:
        run = apps.run(
            CLASSIFY_CMD,
            ["--dims", f"{batch},1,8,8", "digits-cnn", "/in/x.bin"],
            host=host,
            preopens={"/in": tmp_path},
        )
        assert run.exit_code == 0, run.stderr
        got = run.floats().reshape(batch, 10)
        assert np.array_equal(got, reference(models["cnn8"], x))
    finally:
        host.close()
        named.close()


def test_command_app_loading_its_own_bytes_matches_onnxruntime(
    apps: NnApps, models: dict[str, Path], tmp_path: Path
) -> None:
    x = np.random.default_rng(7).normal(size=(1, 1, 8, 8)).astype(np.float32)
    (tmp_path / "x.bin").write_bytes(x.tobytes())
    (tmp_path / "m.onnx").write_bytes(models["cnn8"].read_bytes())
    named = apps.named({})  # nothing preloaded: the graph comes from the guest's ``load``
    host = apps.host(named)
    try:
        run = apps.run(
            CLASSIFY_CMD,
            ["--dims", "1,1,8,8", "--load", "/in/m.onnx", "digits-cnn", "/in/x.bin"],
            host=host,
            preopens={"/in": tmp_path},
        )
        assert run.exit_code == 0, run.stderr
        assert np.array_equal(run.floats().reshape(1, 10), reference(models["cnn8"], x))
    finally:
        host.close()


def test_reactor_through_wasmtime_matches_onnxruntime_at_every_batch(apps: NnApps, models: dict[str, Path]) -> None:
    named = apps.named({"default": models["cnn4"]})
    host = apps.host(named)
    try:
        reactor = apps.reactor(REACTOR_4_TO_3, host=host)
        assert reactor.call("ea_abi_version") == 1
        assert reactor.call("ea_max_batch") == 8
        assert reactor.init() == 0
        rng = np.random.default_rng(11)
        for batch in range(1, 9):
            x = rng.normal(size=(batch, 4)).astype(np.float32)
            assert np.array_equal(reactor.run(x, [3]), reference(models["cnn4"], x)), batch
    finally:
        host.close()
        named.close()


def test_resnet_shaped_reactor_through_wasmtime_matches_onnxruntime(apps: NnApps, models: dict[str, Path]) -> None:
    named = apps.named({"default": models["resnet"]})
    host = apps.host(named)
    try:
        reactor = apps.reactor(REACTOR_RESNET, host=host)
        assert reactor.call("ea_max_batch") == 1
        assert reactor.init() == 0
        x = np.random.default_rng(3).uniform(-2, 2, (1, 3, 224, 224)).astype(np.float32)
        assert np.array_equal(reactor.run(x, [1000]), reference(models["resnet"], x))
        assert reactor.call("ea_run", 2) == -1  # max_batch 1
    finally:
        host.close()
        named.close()


# -- the same reactors as the agent runs them ---------------------------------------------------------


def reactor_spec(row_in: tuple[int, ...], row_out: tuple[int, ...], max_batch: int) -> ModelSpec:
    doc: dict[str, Any] = {
        "schema": "edge-agent.model/v1",
        "name": "nnreactor",
        "version": "1",
        "abi_version": 1,
        "max_batch": max_batch,
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, *row_in]}],
        "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, *row_out]}],
        "params": [],
        "warmup": {"inputs": {"x": {"shape": [1, *row_in], "data": [0.0] * int(np.prod(row_in))}}},
        "wasi_nn": {"encoding": "onnx", "target": "cpu", "app": "reactor"},
    }
    return ModelSpec.from_dict(doc)


@pytest.fixture
def runtime() -> Iterator[WasmRuntime]:
    runtime = WasmRuntime(None)
    yield runtime
    runtime.close()


@pytest.mark.parametrize(
    ("app", "model", "row_in", "row_out", "max_batch", "batches"),
    [
        (REACTOR_4_TO_3, "cnn4", (4,), (3,), 8, [1, 5, 8]),
        (REACTOR_RESNET, "resnet", (3, 224, 224), (1000,), 1, [1]),
    ],
)
def test_reactor_as_a_model_instance_matches_onnxruntime(
    apps: NnApps,
    models: dict[str, Path],
    runtime: WasmRuntime,
    app: str,
    model: str,
    row_in: tuple[int, ...],
    row_out: tuple[int, ...],
    max_batch: int,
    batches: list[int],
) -> None:
    spec = reactor_spec(row_in, row_out, max_batch)
    nn = NnVersion(registry=apps.registry, spec=spec, weights_path=models[model])
    module = runtime.compile(app_path(app).read_bytes(), allow_nn=True)
    instance = ModelInstance(runtime, module, spec, {}, 1 << 30, 60_000, nn=nn)
    try:
        assert nn.open_hosts == 1
        rng = np.random.default_rng(max_batch)
        for batch in batches:
            x = rng.normal(size=(batch, *row_in)).astype(np.float32)
            (y,) = instance.run([x], batch)
            assert y.shape == (batch, *row_out)
            assert np.array_equal(y, reference(models[model], x)), batch
    finally:
        instance.close()
        nn.close()
    assert nn.open_hosts == 0

"""The converter's core: analysis, refusals, the plan format, memory planning, ABI v2, sharing.

These use only the ops every graph needs (casts, reshapes, fills), so they pin the
machinery independently of any op family.
"""

from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np
import onnx
import pytest
import wasmtime
from convert_testkit import runner
from onnx import TensorProto as TP
from onnx import helper

from agent.convert.build import convert
from agent.convert.ir import Graph, Value
from agent.convert.kernels import kernel_module
from agent.convert.ops import all_opcodes
from agent.convert.plan import HEADER, LOC_ARENA, MAGIC, TDESC, Plan, PlanOp, PlanTensor
from agent.errors import ConversionRefused, InvalidModel, ModelError

REPO = Path(__file__).resolve().parent.parent


def model(nodes, inputs, outputs, inits=(), opset=17):
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    return m


def cast_reshape_model() -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TP.FLOAT, ["N", 4])
    y = helper.make_tensor_value_info("y", TP.INT64, ["N", 2, 2])
    nodes = [
        helper.make_node("Cast", ["x"], ["c"], to=TP.INT64),
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("Gather", ["s", "zero"], ["n"], axis=0),
        helper.make_node("Unsqueeze", ["n", "axes"], ["n1"]),
        helper.make_node("Concat", ["n1", "two_two"], ["shape"], axis=0),
        helper.make_node("Reshape", ["c", "shape"], ["y"]),
    ]
    inits = [
        helper.make_tensor("zero", TP.INT64, [], [0]),
        helper.make_tensor("axes", TP.INT64, [1], [0]),
        helper.make_tensor("two_two", TP.INT64, [2], [2, 2]),
    ]
    return model(nodes, [x], [y], inits)


# -- analysis -----------------------------------------------------------------------------------
def test_shape_arithmetic_from_the_batch_size_folds_away_and_batches_run() -> None:
    converted = convert(cast_reshape_model(), name="t", version="1")
    graph = converted.graph
    # Shape -> Gather -> Unsqueeze -> Concat depend on the batch size: no kernel computes them,
    # the Reshape reads its output shape from the analysis.
    assert [n.op_type for n in graph.nodes] == ["Cast", "Reshape"]
    assert graph.values["shape"].batch_valued and graph.values["y"].batched
    assert converted.doc["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}]
    assert converted.doc["outputs"] == [{"name": "y", "datatype": "INT64", "shape": [-1, 2, 2]}]
    x = np.arange(-6, 6, dtype=np.float32).reshape(3, 4) * 1.5
    out = runner().run(converted, {"x": x})
    np.testing.assert_array_equal(out["y"], x.astype(np.int64).reshape(3, 2, 2))


def test_batches_above_max_batch_are_split_by_the_host() -> None:
    converted = convert(cast_reshape_model(), name="t", version="1", max_batch=2)
    assert converted.doc["max_batch"] == 2
    x = np.arange(20, dtype=np.float32).reshape(5, 4)
    np.testing.assert_array_equal(runner().run(converted, {"x": x})["y"], x.astype(np.int64).reshape(5, 2, 2))


def test_every_refused_node_is_named_at_once() -> None:
    x = helper.make_tensor_value_info("x", TP.FLOAT, ["N", 4])
    y = helper.make_tensor_value_info("y", TP.FLOAT, ["N", 4])
    nodes = [
        helper.make_node("Cast", ["x"], ["a"], to=TP.FLOAT),
        helper.make_node("Bogus1", ["a"], ["b"], domain="ai.onnx.ml", name="first"),
        helper.make_node("Hardmax", ["b"], ["c"], name="second"),
        helper.make_node("Det", ["c"], ["y"], name="third"),
    ]
    m = model(nodes, [x], [y])
    m.opset_import.append(helper.make_opsetid("ai.onnx.ml", 3))
    with pytest.raises(ConversionRefused) as refused:
        convert(m, name="t", version="1", check=False)
    # onnxruntime cannot even load Bogus1: the analysis says so, naming it.
    assert "Bogus1" in str(refused.value) or "first" in str(refused.value)
    assert refused.value.exit_code == 65

    # Two refused nodes, and a consumer of one of them: each refused node is named once.
    x3 = helper.make_tensor_value_info("x", TP.FLOAT, ["N", 4])
    d1 = helper.make_tensor_value_info("d1", TP.INT64, ["N"])
    d2 = helper.make_tensor_value_info("d2", TP.FLOAT, ["N"])
    m2 = model(
        [
            helper.make_node("Reshape", ["x", "shape"], ["sq"]),
            helper.make_node("Det", ["sq"], ["det1"], name="second"),
            helper.make_node("Cast", ["det1"], ["d1"], to=TP.INT64),
            helper.make_node("Det", ["sq"], ["d2"], name="third"),
        ],
        [x3],
        [d1, d2],
        [helper.make_tensor("shape", TP.INT64, [3], [-1, 2, 2])],
    )
    with pytest.raises(ConversionRefused) as refused:
        convert(m2, name="t", version="1", check=False)
    problems = refused.value.problems
    assert len(problems) == 2, problems
    assert "node 'second' (Det): is not supported" in problems[0]
    assert "node 'third' (Det): is not supported" in problems[1]


def test_a_dynamic_inner_dimension_is_refused_naming_input_and_axis() -> None:
    x = helper.make_tensor_value_info("x", TP.FLOAT, ["N", "width"])
    y = helper.make_tensor_value_info("y", TP.INT64, ["N", "width"])
    with pytest.raises(ConversionRefused) as refused:
        convert(model([helper.make_node("Cast", ["x"], ["y"], to=TP.INT64)], [x], [y]), name="t", version="1")
    assert "input 'x' dimension 1 is dynamic ('width')" in str(refused.value)


def test_a_graph_that_mixes_rows_of_the_batch_is_refused() -> None:
    # x - mean(x over the batch axis): row i's answer depends on the other rows.
    x = helper.make_tensor_value_info("x", TP.FLOAT, ["N", 4])
    y = helper.make_tensor_value_info("y", TP.FLOAT, ["N", 4])
    nodes = [
        helper.make_node("ReduceMean", ["x"], ["m"], axes=[0], keepdims=1),
        helper.make_node("Sub", ["x", "m"], ["y"]),
    ]
    with pytest.raises(ConversionRefused, match="depends on other rows of the batch"):
        convert(model(nodes, [x], [y], opset=13), name="t", version="1")


def test_a_fixed_batch_of_one_is_served_one_row_per_call() -> None:
    x = helper.make_tensor_value_info("x", TP.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TP.INT64, [1, 4])
    converted = convert(model([helper.make_node("Cast", ["x"], ["y"], to=TP.INT64)], [x], [y]), name="t", version="1")
    assert converted.doc["max_batch"] == 1
    assert converted.doc["inputs"][0]["shape"] == [-1, 4]
    x_rows = np.array([[1.5, 2, 3, 4], [5, 6, 7, -8.5]], dtype=np.float32)
    np.testing.assert_array_equal(runner().run(converted, {"x": x_rows})["y"], x_rows.astype(np.int64))


def test_not_an_onnx_file_is_a_conversion_refusal(tmp_path: Path) -> None:
    from agent.convert.sources import from_onnx_file

    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07garbage" * 10)
    with pytest.raises(ConversionRefused):
        from_onnx_file(bad)
    link = tmp_path / "link.onnx"
    link.symlink_to(bad)
    with pytest.raises(ConversionRefused, match="symbolic link"):
        from_onnx_file(link)


def test_external_data_must_be_a_plain_file_beside_the_model(tmp_path: Path) -> None:
    from agent.convert.sources import from_onnx_file

    m = cast_reshape_model()
    weights = np.ones((64, 64), np.float32)
    m.graph.initializer.append(onnx.numpy_helper.from_array(weights, "big"))
    onnx.save(m, tmp_path / "m.onnx", save_as_external_data=True, location="m.data", size_threshold=0)
    assert from_onnx_file(tmp_path / "m.onnx").model.graph.initializer
    # A hostile model pointing its data at another file on the machine:
    hostile = onnx.load(str(tmp_path / "m.onnx"), load_external_data=False)
    for entry in hostile.graph.initializer[-1].external_data:
        if entry.key == "location":
            entry.value = "../../etc/passwd"
    (tmp_path / "evil").mkdir()
    (tmp_path / "evil" / "m.onnx").write_bytes(hostile.SerializeToString())
    with pytest.raises(ConversionRefused, match="plain file beside the model"):
        from_onnx_file(tmp_path / "evil" / "m.onnx")
    # ...or at a link beside it.
    (tmp_path / "linked").mkdir()
    (tmp_path / "linked" / "m.data").symlink_to(tmp_path / "m.data")
    (tmp_path / "linked" / "m.onnx").write_bytes((tmp_path / "m.onnx").read_bytes())
    with pytest.raises(ConversionRefused, match="not a regular file"):
        from_onnx_file(tmp_path / "linked" / "m.onnx")


# -- the plan and the kernel library ---------------------------------------------------------
def test_the_kernel_library_knows_every_opcode_the_lowerings_emit() -> None:
    engine = wasmtime.Engine()
    store = wasmtime.Store(engine)
    instance = wasmtime.Instance(store, wasmtime.Module(engine, kernel_module()), [])
    has_op = instance.exports(store)["ea_has_op"]
    missing = [name for name, code in all_opcodes().items() if not has_op(store, code)]
    assert not missing
    assert not has_op(store, 63) and not has_op(store, 64 * 30)


@pytest.mark.skipif(
    shutil.which("clang") is None, reason="clang (Debian packages clang, lld, wasi-libc) is not installed"
)
def test_the_bundled_kernel_library_is_what_native_onnx_builds_to(tmp_path: Path) -> None:
    subprocess.run(["make", "-s", "-C", str(REPO / "native"), "onnx", f"BUILD_DIR={tmp_path}"], check=True)
    assert (tmp_path / "onnx_kernels.wasm").read_bytes() == (
        REPO / "agent/bundled/kernels/onnx_kernels.wasm"
    ).read_bytes()


def test_plan_header_and_tensor_records_follow_plan_h() -> None:
    converted = convert(cast_reshape_model(), name="t", version="1", max_batch=8)
    plan_bytes = converted.weights["plan"].tobytes()
    magic, version, max_batch, n_tensors, n_ops, n_in, n_out, arena = HEADER.unpack_from(plan_bytes)
    assert (magic, version, max_batch, n_in, n_out) == (MAGIC, 1, 8, 1, 1)
    assert n_ops == len(converted.plan.ops) and n_tensors == len(converted.plan.tensors)
    assert TDESC.size == 40
    dtype, _kind, rank, batched, _loc, *dims = TDESC.unpack_from(plan_bytes, HEADER.size)
    assert (dtype, rank, batched, dims[:2]) == (1, 2, 1, [1, 4])  # the input x: FP32 [N, 4] per unit of batch
    assert arena == converted.plan.arena_bytes


def _planned(sizes_and_lives: list[tuple[int, int, int]]) -> Plan:
    plan = Plan()
    for i, (size, _, _) in enumerate(sizes_and_lives):
        plan.add_tensor(PlanTensor(f"t{i}", np.dtype(np.uint8), (size,), False, LOC_ARENA))
    steps = max(last for _, _, last in sizes_and_lives) + 1
    for step in range(steps):
        alive = [i for i, (_, first, last) in enumerate(sizes_and_lives) if first <= step <= last]
        plan.ops.append(PlanOp(0, alive, [], [], []))
    plan.plan_memory(1)
    return plan


def test_memory_planning_reuses_bytes_and_never_overlaps_live_tensors() -> None:
    rng = np.random.default_rng(0)
    for _ in range(50):
        spans = []
        for _ in range(int(rng.integers(2, 30))):
            first = int(rng.integers(0, 20))
            spans.append((int(rng.integers(1, 5000)), first, first + int(rng.integers(0, 6))))
        plan = _planned(spans)
        for i, (size_i, f_i, l_i) in enumerate(spans):
            for j, (size_j, f_j, l_j) in enumerate(spans[:i]):
                if l_i < f_j or l_j < f_i:
                    continue  # never alive together
                a, b = plan.tensors[i].loc, plan.tensors[j].loc
                assert a + size_i <= b or b + size_j <= a, (i, j)
            assert plan.tensors[i].loc % 16 == 0
        assert plan.arena_bytes <= sum(-(-s // 16) * 16 for s, _, _ in spans)
    # A chain: each tensor alive for two steps. Three buffers' worth, not ten.
    chain = _planned([(1000, i, i + 1) for i in range(10)])
    assert chain.arena_bytes <= 2 * 1008


def test_a_damaged_plan_is_refused_by_the_module_never_run() -> None:
    converted = convert(cast_reshape_model(), name="t", version="1")
    good = converted.weights["plan"].copy()
    rng = np.random.default_rng(1)
    outcomes = set()
    for trial in range(60):
        damaged = good.copy()
        if trial == 0:
            damaged[:4] = 0  # magic
        elif trial == 1:
            damaged = damaged[:-4]  # truncated
        else:
            for _ in range(int(rng.integers(1, 6))):
                damaged[int(rng.integers(0, len(damaged)))] = int(rng.integers(0, 256))
        converted.weights["plan"] = damaged
        converted.doc["params"][0]["shape"] = [len(damaged)]
        try:
            runner().run(converted, {"x": np.ones((2, 4), np.float32)})
            outcomes.add("ran")
        except (InvalidModel, ModelError) as exc:
            outcomes.add(type(exc).__name__)
    assert "ModelError" in outcomes


# -- the host: ABI v2 and sharing the kernel module ---------------------------------------------
def test_models_built_on_the_kernel_library_share_its_compiled_code(tmp_path: Path) -> None:
    from agent.runtime.engine import WasmRuntime

    a = convert(cast_reshape_model(), name="a", version="1")
    b = convert(cast_reshape_model(), name="b", version="1", max_batch=4)
    assert a.wasm == b.wasm
    runtime = WasmRuntime(cache_dir=tmp_path / "cache")
    try:
        digest = "sha256:x"
        first = runtime.load_module(a.wasm, digest)
        second = runtime.load_module(b.wasm, digest)
        assert first is second
        assert runtime.compiled_fresh == 1 and runtime.shared_hits == 1
    finally:
        runtime.close()


def test_abi_v2_module_reports_its_max_batch_only_after_init() -> None:
    converted = convert(cast_reshape_model(), name="t", version="1", max_batch=8)
    engine = wasmtime.Engine()
    store = wasmtime.Store(engine)
    exports = wasmtime.Instance(store, wasmtime.Module(engine, converted.wasm), []).exports(store)
    assert exports["ea_abi_version"](store) == 2
    assert exports["ea_max_batch"](store) == 0
    # The host reads it after ea_init, and refuses a model.json that disagrees.
    converted.doc["max_batch"] = 16
    with pytest.raises(ModelError, match=r"module max batch 8 differs from model\.json 16"):
        runner().run(converted, {"x": np.ones((1, 4), np.float32)})


def test_a_model_json_that_says_abi_v1_for_the_v2_module_is_refused() -> None:
    converted = convert(cast_reshape_model(), name="t", version="1")
    converted.doc["abi_version"] = 1
    with pytest.raises(ModelError, match=r"module reports ABI version 2, model\.json says 1"):
        runner().run(converted, {"x": np.ones((1, 4), np.float32)})


def test_value_shapes_scale_with_the_batch() -> None:
    value = Value("v", np.dtype(np.float32), (3, 5), batched=True)
    assert value.shape_at(4) == (12, 5) and value.nbytes_at(2) == 6 * 5 * 4
    assert Graph(nodes=[], values={}, inputs=[], outputs=[], batched=True).consumers("v") == []
    assert struct.calcsize("<BBBBI8i") == 40

"""ONNX model -> model directory (model.json, model.wasm, weights.safetensors), ABI v2.

The steps: analyse (shapes, constants, refusals; agent/convert/analyze.py),
prepare the graph (agent/convert/passes.py), lower every node to kernel ops
(agent/convert/ops/), plan memory, encode the plan, then compute the warm-up
input's golden output with onnxruntime and check that the converted model,
run here by the agent's own runtime, reproduces it. Every node that cannot be
converted is reported at once (ConversionRefused, exit 65).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from agent.convert.analyze import analyze, load_model
from agent.convert.ir import OIP_DATATYPES, Graph
from agent.convert.kernels import kernel_module
from agent.convert.lower import Lowerer, Unsupported, Upstream
from agent.convert.plan import Plan
from agent.errors import ConversionRefused, InvalidModel, ModelError
from agent.spec import SCHEMA

ABI_VERSION = 2
DEFAULT_MAX_BATCH = 64
# The arena, I/O buffers and scratch of one instance at max_batch stay under this when
# max_batch is chosen automatically (a larger model gets a smaller max_batch).
AUTO_BATCH_BUDGET = 256 << 20
MIB = 1 << 20
# Opsets 7..21 are the target. The revisions of the supported ops in opsets 22..28 changed
# only the element types they accept (bfloat16, float8, int4...), which the lowerings refuse
# by dtype anyway, so models and ONNX's own node tests at those opsets convert too.
MAX_OPSET = 28
MIN_OPSET = 7

Progress = Callable[[str], None]


@dataclass
class Converted:
    doc: dict[str, Any]  # model.json
    wasm: bytes
    weights: dict[str, np.ndarray]  # in params order
    plan: Plan = field(repr=False)
    graph: Graph = field(repr=False)


def convert(
    source: Any,
    *,
    name: str,
    version: str,
    max_batch: int | None = None,
    description: str = "",
    batched: bool = True,
    check: bool = True,
    progress: Progress | None = None,
    timeout_ms: int = 1000,
    warmup_data: dict[str, np.ndarray] | None = None,
    golden: bool = True,
) -> Converted:
    """Convert an ONNX model (path, bytes or ModelProto).

    ``warmup_data``: the warm-up input (in the model's own shapes) instead of a generated
    one; ``golden=False`` leaves the golden output out (and skips the check).
    """
    say = progress or (lambda _msg: None)
    model = load_model(source)
    say("analysing the graph with onnxruntime")
    graph = analyze(model, batched=batched, input_data=warmup_data)
    if not graph.inputs:
        raise ConversionRefused("the model has no inputs: it computes a constant, which needs no serving")
    from agent.convert.passes import prepare

    say("preparing the graph")
    graph = prepare(graph)
    say(f"lowering {len(graph.nodes)} nodes")
    plan = lower_graph(graph)
    if graph.one_row or not graph.batched:
        chosen = 1
    elif max_batch is not None:
        if not 1 <= max_batch <= 65536:
            raise ConversionRefused(f"max batch must be in 1..65536, got {max_batch}")
        chosen = max_batch
    else:
        chosen = _auto_max_batch(plan)
    plan.plan_memory(chosen)
    plan_bytes = plan.encode(chosen)
    weights: dict[str, np.ndarray] = {"plan": np.frombuffer(plan_bytes, dtype=np.uint8)}
    for pname, array in plan.params:
        weights[pname] = array
    param_bytes = sum(a.nbytes + 16 for a in weights.values())
    memory_mb = math.ceil((param_bytes + plan.peak_bytes(chosen) + 4 * MIB) * 1.25 / MIB)
    doc: dict[str, Any] = {
        "schema": SCHEMA,
        "name": name,
        "version": version,
        "abi_version": ABI_VERSION,
        "max_batch": chosen,
        "inputs": [_io_spec(graph, n) for n in graph.inputs],
        "outputs": [_io_spec(graph, n) for n in graph.outputs],
        "params": [
            {"name": pname, "datatype": OIP_DATATYPES[array.dtype], "shape": list(array.shape)}
            for pname, array in weights.items()
        ],
        "resources": {"memory_limit_mb": memory_mb, "timeout_ms": timeout_ms},
        "description": description or f"converted from ONNX by edge-agent ({len(graph.nodes)} nodes)",
        "files": {"module": "model.wasm", "weights": "weights.safetensors"},
    }
    converted = Converted(doc=doc, wasm=kernel_module(), weights=weights, plan=plan, graph=graph)
    if not golden:
        rows = {n: _as_rows(graph, a) for n, a in (warmup_data or warmup_inputs(graph, 0)).items()}
        converted.doc["warmup"] = {
            "inputs": {n: {"shape": list(a.shape), "data": a.reshape(-1).tolist()} for n, a in rows.items()}
        }
        return converted
    say("computing the warm-up golden output with onnxruntime")
    _add_warmup(converted, model, check=check, say=say, warmup_data=warmup_data)
    return converted


def lower_graph(graph: Graph) -> Plan:
    from agent.convert.ops import LOWERINGS, load_all

    load_all()
    lw = Lowerer(graph)
    problems: list[str] = []
    for node in graph.nodes:
        lw.node = node
        problem = _opset_problem(node.domain, node.op_type, node.opset)
        fn = LOWERINGS.get((node.domain, node.op_type))
        if problem is None and fn is None:
            problem = "is not supported (see docs/CONVERTER.md for the supported ops)"
        if problem is None:
            assert fn is not None
            try:
                fn(node, lw)
            except Upstream as exc:
                if not problems:  # nothing upstream was refused: then this is the problem
                    problem = str(exc)
            except Unsupported as exc:
                problem = str(exc)
        if problem is not None:
            problems.append(f"{node.label}: {problem}")
    lw.node = None
    if not problems:
        try:
            lw.finish()
        except Unsupported as exc:
            problems.append(str(exc))
    if problems:
        raise ConversionRefused(f"{len(problems)} node(s) of the model cannot be converted:", problems)
    return lw.plan


def _opset_problem(domain: str, op_type: str, opset: int) -> str | None:
    if domain != "":
        return None
    if opset < MIN_OPSET:
        return f"opset {opset} is older than the oldest supported ({MIN_OPSET}); upgrade with onnx.version_converter"
    try:
        import onnx.defs

        since = onnx.defs.get_schema(op_type, opset, domain).since_version
    except Exception:  # noqa: BLE001 - onnx raises SchemaError and others for unknown ops
        return None  # unknown op: reported as unsupported
    if since > MAX_OPSET:
        return f"uses the opset-{since} definition of {op_type}; the converter implements opsets up to {MAX_OPSET}"
    return None


def _auto_max_batch(plan: Plan) -> int:
    batch = DEFAULT_MAX_BATCH
    while batch > 1:
        plan.plan_memory(batch)
        if plan.peak_bytes(batch) <= AUTO_BATCH_BUDGET:
            break
        batch //= 2
    return batch


def _io_spec(graph: Graph, name: str) -> dict[str, Any]:
    value = graph.values[name]
    if value.dtype not in OIP_DATATYPES:
        raise ConversionRefused(f"tensor {name!r} has element type {value.dtype}, which the inference API cannot carry")
    if 0 in value.shape[1 if graph.batched or graph.one_row else 0 :]:
        raise ConversionRefused(f"tensor {name!r} has an empty dimension {list(value.shape)}: it cannot be served")
    # Unbatched (conformance) models: a "row" is the whole tensor.
    shape = [-1, *value.shape[1:]] if graph.batched or graph.one_row else [-1, *value.shape]
    return {"name": name, "datatype": OIP_DATATYPES[value.dtype], "shape": shape}


def warmup_inputs(graph: Graph, seed: int) -> dict[str, np.ndarray]:
    """One row per input, in values that keep model.json small (quarter steps in [-2, 2])."""
    rng = np.random.default_rng(seed)
    out = {}
    for name in graph.inputs:
        value = graph.values[name]
        shape = value.shape_at(1)
        if value.dtype == np.float32:
            array = (rng.integers(-8, 9, shape) / 4).astype(np.float32)
        elif value.dtype == np.bool_:
            array = rng.integers(0, 2, shape).astype(np.bool_)
        else:
            array = np.zeros(shape, dtype=value.dtype)
        out[name] = array
    return out


def _add_warmup(
    converted: Converted, model: Any, *, check: bool, say: Progress, warmup_data: dict[str, np.ndarray] | None
) -> None:
    import onnxruntime as ort

    graph = converted.graph
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    attempts = 5 if check and warmup_data is None else 1
    last_error: str | None = None
    for seed in range(attempts):
        inputs = warmup_data if warmup_data is not None else warmup_inputs(graph, seed)
        expected = dict(zip(graph.outputs, session.run(graph.outputs, inputs), strict=True))
        rows_in = {n: _as_rows(graph, a) for n, a in inputs.items()}
        rows_out = {n: _as_rows(graph, np.asarray(a)) for n, a in expected.items()}
        converted.doc["warmup"] = {
            "inputs": {n: {"shape": list(a.shape), "data": a.reshape(-1).tolist()} for n, a in rows_in.items()},
            "outputs": {n: {"shape": list(a.shape), "data": a.reshape(-1).tolist()} for n, a in rows_out.items()},
            "rtol": 1e-3,
            "atol": 1e-4,
        }
        if not check:
            return
        say("checking the converted model against onnxruntime")
        got = run_converted(converted, rows_in)
        mismatch = _compare(rows_out, got)
        if mismatch is None:
            atol = max(
                1e-4, max((_abs_err(rows_out[n], got[n]) for n in rows_out if got[n].dtype.kind == "f"), default=0) * 8
            )
            converted.doc["warmup"]["atol"] = float(f"{atol:.3g}")
            return
        last_error = mismatch
        if not mismatch.startswith("integer"):
            break  # a float mismatch is a conversion bug; a tie in an argmax may go away with other data
    raise ModelError(f"the converted model disagrees with onnxruntime on the warm-up input: {last_error}")


def _as_rows(graph: Graph, array: np.ndarray) -> np.ndarray:
    if graph.batched or graph.one_row:
        return array
    return array.reshape((1, *array.shape))


def _abs_err(want: np.ndarray, got: np.ndarray) -> float:
    if want.size == 0:
        return 0.0
    return float(np.max(np.abs(want.astype(np.float64) - got.astype(np.float64))))


def _compare(want: dict[str, np.ndarray], got: dict[str, np.ndarray]) -> str | None:
    for name, w in want.items():
        g = got[name]
        if g.shape != w.shape:
            return f"output {name!r} has shape {list(g.shape)}, onnxruntime gives {list(w.shape)}"
        if w.dtype.kind == "f":
            if not np.allclose(g, w, rtol=1e-3, atol=1e-4, equal_nan=True):
                return f"output {name!r} differs by up to {_abs_err(w, g):.3g}"
        elif not np.array_equal(g, w):
            return f"integer output {name!r} differs: {g.reshape(-1)[:8].tolist()} vs {w.reshape(-1)[:8].tolist()}"
    return None


class Runner:
    """Runs converted models in the agent's own runtime (wasmtime), outside any agent.

    Holds one engine and the compiled kernel library; the build's self-check, the
    conformance backend and the tests use it. Close it when done.
    """

    def __init__(self) -> None:
        from agent.runtime.engine import WasmRuntime

        self.runtime = WasmRuntime(cache_dir=None)
        self.runtime.start()

    def instance(self, converted: Converted) -> Any:
        from agent.runtime.instance import ModelInstance
        from agent.spec import ModelSpec

        spec = ModelSpec.from_dict(converted.doc)
        module = self.runtime.load_module(converted.wasm, kernel_digest_of(converted.wasm))
        memory = spec.memory_limit_mb or 256
        return ModelInstance(self.runtime, module, spec, converted.weights, memory * MIB, timeout_ms=600_000)

    def run(self, converted: Converted, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Outputs for ``rows`` (in model.json's shapes); batches above max_batch are split."""
        try:
            instance = self.instance(converted)
            spec = instance.spec
            arrays = [np.ascontiguousarray(rows[t.name], dtype=t.dtype) for t in spec.inputs]
            total = arrays[0].shape[0]
            parts: list[list[np.ndarray]] = []
            for start in range(0, total, spec.max_batch):
                chunk = [a[start : start + spec.max_batch] for a in arrays]
                parts.append(instance.run(chunk, chunk[0].shape[0]))
            outs = [np.concatenate([p[i] for p in parts]) for i in range(len(spec.outputs))]
            return {t.name: o for t, o in zip(spec.outputs, outs, strict=True)}
        except (InvalidModel, ModelError) as exc:
            raise ModelError(f"the converted model does not run: {exc}") from exc

    def close(self) -> None:
        self.runtime.close()


def kernel_digest_of(wasm: bytes) -> str:
    import hashlib

    return "sha256:" + hashlib.sha256(wasm).hexdigest()


def run_converted(converted: Converted, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run the converted model once in a fresh runtime (see :class:`Runner` for many runs)."""
    runner = Runner()
    try:
        return runner.run(converted, rows)
    finally:
        runner.close()


def write_model_dir(converted: Converted, directory: Path) -> Path:
    import json

    import safetensors.numpy

    directory.mkdir(parents=True, exist_ok=True)
    (directory / "model.json").write_text(json.dumps(converted.doc, indent=1) + "\n")
    (directory / "model.wasm").write_bytes(converted.wasm)
    safetensors.numpy.save_file(dict(converted.weights), str(directory / "weights.safetensors"))
    return directory

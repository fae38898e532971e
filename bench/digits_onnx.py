"""The bundled ``digits`` model as an ONNX graph, for the onnxruntime and KServe anchors.

Same weights, same math as ``native/models/digits.c`` (and its NumPy reference):
``probabilities = softmax(relu(pixels @ W1 + b1) @ W2 + b2)`` and
``label = argmax(logits)``. Built in memory from the safetensors blob, so the
benchmark never downloads anything.

    python bench/digits_onnx.py OUT.onnx      # write it to a file (KServe loads it from disk)
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import safetensors.numpy


def build_onnx(weights_path: Path) -> bytes:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weights = safetensors.numpy.load_file(str(weights_path))
    initializers = [
        numpy_helper.from_array(np.asarray(weights[name], dtype=np.float32), name=name)
        for name in ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias")
    ]
    nodes = [
        helper.make_node("MatMul", ["pixels", "fc1.weight"], ["h0"]),
        helper.make_node("Add", ["h0", "fc1.bias"], ["h1"]),
        helper.make_node("Relu", ["h1"], ["hidden"]),
        helper.make_node("MatMul", ["hidden", "fc2.weight"], ["l0"]),
        helper.make_node("Add", ["l0", "fc2.bias"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
        helper.make_node("ArgMax", ["logits"], ["label"], axis=1, keepdims=0),
    ]
    graph = helper.make_graph(
        nodes,
        "digits",
        [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["N", 64])],
        [
            helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", 10]),
            helper.make_tensor_value_info("label", TensorProto.INT64, ["N"]),
        ],
        initializer=initializers,
    )
    # opset 13 and IR 8: old enough for every onnxruntime the anchors install.
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="edge-agent-bench")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


if __name__ == "__main__":
    repo = Path(__file__).resolve().parent.parent
    Path(sys.argv[1]).write_bytes(build_onnx(repo / "agent" / "bundled" / "digits" / "weights.safetensors"))

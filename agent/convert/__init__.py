"""ONNX graphs to model images: the converter behind ``edge-agent image build --onnx``.

One concern per module (docs/CONVERTER.md):

- ``ir``: the graph as the converter sees it (values with static shapes, nodes)
- ``analyze``: ONNX model -> ir.Graph: shapes and constants found by running onnxruntime
  at two batch sizes, build-time refusals collected for every node at once
- ``passes``: graph preparation (identity removal, BatchNormalization folding,
  activation fusion, dead-node removal)
- ``ops``: one module per op family, each lowering ONNX nodes to kernel ops
- ``lower``: the lowering context ops use (tensors, constants, emitted ops)
- ``plan``: memory planning (one arena, buffers reused) and the binary plan format
- ``kernels``: where the shared kernel library (onnx_kernels.wasm) is found
- ``build``: the whole path, ONNX file -> model directory (model.json, model.wasm, weights)
- ``sources``: MLflow model directories and scikit-learn models -> ONNX
- ``backend``: an ``onnx.backend`` implementation, for ONNX's conformance tests

onnx and onnxruntime are needed only here (the ``convert`` extra); the agent
serves converted models without them.
"""

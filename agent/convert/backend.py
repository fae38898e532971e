"""An ``onnx.backend`` over the converter, for ONNX's own conformance tests.

``prepare`` keeps the model; ``run`` converts it with every shape as declared
(no batch axis: the node tests' inputs have none), with the test's inputs as
the analysis data, and runs it in the agent's wasm runtime. A model the
converter refuses raises ConversionRefused: tests/test_convert_conformance.py
decides which refusals are documented limits (skips) and which are failures.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx.backend.base import Backend, BackendRep

from agent.convert.build import Runner, convert
from agent.convert.ir import ONNX_DTYPES

# Graph inputs this small, that no node takes as its first (data) input, are the operands a
# converted model fixes at build time: axes, K, a target shape, pads, clip bounds, scales.
SPECIALISE_MAX_ELEMENTS = 64


def specialise(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """The model with its small operand inputs turned into initializers holding this run's values.

    The converter specialises a model on such operands (they must be constants: the
    kernels get them as parameters, not as run-time tensors); ONNX's node tests pass many
    of them as inputs. The kernels still compute every output from the data.
    """
    data_positions: dict[str, set[int]] = {}
    for node in model.graph.node:
        for position, name in enumerate(node.input):
            data_positions.setdefault(name, set()).add(position)
    fold = {
        name
        for name, array in feed.items()
        if array.size <= SPECIALISE_MAX_ELEMENTS
        and array.dtype in ONNX_DTYPES.values()
        and 0 not in data_positions.get(name, {0})
        and name not in {o.name for o in model.graph.output}
    }
    if fold and len(fold) == len(feed):
        # Keep one run-time input (the largest): a model needs one, and it is the data.
        fold.discard(max(feed, key=lambda n: feed[n].size))
    if not fold:
        return model, feed
    special = onnx.ModelProto()
    special.CopyFrom(model)
    kept = [vi for vi in special.graph.input if vi.name not in fold]
    del special.graph.input[:]
    special.graph.input.extend(kept)
    for name in sorted(fold):
        special.graph.initializer.append(onnx.numpy_helper.from_array(feed[name], name))
    return special, {n: a for n, a in feed.items() if n not in fold}


class EdgeRep(BackendRep):
    def __init__(self, model: onnx.ModelProto, runner: Runner):
        self.model = model
        self.runner = runner

    def run(self, inputs: Any, **kwargs: Any) -> tuple[np.ndarray, ...]:
        graph_inputs = [
            vi.name for vi in self.model.graph.input if vi.name not in {i.name for i in self.model.graph.initializer}
        ]
        if isinstance(inputs, dict):
            feed = {name: np.asarray(inputs[name]) for name in graph_inputs}
        else:
            feed = {name: np.asarray(array) for name, array in zip(graph_inputs, inputs, strict=False)}
        model, feed = specialise(self.model, feed)
        converted = convert(
            model, name="conformance", version="1", batched=False, check=False, golden=False, warmup_data=feed
        )
        rows = {name: array.reshape((1, *array.shape)) for name, array in feed.items()}
        out = self.runner.run(converted, rows)
        return tuple(out[name][0] for name in converted.graph.outputs)


class EdgeBackend(Backend):
    """Holds one Runner for all the models it prepares (set ``runner`` before use)."""

    runner: Runner | None = None

    @classmethod
    def prepare(cls, model: onnx.ModelProto, device: str = "CPU", **kwargs: Any) -> EdgeRep:
        super().prepare(model, device, **kwargs)
        if cls.runner is None:
            cls.runner = Runner()
        return EdgeRep(model, cls.runner)

    @classmethod
    def supports_device(cls, device: str) -> bool:
        return device == "CPU"

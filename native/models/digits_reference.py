"""NumPy reference for the ``digits`` model: the exact math of ``digits.c``, in float32.

Used by the training script (warm-up goldens), the tests (wasm vs. reference) and
``bench/digits_onnx.py`` (onnxruntime vs. reference).
"""

from __future__ import annotations

import numpy as np

PARAM_SHAPES: dict[str, tuple[int, ...]] = {
    "fc1.weight": (64, 64),
    "fc1.bias": (64,),
    "fc2.weight": (64, 10),
    "fc2.bias": (10,),
}


def reference(weights: dict[str, np.ndarray], pixels: np.ndarray) -> dict[str, np.ndarray]:
    """Computes ``probabilities`` FP32 [N, 10] and ``label`` INT64 [N] for raw 0..16 ``pixels`` [N, 64].

    The input scaling is already folded into ``fc1.weight``, so ``pixels`` are used as is.
    """
    x = np.asarray(pixels, dtype=np.float32).reshape(-1, 64)
    w = {name: np.asarray(weights[name], dtype=np.float32) for name in PARAM_SHAPES}
    hidden = np.maximum(x @ w["fc1.weight"] + w["fc1.bias"], np.float32(0))
    logits = hidden @ w["fc2.weight"] + w["fc2.bias"]
    # The label is the argmax of the logits (as in the wasm and ONNX graphs), not of the
    # probabilities, so it does not depend on how exp rounds.
    label = np.argmax(logits, axis=1).astype(np.int64)
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    probabilities = (exp / exp.sum(axis=1, keepdims=True)).astype(np.float32)
    return {"probabilities": probabilities, "label": label}

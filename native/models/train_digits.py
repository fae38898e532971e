"""Trains the bundled ``digits`` model and exports its weights and model.json.

    python native/models/train_digits.py

Deterministic: fixed seed, fixed stratified split, so running it twice writes identical
files. It writes exactly ``agent/bundled/digits/weights.safetensors`` and
``agent/bundled/digits/model.json`` (``model.wasm`` comes from ``make -C native install``).
The tests import ``load_split`` from here so they score the same held-out rows.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

# Importing the reference below must not leave a __pycache__ behind: this script writes
# only the two artefacts.
sys.dont_write_bytecode = True

import numpy as np  # noqa: E402
import safetensors.numpy  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402
from sklearn.neural_network import MLPClassifier  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from digits_reference import PARAM_SHAPES, reference  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
OUT_DIR = REPO / "agent" / "bundled" / "digits"
SEED = 0
TEST_SIZE = 0.25
# The digits pixels are 0..16; training sees pixels / 16, and the export folds that
# scale into fc1.weight so the module takes raw pixels.
PIXEL_SCALE = 16.0
MAX_BATCH = 64
MIN_ACCURACY = 0.95


def load_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The fixed split: (x_train, x_test, y_train, y_test), raw 0..16 pixels as float32, labels int64."""
    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(
        x.astype(np.float32), y.astype(np.int64), test_size=TEST_SIZE, random_state=SEED, stratify=y
    )
    return x_train, x_test, y_train, y_test


def train(x_train: np.ndarray, y_train: np.ndarray) -> MLPClassifier:
    # max_iter is a cap: with this seed adam stops on its tolerance well before it.
    clf = MLPClassifier(hidden_layer_sizes=(64,), activation="relu", random_state=SEED, max_iter=1000)
    return clf.fit(x_train.astype(np.float64) / PIXEL_SCALE, y_train)


def export_weights(clf: MLPClassifier) -> dict[str, np.ndarray]:
    """FP32 parameters in model.json order, with the pixel scale folded into fc1.weight."""
    weights = {
        "fc1.weight": clf.coefs_[0] / PIXEL_SCALE,
        "fc1.bias": clf.intercepts_[0],
        "fc2.weight": clf.coefs_[1],
        "fc2.bias": clf.intercepts_[1],
    }
    out = {name: np.ascontiguousarray(value, dtype=np.float32) for name, value in weights.items()}
    for value in out.values():
        # L2 decay leaves the weights of always-blank pixels around 1e-40: subnormal in
        # float32. They change no output, but x86 takes a microcode assist on every
        # multiply that touches one (measured: ea_run(1) 1.6 us -> 1.0 us once flushed).
        value[np.abs(value) < np.finfo(np.float32).tiny] = 0.0
    for name, shape in PARAM_SHAPES.items():
        assert out[name].shape == shape, (name, out[name].shape)
    return out


def accuracy(weights: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean(reference(weights, x)["label"] == y))


def _floats(values: np.ndarray) -> list[float]:
    # str() of a float32 is its shortest round-tripping decimal, so the JSON stays short
    # and still parses back to the identical float32.
    return [float(str(np.float32(v))) for v in np.asarray(values, dtype=np.float32).ravel()]


def model_json(
    weights: dict[str, np.ndarray], held_out_accuracy: float, n_held_out: int, warmup_pixels: np.ndarray
) -> dict[str, Any]:
    golden = reference(weights, warmup_pixels.reshape(1, 64))
    return {
        "schema": "edge-agent.model/v1",
        "name": "digits",
        "version": "1",
        "abi_version": 1,
        "max_batch": MAX_BATCH,
        "inputs": [{"name": "pixels", "datatype": "FP32", "shape": [-1, 64]}],
        "outputs": [
            {"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]},
            {"name": "label", "datatype": "INT64", "shape": [-1]},
        ],
        "params": [{"name": name, "datatype": "FP32", "shape": list(shape)} for name, shape in PARAM_SHAPES.items()],
        "warmup": {
            "inputs": {"pixels": {"shape": [1, 64], "data": _floats(warmup_pixels)}},
            "outputs": {
                "probabilities": {"shape": [1, 10], "data": _floats(golden["probabilities"])},
                "label": {"shape": [1], "data": [int(v) for v in golden["label"]]},
            },
        },
        "resources": {"memory_limit_mb": 32, "timeout_ms": 1000},
        "description": (
            "Handwritten digit classifier: MLP 64-64(ReLU)-10-softmax trained on scikit-learn's 8x8 digits; "
            "input is the raw 0..16 pixels, row-major. "
            f"Held-out accuracy {held_out_accuracy:.2%} on {n_held_out} images "
            f"({TEST_SIZE:.0%} stratified split, seed {SEED})."
        ),
        "files": {"module": "model.wasm", "weights": "weights.safetensors"},
    }


def dump_json(doc: dict[str, Any]) -> str:
    """Indented JSON with every list of plain numbers on one line (shapes, warm-up data)."""
    text = json.dumps(doc, indent=2)
    return (
        re.sub(
            r"\[\s*([-+0-9.eE]+(?:,\s*[-+0-9.eE]+)*)\s*\]",
            lambda m: "[" + ", ".join(re.split(r",\s*", m.group(1))) + "]",
            text,
        )
        + "\n"
    )


def main() -> int:
    x_train, x_test, y_train, y_test = load_split()
    clf = train(x_train, y_train)
    weights = export_weights(clf)
    # Score the exported float32 weights on raw pixels: that is what the module serves.
    acc = accuracy(weights, x_test, y_test)
    print(f"held-out accuracy: {acc:.4f} ({round(acc * len(y_test))}/{len(y_test)}), {clf.n_iter_} training iterations")
    if acc < MIN_ACCURACY:
        print(f"accuracy below {MIN_ACCURACY:.0%}; nothing written", file=sys.stderr)
        return 1
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    weights_path = OUT_DIR / "weights.safetensors"
    safetensors.numpy.save_file(weights, str(weights_path))
    # safetensors creates the file 0600; package data should be world-readable.
    weights_path.chmod(0o644)
    doc = model_json(weights, acc, len(y_test), x_test[0])
    (OUT_DIR / "model.json").write_text(dump_json(doc))
    print(f"wrote {weights_path} and {OUT_DIR / 'model.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

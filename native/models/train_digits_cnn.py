"""Trains a small PyTorch CNN on scikit-learn's 8x8 digits and exports it to ONNX.

The converter's tests use the result, ``tests/data/models/digits_cnn.onnx``, as a real
``torch.onnx.export`` graph (Conv, MaxPool, GlobalAveragePool, Flatten, Gemm). Torch is
in the dev extra (the CPU wheel, torch==2.13.0), so after ``make test``'s bootstrap::

    .venv/bin/python native/models/train_digits_cnn.py [--out FILE]

tests/test_convert_e2e.py runs it afresh (into a temporary file) and serves the result.

Model: input ``pixels`` [N,1,8,8] float32 holding the raw 0..16 pixel values (the
same values as ``load_digits().data``, reshaped); the model scales them by 1/16 itself
(one ``Mul`` at the top of the graph), then
Conv2d(1,8,3,p=1)+BatchNorm2d+ReLU+MaxPool2d(2) -> Conv2d(8,16,3,p=1)+BatchNorm2d+ReLU
-> AdaptiveAvgPool2d(1) -> flatten -> Linear(16,10). Output ``logits`` [N,10] float32
(no softmax). Batch is dynamic (dim 0 named "N" on both).

Exported with the TorchScript-based exporter (``dynamo=False``), opset 17, eval mode;
that exporter folds each eval-mode BatchNorm into the preceding Conv's weights.

Deterministic: fixed seed, fixed stratified split (the same one as
``train_digits.py``), one CPU thread, deterministic algorithms, full-batch order
from a seeded generator; running it twice writes an identical file.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

REPO = Path(__file__).resolve().parents[2]
OUT = REPO / "tests" / "data" / "models" / "digits_cnn.onnx"
SEED = 0
TEST_SIZE = 0.25
PIXEL_SCALE = 16.0
EPOCHS = 40
BATCH = 64
LR = 0.01
MIN_ACCURACY = 0.90
OPSET = 17


class DigitsCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
        )
        self.fc = nn.Linear(16, 10)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.features(pixels * (1.0 / PIXEL_SCALE))
        return self.fc(torch.flatten(x, 1))


def load_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x_train, x_test, y_train, y_test): raw 0..16 pixels as float32 [n,1,8,8], labels int64."""
    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(
        x.astype(np.float32), y.astype(np.int64), test_size=TEST_SIZE, random_state=SEED, stratify=y
    )
    return x_train.reshape(-1, 1, 8, 8), x_test.reshape(-1, 1, 8, 8), y_train, y_test


def train(x_train: np.ndarray, y_train: np.ndarray) -> DigitsCNN:
    torch.manual_seed(SEED)
    model = DigitsCNN()
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    loss_fn = nn.CrossEntropyLoss()
    xt, yt = torch.from_numpy(x_train), torch.from_numpy(y_train)
    gen = torch.Generator().manual_seed(SEED)
    for _ in range(EPOCHS):
        model.train()
        perm = torch.randperm(len(xt), generator=gen)
        for start in range(0, len(xt), BATCH):
            idx = perm[start : start + BATCH]
            opt.zero_grad()
            loss = loss_fn(model(xt[idx]), yt[idx])
            loss.backward()
            opt.step()
    return model.eval()


def accuracy(model: DigitsCNN, x: np.ndarray, y: np.ndarray) -> float:
    with torch.no_grad():
        pred = model(torch.from_numpy(x)).argmax(1).numpy()
    return float(np.mean(pred == y))


def export(model: DigitsCNN, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(
        model,
        (torch.zeros(1, 1, 8, 8),),
        str(path),
        dynamo=False,
        opset_version=OPSET,
        input_names=["pixels"],
        output_names=["logits"],
        dynamic_axes={"pixels": {0: "N"}, "logits": {0: "N"}},
        do_constant_folding=True,
    )
    path.chmod(0o644)


def check(model: DigitsCNN, path: Path, x: np.ndarray) -> None:
    """The file loads, passes the checker, and matches torch on a few held-out rows."""
    import onnx

    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    try:
        import onnxruntime as ort
    except ImportError:
        print("onnxruntime not installed: skipped the onnxruntime comparison")
        return
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"pixels": x})[0]
    with torch.no_grad():
        want = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    print(f"onnxruntime matches torch on {len(x)} rows (max abs diff {np.abs(got - want).max():.2e})")


def main() -> int:
    import argparse

    parser = argparse.ArgumentParser(description="Train the digits CNN and export it to ONNX.")
    parser.add_argument("--out", type=Path, default=OUT, help=f"where to write the ONNX file (default {OUT})")
    out = parser.parse_args().out
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    x_train, x_test, y_train, y_test = load_split()
    model = train(x_train, y_train)
    acc = accuracy(model, x_test, y_test)
    print(f"held-out accuracy: {acc:.4f} ({round(acc * len(y_test))}/{len(y_test)}), {EPOCHS} epochs")
    if acc < MIN_ACCURACY:
        print(f"accuracy below {MIN_ACCURACY:.0%}; nothing written", file=sys.stderr)
        return 1
    export(model, out)
    check(model, out, x_test[:16])
    print(f"wrote {out} ({out.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

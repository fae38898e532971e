"""Model assets for the ONNX -> wasm converter's tests and benchmarks.

Every factory is seeded and deterministic and returns a fresh ``onnx.ModelProto`` whose
inputs and outputs carry a dynamic batch dimension named ``"N"`` on dim 0:

- ``digits_mlp()``: the bundled digits MLP (``bench/digits_onnx.py``'s graph: MatMul, Add,
  Relu, Softmax, ArgMax; opset 13). Input ``pixels`` [N,64]; outputs ``probabilities``
  FP32 [N,10], ``label`` INT64 [N].
- ``sklearn_*()``: scikit-learn models converted by skl2onnx at its default target opset,
  classifiers with ``zipmap=False``, trained on ``load_digits`` (64 raw 0..16 features,
  int labels 0..9) or, for regressors, a seeded ``make_regression`` (10 features).
  Input ``X``; classifiers output ``label`` INT64 [N] and ``probabilities`` FP32 [N,10],
  regressors ``variable`` FP32 [N,1]. skl2onnx's own graph is kept as it writes it
  (``ai.onnx.ml`` ops, duplicate ``""`` opset imports and all); only the batch dim is named.
- ``resnet50_shaped()``: a ResNet-50-shaped graph written the way torch lays it out
  (Conv without bias + BatchNormalization + Relu, or BN folded into the Conv's bias as the
  TorchScript exporter does with ``fold_bn=True``), random He-initialised weights.
- ``digits_cnn()``: ``tests/data/models/digits_cnn.onnx``, a real ``torch.onnx.export``
  (see ``native/models/train_digits_cnn.py``). Input ``pixels`` [N,1,8,8] raw 0..16;
  output ``logits`` [N,10].
- ``mlflow_sklearn_dir(path)`` / ``mlflow_onnx_dir(path)``: MLflow model directories
  written by MLflow itself.

Inputs: ``digits_inputs`` (rows of ``load_digits``), ``regression_inputs``, ``image_inputs``.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

REPO = Path(__file__).resolve().parent.parent
DIGITS_WEIGHTS = REPO / "agent" / "bundled" / "digits" / "weights.safetensors"
DIGITS_CNN = REPO / "tests" / "data" / "models" / "digits_cnn.onnx"
BATCH_DIM = "N"
SEED = 0
DIGITS_FEATURES = 64
DIGITS_CLASSES = 10
REGRESSION_FEATURES = 10
REGRESSION_SAMPLES = 200


# --- helpers -------------------------------------------------------------------------


def name_batch_dim(model: onnx.ModelProto, dim: str = BATCH_DIM) -> onnx.ModelProto:
    """Names dim 0 of every graph input and output ``dim`` (in place; returns the model)."""
    for value in [*model.graph.input, *model.graph.output]:
        shape = value.type.tensor_type.shape
        if len(shape.dim) > 0:
            shape.dim[0].Clear()
            shape.dim[0].dim_param = dim
    return model


def _fresh(build: Callable[[], bytes]) -> Callable[[], onnx.ModelProto]:
    """Caches the serialized model and hands out a new ModelProto on every call."""
    cached = functools.cache(build)

    @functools.wraps(build)
    def factory() -> onnx.ModelProto:
        return onnx.load_from_string(cached())

    return factory


@functools.cache
def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    return x.astype(np.float32), y.astype(np.int64)


@functools.cache
def _regression() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import make_regression

    x, y = make_regression(n_samples=REGRESSION_SAMPLES, n_features=REGRESSION_FEATURES, noise=0.1, random_state=SEED)
    return x.astype(np.float32), y.astype(np.float32)


def digits_inputs(n: int, seed: int = 0) -> np.ndarray:
    """``n`` rows of ``load_digits`` (raw 0..16 pixels), float32 [n,64], picked by ``seed``."""
    x, _ = _digits()
    rng = np.random.default_rng(seed)
    idx = rng.choice(len(x), size=n, replace=n > len(x))
    return np.ascontiguousarray(x[idx])


def regression_inputs(n: int, seed: int = 0) -> np.ndarray:
    """float32 [n,10] standard-normal rows: the distribution ``make_regression`` draws from."""
    return np.random.default_rng(seed).standard_normal((n, REGRESSION_FEATURES)).astype(np.float32)


def image_inputs(n: int, image: int = 224, seed: int = 0, channels: int = 3) -> np.ndarray:
    """float32 [n,channels,image,image] standard-normal images (roughly what a normalised photo looks like)."""
    return np.random.default_rng(seed).standard_normal((n, channels, image, image)).astype(np.float32)


# --- the bundled digits MLP -----------------------------------------------------------


def _bench_digits_onnx() -> Any:
    # bench/ is not a package; load its module by path so bench keeps working unchanged.
    spec = importlib.util.spec_from_file_location("digits_onnx", REPO / "bench" / "digits_onnx.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@_fresh
def digits_mlp() -> bytes:
    """The bundled digits model as ONNX (same weights as agent/bundled/digits)."""
    built: bytes = _bench_digits_onnx().build_onnx(DIGITS_WEIGHTS)
    return built


# --- scikit-learn via skl2onnx --------------------------------------------------------


def _fit_scaler_logreg() -> Any:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x, y = _digits()
    return make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)).fit(x, y)


def _fit_linear_regression() -> Any:
    from sklearn.linear_model import LinearRegression

    return LinearRegression().fit(*_regression())


def _fit_mlp() -> Any:
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return MLPClassifier(hidden_layer_sizes=(32,), max_iter=200, random_state=SEED).fit(*_digits())


def _fit_decision_tree() -> Any:
    from sklearn.tree import DecisionTreeClassifier

    return DecisionTreeClassifier(max_depth=6, random_state=SEED).fit(*_digits())


def _fit_random_forest_classifier() -> Any:
    from sklearn.ensemble import RandomForestClassifier

    return RandomForestClassifier(n_estimators=10, max_depth=6, random_state=SEED, n_jobs=1).fit(*_digits())


def _fit_random_forest_regressor() -> Any:
    from sklearn.ensemble import RandomForestRegressor

    return RandomForestRegressor(n_estimators=10, max_depth=6, random_state=SEED, n_jobs=1).fit(*_regression())


def _fit_scaler() -> Any:
    from sklearn.preprocessing import StandardScaler

    return StandardScaler().fit(_digits()[0])


_FITTERS: dict[str, Callable[[], Any]] = {
    "scaler_logreg": _fit_scaler_logreg,
    "linear_regression": _fit_linear_regression,
    "mlp": _fit_mlp,
    "decision_tree": _fit_decision_tree,
    "random_forest_classifier": _fit_random_forest_classifier,
    "random_forest_regressor": _fit_random_forest_regressor,
    "scaler": _fit_scaler,
}
SKLEARN_MODELS = tuple(_FITTERS)
REGRESSORS = frozenset({"linear_regression", "random_forest_regressor"})


@functools.cache
def _estimator(name: str) -> Any:
    return _FITTERS[name]()


def sklearn_estimator(name: str) -> Any:
    """The fitted scikit-learn object behind ``sklearn_<name>()`` (shared: do not refit or mutate it)."""
    return _estimator(name)


def sklearn_inputs(name: str, n: int, seed: int = 0) -> np.ndarray:
    """Inputs that fit ``sklearn_<name>()``: digits rows or regression rows."""
    return regression_inputs(n, seed) if name in REGRESSORS else digits_inputs(n, seed)


@functools.cache
def _sklearn_onnx_bytes(name: str) -> bytes:
    from skl2onnx import to_onnx
    from sklearn.base import is_classifier

    est = _estimator(name)
    options = {id(est): {"zipmap": False}} if is_classifier(est) else None
    model = to_onnx(est, sklearn_inputs(name, 1), options=options)
    return name_batch_dim(model).SerializeToString()


def sklearn_onnx(name: str) -> onnx.ModelProto:
    """skl2onnx's graph for one of ``SKLEARN_MODELS`` (default target opset, zipmap off)."""
    return onnx.load_from_string(_sklearn_onnx_bytes(name))


def sklearn_scaler_logreg() -> onnx.ModelProto:
    """StandardScaler + LogisticRegression on digits: Scaler -> LinearClassifier -> Normalizer (ai.onnx.ml)."""
    return sklearn_onnx("scaler_logreg")


def sklearn_linear_regression() -> onnx.ModelProto:
    """LinearRegression on 10 features: one LinearRegressor (ai.onnx.ml); output ``variable`` [N,1]."""
    return sklearn_onnx("linear_regression")


def sklearn_mlp() -> onnx.ModelProto:
    """MLPClassifier (32 relu) on digits: Cast, MatMul, Add, Relu, Softmax, ArgMax, ArrayFeatureExtractor, ..."""
    return sklearn_onnx("mlp")


def sklearn_decision_tree() -> onnx.ModelProto:
    """DecisionTreeClassifier (depth 6) on digits: one TreeEnsembleClassifier (ai.onnx.ml 1)."""
    return sklearn_onnx("decision_tree")


def sklearn_random_forest_classifier() -> onnx.ModelProto:
    """RandomForestClassifier (10 trees, depth 6) on digits: one TreeEnsembleClassifier (ai.onnx.ml 1)."""
    return sklearn_onnx("random_forest_classifier")


def sklearn_random_forest_regressor() -> onnx.ModelProto:
    """RandomForestRegressor (10 trees, depth 6) on 10 features: one TreeEnsembleRegressor (ai.onnx.ml 1)."""
    return sklearn_onnx("random_forest_regressor")


def sklearn_scaler() -> onnx.ModelProto:
    """StandardScaler alone on digits: one Scaler (ai.onnx.ml); output ``variable`` [N,64]."""
    return sklearn_onnx("scaler")


# --- a ResNet-50-shaped graph ---------------------------------------------------------


class _GraphBuilder:
    """Accumulates nodes and initializers with torch-export-style names."""

    def __init__(self, rng: np.random.Generator, fold_bn: bool) -> None:
        self.rng = rng
        self.fold_bn = fold_bn
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []

    def init(self, name: str, value: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(value, dtype=np.float32), name=name))
        return name

    def node(self, op: str, scope: str, inputs: Sequence[str], **attrs: Any) -> str:
        out = f"{scope}/{op}_output_0"
        self.nodes.append(helper.make_node(op, list(inputs), [out], name=f"{scope}/{op}", **attrs))
        return out

    def conv_bn(
        self,
        x: str,
        scope: str,
        prefix: str,
        conv: str,
        bn: str,
        cin: int,
        cout: int,
        k: int,
        stride: int,
        gamma: float,
    ) -> str:
        """Conv(bias=False) + BatchNormalization, or one Conv with BN folded in (fold_bn)."""
        fan_in = cin * k * k
        weight = self.rng.standard_normal((cout, cin, k, k)) * math.sqrt(2.0 / fan_in)
        # BN with plausible trained statistics: scale ~ gamma, small shift, mean near 0,
        # variance around the conv output's variance (He init keeps that near 2x input's).
        scale = gamma * self.rng.uniform(0.5, 1.5, cout)
        shift = self.rng.normal(0.0, 0.1, cout)
        mean = self.rng.normal(0.0, 0.1, cout)
        var = self.rng.uniform(0.5, 2.0, cout)
        eps = 1e-5
        attrs: dict[str, Any] = {
            "dilations": [1, 1],
            "group": 1,
            "kernel_shape": [k, k],
            "pads": [k // 2] * 4,
            "strides": [stride, stride],
        }
        # torch's node scopes: "/layer1/layer1.0/conv1/Conv", ".../downsample/downsample.0/Conv".
        sub = "/downsample/" if conv.startswith("downsample.") else "/"
        scope_conv, scope_bn = f"{scope}{sub}{conv}", f"{scope}{sub}{bn}"
        if self.fold_bn:
            factor = scale / np.sqrt(var + eps)
            w = self.init(f"onnx::Conv_{prefix}{conv}.weight", weight * factor[:, None, None, None])
            b = self.init(f"onnx::Conv_{prefix}{conv}.bias", shift - mean * factor)
            return self.node("Conv", scope_conv, [x, w, b], **attrs)
        w = self.init(f"{prefix}{conv}.weight", weight)
        y = self.node("Conv", scope_conv, [x, w], **attrs)
        params = [
            self.init(f"{prefix}{bn}.{field}", value)
            for field, value in (("weight", scale), ("bias", shift), ("running_mean", mean), ("running_var", var))
        ]
        # What torch writes for nn.BatchNorm2d(eps=1e-5, momentum=0.1) in eval mode.
        return self.node(
            "BatchNormalization",
            scope_bn,
            [y, *params],
            epsilon=np.float32(eps).item(),
            momentum=np.float32(0.9).item(),
        )


def resnet50_shaped(
    batch_dim: str = BATCH_DIM,
    width: float = 1.0,
    image: int = 224,
    seed: int = 0,
    blocks: Sequence[int] = (3, 4, 6, 3),
    num_classes: int = 1000,
    fold_bn: bool = False,
) -> onnx.ModelProto:
    """A torchvision-ResNet-50-shaped graph (v1.5: stride on the 3x3) with random weights, opset 17.

    Stem Conv 7x7/2 + BN + Relu + MaxPool 3x3/2 pad 1; four stages of bottleneck blocks
    (``blocks``, default [3,4,6,3]) of 1x1 -> 3x3 -> 1x1 convs with expansion 4, a
    projection shortcut (1x1 conv + BN, stride 2 from stage 2 on) on each stage's first
    block, residual Add then Relu; GlobalAveragePool, Flatten, Gemm (transB=1) to
    ``num_classes``. ``width`` scales every channel count (0.125 -> stem 8 channels),
    ``image`` the spatial size of input ``input`` [N,3,image,image]; output ``logits``
    [N,num_classes]. Weights are He-normal, BN statistics random but sane; the last BN
    of each block has a smaller scale (like zero-init-residual training leaves it) so
    activations stay bounded through the residual stream. ``fold_bn`` writes each BN
    into its Conv's weights and bias, as torch's TorchScript exporter does in eval mode.
    """
    rng = np.random.default_rng(seed)
    g = _GraphBuilder(rng, fold_bn)
    stem = max(1, round(64 * width))
    x = g.conv_bn("input", "", "", "conv1", "bn1", 3, stem, 7, 2, gamma=1.0)
    x = g.node("Relu", "/relu", [x])
    x = g.node(
        "MaxPool",
        "/maxpool",
        [x],
        ceil_mode=0,
        dilations=[1, 1],
        kernel_shape=[3, 3],
        pads=[1, 1, 1, 1],
        strides=[2, 2],
    )
    cin = stem
    for stage, count in enumerate(blocks, start=1):
        planes = max(1, round(64 * width * 2 ** (stage - 1)))
        cout = planes * 4
        for i in range(count):
            stride = 2 if stage > 1 and i == 0 else 1
            p = f"layer{stage}.{i}."
            scope = f"/layer{stage}/layer{stage}.{i}"
            h = g.conv_bn(x, scope, p, "conv1", "bn1", cin, planes, 1, 1, gamma=1.0)
            h = g.node("Relu", f"{scope}/relu", [h])
            h = g.conv_bn(h, scope, p, "conv2", "bn2", planes, planes, 3, stride, gamma=1.0)
            h = g.node("Relu", f"{scope}/relu_1", [h])
            h = g.conv_bn(h, scope, p, "conv3", "bn3", planes, cout, 1, 1, gamma=0.2)
            shortcut = x
            if i == 0:
                shortcut = g.conv_bn(x, scope, p, "downsample.0", "downsample.1", cin, cout, 1, stride, gamma=1.0)
            s = g.node("Add", scope, [h, shortcut])
            x = g.node("Relu", f"{scope}/relu_2", [s])
            cin = cout
    x = g.node("GlobalAveragePool", "/avgpool", [x])
    x = g.node("Flatten", "", [x], axis=1)
    fc_w = g.init("fc.weight", rng.uniform(-1, 1, (num_classes, cin)) / math.sqrt(cin))
    fc_b = g.init("fc.bias", rng.uniform(-1, 1, num_classes) / math.sqrt(cin))
    g.nodes.append(
        helper.make_node("Gemm", [x, fc_w, fc_b], ["logits"], name="/fc/Gemm", alpha=1.0, beta=1.0, transB=1)
    )
    graph = helper.make_graph(
        g.nodes,
        "main_graph",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch_dim, 3, image, image])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch_dim, num_classes])],
        initializer=g.inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="pytorch")
    model.ir_version = 8
    return model


# --- the exported PyTorch CNN ---------------------------------------------------------


def digits_cnn() -> onnx.ModelProto:
    """tests/data/models/digits_cnn.onnx: input ``pixels`` [N,1,8,8] raw 0..16, output ``logits`` [N,10]."""
    return onnx.load(str(DIGITS_CNN))


# --- MLflow model directories ---------------------------------------------------------


def mlflow_sklearn_dir(path: str | Path, serialization_format: str | None = None) -> Path:
    """An MLflow sklearn-flavor directory holding the StandardScaler + LogisticRegression pipeline.

    ``serialization_format`` None is MLflow's default, which in current MLflow 3 is "skops"
    (``model.skops``; loading it needs the skops package); "cloudpickle" or "pickle"
    write ``model.pkl``. ``path`` must not exist yet (or be an empty directory).
    """
    import mlflow.sklearn

    out = Path(path)
    # MLflow before the skops format (late 2025) defaulted to cloudpickle.
    default = getattr(mlflow.sklearn, "SERIALIZATION_FORMAT_SKOPS", mlflow.sklearn.SERIALIZATION_FORMAT_CLOUDPICKLE)
    fmt = serialization_format or default
    # Explicit requirements: MLflow otherwise infers them by re-loading the model in a
    # subprocess (seconds); they only fill requirements.txt / conda.yaml.
    requirements = ["scikit-learn", "skops"] if fmt == "skops" else ["scikit-learn", "cloudpickle"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mlflow.sklearn.save_model(
            _estimator("scaler_logreg"),
            str(out),
            serialization_format=fmt,
            pip_requirements=requirements,
        )
    return out


def mlflow_onnx_dir(path: str | Path, external_data: bool = True) -> Path:
    """An MLflow onnx-flavor directory holding ``digits_mlp()``.

    ``external_data`` True is MLflow's default: ``model.onnx`` holds the graph and the
    weights go to a ``<uuid>.data`` file beside it (``onnx.load`` on the path reads both);
    False writes one self-contained ``model.onnx``. ``path`` must not exist yet.
    """
    import mlflow.onnx

    out = Path(path)
    mlflow.onnx.save_model(
        digits_mlp(), str(out), save_as_external_data=external_data, pip_requirements=["onnx", "onnxruntime"]
    )
    return out

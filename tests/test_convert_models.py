"""Sanity of the converter's model assets (tests/convert_models.py): each graph is valid
ONNX, runs in onnxruntime at batch 1 and 5, and gives finite outputs of the expected shapes."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import convert_models as cm
import numpy as np
import onnx
import pytest

ort = pytest.importorskip("onnxruntime")

CLASSIFIER_OUTPUTS = {"label": (np.int64, ()), "probabilities": (np.float32, (10,))}
REGRESSOR_OUTPUTS = {"variable": (np.float32, (1,))}

# factory, inputs(n, seed) -> {name: array}, {output name: (dtype, shape after the batch dim)}
CASES: dict[str, tuple[Callable[[], onnx.ModelProto], Callable[[int, int], dict[str, np.ndarray]], dict]] = {
    "digits_mlp": (cm.digits_mlp, lambda n, s: {"pixels": cm.digits_inputs(n, s)}, CLASSIFIER_OUTPUTS),
    "sklearn_scaler_logreg": (cm.sklearn_scaler_logreg, lambda n, s: {"X": cm.digits_inputs(n, s)}, CLASSIFIER_OUTPUTS),
    "sklearn_linear_regression": (
        cm.sklearn_linear_regression,
        lambda n, s: {"X": cm.regression_inputs(n, s)},
        REGRESSOR_OUTPUTS,
    ),
    "sklearn_mlp": (cm.sklearn_mlp, lambda n, s: {"X": cm.digits_inputs(n, s)}, CLASSIFIER_OUTPUTS),
    "sklearn_decision_tree": (cm.sklearn_decision_tree, lambda n, s: {"X": cm.digits_inputs(n, s)}, CLASSIFIER_OUTPUTS),
    "sklearn_random_forest_classifier": (
        cm.sklearn_random_forest_classifier,
        lambda n, s: {"X": cm.digits_inputs(n, s)},
        CLASSIFIER_OUTPUTS,
    ),
    "sklearn_random_forest_regressor": (
        cm.sklearn_random_forest_regressor,
        lambda n, s: {"X": cm.regression_inputs(n, s)},
        REGRESSOR_OUTPUTS,
    ),
    "sklearn_scaler": (
        cm.sklearn_scaler,
        lambda n, s: {"X": cm.digits_inputs(n, s)},
        {"variable": (np.float32, (64,))},
    ),
    "digits_cnn": (
        cm.digits_cnn,
        lambda n, s: {"pixels": cm.digits_inputs(n, s).reshape(n, 1, 8, 8)},
        {"logits": (np.float32, (10,))},
    ),
    "resnet50_tiny": (
        lambda: cm.resnet50_shaped(width=0.125, image=32, blocks=(1, 1, 1, 1)),
        lambda n, s: {"input": cm.image_inputs(n, 32, s)},
        {"logits": (np.float32, (1000,))},
    ),
    "resnet50_tiny_folded": (
        lambda: cm.resnet50_shaped(width=0.125, image=32, blocks=(1, 2, 1, 1), fold_bn=True, num_classes=10),
        lambda n, s: {"input": cm.image_inputs(n, 32, s)},
        {"logits": (np.float32, (10,))},
    ),
}


def run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds), strict=True))


def batch_dims(model: onnx.ModelProto) -> list[str]:
    return [v.type.tensor_type.shape.dim[0].dim_param for v in [*model.graph.input, *model.graph.output]]


@pytest.mark.parametrize("case", list(CASES))
def test_asset_checks_and_runs(case: str) -> None:
    factory, inputs, outputs = CASES[case]
    model = factory()
    onnx.checker.check_model(model, full_check=True)
    assert batch_dims(model) == [cm.BATCH_DIM] * (len(model.graph.input) + len(model.graph.output))
    assert {o.name for o in model.graph.output} == set(outputs)
    for n in (1, 5):
        got = run(model, inputs(n, 7))
        for name, (dtype, tail) in outputs.items():
            assert got[name].dtype == dtype, name
            assert got[name].shape == (n, *tail), name
            assert np.isfinite(got[name]).all(), name
    # Batching is row-independent: the first row of a batch of 5 is that row alone.
    five, one = run(model, inputs(5, 7)), run(model, {k: v[:1] for k, v in inputs(5, 7).items()})
    for name in outputs:
        np.testing.assert_allclose(five[name][:1], one[name], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", list(CASES))
def test_asset_is_deterministic(case: str) -> None:
    factory = CASES[case][0]
    assert factory().SerializeToString() == factory().SerializeToString()


def test_classifiers_are_trained() -> None:
    x = cm.digits_inputs(300, 1)
    labels = cm.sklearn_estimator("scaler_logreg").predict(x)
    for factory in (cm.digits_mlp, cm.sklearn_scaler_logreg, cm.sklearn_mlp, cm.sklearn_random_forest_classifier):
        name = cm.digits_mlp().graph.input[0].name if factory is cm.digits_mlp else "X"
        got = run(factory(), {name: x})
        # agreement with the logistic regression, a ~97%-accurate reference on these rows
        assert np.mean(got["label"] == labels) > 0.75, factory.__name__
        np.testing.assert_allclose(got["probabilities"].sum(axis=1), 1.0, rtol=1e-4)
    logits = run(cm.digits_cnn(), {"pixels": x.reshape(-1, 1, 8, 8)})["logits"]
    assert np.mean(logits.argmax(axis=1) == labels) > 0.85


def test_onnx_matches_sklearn() -> None:
    for name in cm.SKLEARN_MODELS:
        x = cm.sklearn_inputs(name, 20, 3)
        est = cm.sklearn_estimator(name)
        got = run(cm.sklearn_onnx(name), {"X": x})
        if name == "scaler":
            np.testing.assert_allclose(got["variable"], est.transform(x), rtol=1e-4, atol=1e-4)
        elif name in cm.REGRESSORS:
            np.testing.assert_allclose(got["variable"][:, 0], est.predict(x), rtol=1e-3, atol=1e-2)
        else:
            np.testing.assert_array_equal(got["label"], est.predict(x))
            np.testing.assert_allclose(got["probabilities"], est.predict_proba(x), rtol=1e-3, atol=1e-4)


def test_resnet50_full_shape() -> None:
    """The full-size graph: ResNet-50's parameter count and node layout; runs at batch 1 (224x224)."""
    model = cm.resnet50_shaped()
    onnx.checker.check_model(model)
    params = sum(int(np.prod(t.dims)) for t in model.graph.initializer)
    bn = [p for t in model.graph.initializer if (p := t.name).endswith("running_mean")]
    # torchvision's resnet50 has 25,557,032 parameters; BN running stats are buffers on top.
    assert params - 2 * sum(int(np.prod(t.dims)) for t in model.graph.initializer if t.name in bn) == 25_557_032
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("Conv") == 53 and ops.count("BatchNormalization") == 53 and ops.count("Add") == 16
    assert model.opset_import[0].version == 17
    logits = run(model, {"input": cm.image_inputs(1, 224, 0)})["logits"]
    assert logits.shape == (1, 1000) and np.isfinite(logits).all()
    folded = cm.resnet50_shaped(fold_bn=True)
    assert [n.op_type for n in folded.graph.node].count("BatchNormalization") == 0
    np.testing.assert_allclose(
        run(folded, {"input": cm.image_inputs(1, 224, 0)})["logits"], logits, rtol=1e-3, atol=1e-3
    )


def test_mlflow_sklearn_dir(tmp_path: Path) -> None:
    pytest.importorskip("mlflow")
    import mlflow.sklearn
    import yaml

    x = cm.digits_inputs(10, 2)
    want = cm.sklearn_estimator("scaler_logreg").predict(x)
    for fmt in (None, "cloudpickle"):
        out = cm.mlflow_sklearn_dir(tmp_path / f"skl-{fmt}", serialization_format=fmt)
        flavor = yaml.safe_load((out / "MLmodel").read_text())["flavors"]["sklearn"]
        filename = "model.skops" if flavor["serialization_format"] == "skops" else "model.pkl"
        assert fmt is None or flavor["serialization_format"] == fmt
        assert flavor["pickled_model"] == filename
        assert (out / filename).is_file()
        np.testing.assert_array_equal(mlflow.sklearn.load_model(str(out)).predict(x), want)


def test_mlflow_onnx_dir(tmp_path: Path) -> None:
    pytest.importorskip("mlflow")
    import yaml

    x = cm.digits_inputs(5, 2)
    want = run(cm.digits_mlp(), {"pixels": x})
    for external in (True, False):
        out = cm.mlflow_onnx_dir(tmp_path / f"onnx-{external}", external_data=external)
        meta = yaml.safe_load((out / "MLmodel").read_text())
        assert meta["flavors"]["onnx"]["data"] == "model.onnx"
        assert bool(list(out.glob("*.data"))) == external
        got = run(onnx.load(str(out / "model.onnx")), {"pixels": x})
        np.testing.assert_allclose(got["probabilities"], want["probabilities"], rtol=1e-6)

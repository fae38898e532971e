"""The "ml" family (agent/convert/ops/ml.py, native/onnx/ops_ml.c) against onnxruntime.

Each ai.onnx.ml op on its own (Scaler, Normalizer, Binarizer, ArrayFeatureExtractor,
LinearClassifier, LinearRegressor, TreeEnsembleRegressor/Classifier in opsets 1 and 3,
TreeEnsemble 5) over its attribute variants: every post-transform, every branch mode, NaN
inputs with and without missing_value_tracks_true, every aggregate function, base values,
the two-class special cases of TreeEnsembleClassifier. Then scikit-learn models as
skl2onnx writes them, batched, against onnxruntime and scikit-learn itself; the refusals
(ZipMap, string labels); and ONNX's own ai.onnx.ml node tests.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import convert_models as cm
import numpy as np
import onnx
import pytest
from convert_testkit import assert_matches, convert_model, node_model, ort_run, run_converted
from onnx import helper, numpy_helper

from agent.convert.build import convert
from agent.errors import ConversionRefused, ModelError

pytest.importorskip("onnxruntime")

ML = "ai.onnx.ml"
POSTS = ["NONE", "LOGISTIC", "SOFTMAX", "SOFTMAX_ZERO", "PROBIT"]
MODES = ["BRANCH_LEQ", "BRANCH_LT", "BRANCH_GTE", "BRANCH_GT", "BRANCH_EQ", "BRANCH_NEQ"]
# Inputs and thresholds come from one grid, so that ties (x == threshold) happen often.
GRID = np.arange(-2.0, 2.01, 0.5, dtype=np.float32)


def ml_model(
    op_type: str,
    inputs: Mapping[str, np.ndarray],
    outputs: Sequence[str],
    attrs: Mapping[str, Any],
    *,
    ml_opset: int = 1,
    batch: bool = False,
    initializers: Mapping[str, np.ndarray] | None = None,
) -> onnx.ModelProto:
    """A model of one ai.onnx.ml node (``batch``: dim 0 of every input is "N")."""
    return node_model(
        op_type,
        inputs,
        outputs,
        attrs=attrs,
        initializers=initializers,
        domain=ML,
        domain_opset=ml_opset,
        batch=batch,
    )


def check_ml(
    op_type: str,
    inputs: Mapping[str, np.ndarray],
    outputs: Sequence[str],
    attrs: Mapping[str, Any],
    *,
    ml_opset: int = 1,
    batch: bool = False,
    rtol: float = 1e-5,
    atol: float = 1e-6,
    initializers: Mapping[str, np.ndarray] | None = None,
) -> dict[str, np.ndarray]:
    model = ml_model(op_type, inputs, outputs, attrs, ml_opset=ml_opset, batch=batch, initializers=initializers)
    return assert_matches(model, inputs, rtol=rtol, atol=atol, batch=batch)


def refusal(model: onnx.ModelProto, feed: Mapping[str, np.ndarray], *, batch: bool = False) -> str:
    with pytest.raises(ConversionRefused) as info:
        convert_model(model, feed, batch=batch)
    return str(info.value) + " " + " ".join(getattr(info.value, "problems", None) or [])


def grid_inputs(shape: tuple[int, ...], seed: int, nan: float = 0.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.choice(GRID, size=shape).astype(np.float32)
    if nan:
        x[rng.random(shape) < nan] = np.nan
    return x


# -- Scaler, Normalizer, Binarizer -------------------------------------------------------


@pytest.mark.parametrize(
    "shape,size,dtype",
    [
        ((3, 5), 5, np.float32),
        ((3, 5), 1, np.float32),
        ((7,), 7, np.float32),
        ((1, 17), 17, np.float32),
        ((2, 3, 4), 3, np.float32),  # onnxruntime: offset[i % dims[1]] over the flat tensor
        ((4, 6), 6, np.int64),
        ((4, 6), 6, np.int32),
    ],
)
def test_scaler(shape: tuple[int, ...], size: int, dtype: Any) -> None:
    rng = np.random.default_rng(1)
    x = (rng.standard_normal(shape) * 10).astype(dtype)
    attrs = {"offset": rng.standard_normal(size).tolist(), "scale": rng.standard_normal(size).tolist()}
    check_ml("Scaler", {"x": x}, ["y"], attrs)


def test_scaler_batched() -> None:
    x = np.random.default_rng(2).standard_normal((9, 5)).astype(np.float32)
    check_ml("Scaler", {"x": x}, ["y"], {"offset": [1, 2, 3, 4, 5.5], "scale": [0.5, -1, 2, 3, 0.25]}, batch=True)


@pytest.mark.parametrize("norm", ["MAX", "L1", "L2"])
@pytest.mark.parametrize("dtype", [np.float32, np.int64, np.int32])
def test_normalizer(norm: str, dtype: Any) -> None:
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((6, 7)) * 5).astype(dtype)
    x[2] = 0  # a zero row: left as it is
    x[3] = -np.abs(x[3])  # all negative: MAX divides by a negative maximum
    check_ml("Normalizer", {"x": x}, ["y"], {"norm": norm}, batch=dtype == np.float32)
    check_ml("Normalizer", {"x": x[0]}, ["y"], {"norm": norm})  # rank 1: one row


def test_binarizer() -> None:
    x = grid_inputs((3, 4, 5), 4)
    check_ml("Binarizer", {"x": x}, ["y"], {"threshold": 0.5})
    check_ml("Binarizer", {"x": x}, ["y"], {"threshold": -1.0}, batch=True)
    # onnxruntime refuses NaN inputs; the ONNX definition (x > threshold) gives 0.
    nan = np.array([[np.nan, 1.0, 2.0, -np.inf, np.inf]], dtype=np.float32)
    model = ml_model("Binarizer", {"x": nan}, ["y"], {"threshold": 1.0})
    converted = convert(model, name="t", version="1", batched=False, check=False, golden=False)
    from convert_testkit import runner

    got = runner().run(converted, {"x": nan[None]})["y"][0]
    np.testing.assert_array_equal(got, [[0, 0, 1, 0, 1]])


# -- ArrayFeatureExtractor -------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.int64, np.int32])
def test_array_feature_extractor(dtype: Any) -> None:
    rng = np.random.default_rng(5)
    x = (rng.standard_normal((3, 4, 7)) * 100).astype(dtype)
    idx = np.array([6, 0, 3, 3], dtype=np.int64)
    check_ml("ArrayFeatureExtractor", {"x": x, "i": idx}, ["z"], {})
    check_ml("ArrayFeatureExtractor", {"x": x}, ["z"], {}, initializers={"i": idx})
    check_ml("ArrayFeatureExtractor", {"x": x[0]}, ["z"], {}, initializers={"i": idx.reshape(2, 2)}, batch=True)
    # Rank 1: the output is [1, k].
    check_ml("ArrayFeatureExtractor", {"x": x[0, 0]}, ["z"], {}, initializers={"i": idx})


def test_array_feature_extractor_index_out_of_range() -> None:
    x = np.zeros((2, 4), np.float32)
    model = ml_model("ArrayFeatureExtractor", {"x": x}, ["z"], {}, initializers={"i": np.array([1, 4], np.int64)})
    assert "out of range" in refusal(model, {"x": x})
    # Computed indices out of range: the run fails (onnxruntime fails too), it does not read past the row.
    ok = np.array([1, 2], np.int64)
    model = ml_model("ArrayFeatureExtractor", {"x": x, "i": ok}, ["z"], {})
    converted = convert(
        model, name="t", version="1", batched=False, check=False, golden=False, warmup_data={"x": x, "i": ok}
    )
    from convert_testkit import runner

    with pytest.raises(ModelError):
        runner().run(converted, {"x": x[None], "i": np.array([[1, 9]], np.int64)})


def afe_label_model(consumer: str = "Reshape") -> onnx.ModelProto:
    """MLPClassifier's label path: classes[indices] (a [1, N] result), reshaped to [N]."""
    classes = numpy_helper.from_array(np.array([3, 1, 4, 1, 5, 9, 2, 6], np.int64), "classes")
    shape = numpy_helper.from_array(np.array([-1], np.int64), "shape")
    nodes = [helper.make_node("ArrayFeatureExtractor", ["classes", "idx"], ["picked"], domain=ML)]
    if consumer == "Reshape":
        nodes.append(helper.make_node("Reshape", ["picked", "shape"], ["label"]))
    else:
        nodes.append(helper.make_node("Identity", ["picked"], ["label"]))
    graph = helper.make_graph(
        nodes,
        "afe",
        [helper.make_tensor_value_info("idx", onnx.TensorProto.INT64, ["N", 1])],
        [onnx.ValueInfoProto(name="label")],
        [classes, shape],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(ML, 1)])
    model.ir_version = 8
    return model


def test_array_feature_extractor_label_path_batched() -> None:
    # The [1, N] result would carry the batch in dimension 1: analysis sees Gather(classes, idx) instead.
    from agent.convert.ops.ml import rewrite_model

    model = afe_label_model()
    rewritten = rewrite_model(model)
    assert [n.op_type for n in rewritten.graph.node] == ["Gather", "Reshape"]
    assert [n.op_type for n in model.graph.node] == ["ArrayFeatureExtractor", "Reshape"]  # not changed in place
    idx = np.array([[0], [5], [7], [3], [1]], np.int64)
    assert_matches(model, {"idx": idx}, batch=True)
    # Anything else than a Reshape after it: left alone (and refused for its batch dimension).
    other = afe_label_model("Identity")
    assert rewrite_model(other) is other
    assert "batch" in refusal(other, {"idx": idx}, batch=True)


# -- linear models -------------------------------------------------------------------------


def linear_attrs(rng: np.random.Generator, classes: int, features: int, scale: float = 0.3) -> dict[str, Any]:
    return {
        "coefficients": (rng.standard_normal(classes * features) * scale).tolist(),
        "intercepts": (rng.standard_normal(classes) * scale).tolist(),
    }


@pytest.mark.parametrize("post", POSTS)
@pytest.mark.parametrize("classes", [3, 6])
def test_linear_classifier(post: str, classes: int) -> None:
    rng = np.random.default_rng(classes)
    features = 9
    attrs = linear_attrs(rng, classes, features, scale=0.05 if post == "PROBIT" else 0.5)
    if post == "PROBIT":  # probit of scores in (0, 1)
        attrs["intercepts"] = [0.5] * classes
    attrs.update(post_transform=post, multi_class=1, classlabels_ints=[10 + 3 * c for c in range(classes)])
    x = rng.standard_normal((11, features)).astype(np.float32)
    check_ml("LinearClassifier", {"x": x}, ["label", "scores"], attrs, batch=post == "SOFTMAX", rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("post", ["NONE", "LOGISTIC", "SOFTMAX"])
@pytest.mark.parametrize("labels", [[4, 7], []])
def test_linear_classifier_one_score(post: str, labels: list[int]) -> None:
    # One coefficient row: label = score > 0 ? labels[1] : labels[0] (1/0 without labels);
    # two labels add a second score column [1 - s, s].
    rng = np.random.default_rng(7)
    attrs = linear_attrs(rng, 1, 5) | {"post_transform": post}
    if labels:
        attrs["classlabels_ints"] = labels
    x = rng.standard_normal((13, 5)).astype(np.float32)
    check_ml("LinearClassifier", {"x": x}, ["label", "scores"], attrs)


@pytest.mark.parametrize("dtype", [np.int64, np.int32])
def test_linear_classifier_integer_input(dtype: Any) -> None:
    rng = np.random.default_rng(8)
    attrs = linear_attrs(rng, 4, 6) | {"classlabels_ints": [0, 1, 2, 3], "post_transform": "SOFTMAX"}
    x = rng.integers(-5, 6, (10, 6)).astype(dtype)
    check_ml("LinearClassifier", {"x": x}, ["label", "scores"], attrs, batch=True)


def test_linear_classifier_refusals() -> None:
    rng = np.random.default_rng(9)
    x = rng.standard_normal((2, 3)).astype(np.float32)
    attrs = linear_attrs(rng, 2, 3) | {"classlabels_strings": ["cat", "dog"]}
    model = ml_model("LinearClassifier", {"x": x}, ["label", "scores"], attrs)
    assert "string class labels" in refusal(model, {"x": x})
    # Two labels, one score row and PROBIT: onnxruntime leaves half the scores unset.
    attrs = linear_attrs(rng, 1, 3) | {"classlabels_ints": [0, 1], "post_transform": "PROBIT"}
    assert "PROBIT" in refusal(ml_model("LinearClassifier", {"x": x}, ["label", "scores"], attrs), {"x": x})


@pytest.mark.parametrize(
    "targets,post", [(1, "NONE"), (1, "PROBIT"), (1, "LOGISTIC"), (3, "NONE"), (3, "SOFTMAX"), (3, "LOGISTIC")]
)
def test_linear_regressor(targets: int, post: str) -> None:
    rng = np.random.default_rng(targets)
    scale = 0.05 if post == "PROBIT" else 1.0
    attrs = linear_attrs(rng, targets, 12, scale) | {"targets": targets, "post_transform": post}
    if post == "PROBIT":
        attrs["intercepts"] = [0.5] * targets
    x = rng.standard_normal((8, 12)).astype(np.float32)
    check_ml("LinearRegressor", {"x": x}, ["y"], attrs, batch=True, rtol=1e-4)
    # Without intercepts (or with the wrong number: onnxruntime ignores them).
    attrs.pop("intercepts")
    check_ml("LinearRegressor", {"x": x[0]}, ["y"], attrs, rtol=1e-4)


# -- tree ensembles: a random forest generator ---------------------------------------------------


def random_forest(
    seed: int,
    *,
    n_trees: int = 4,
    depth: int = 4,
    features: int = 5,
    outputs: int = 1,
    modes: Sequence[str] = ("BRANCH_LEQ",),
    missing: bool = False,
    weights: str = "all",  # all: every output on every leaf; one: a random one; class1: class 1 only
    positive: bool = False,
    shuffle: bool = True,
    prefix: str = "target",
) -> dict[str, Any]:
    """Attributes of a random ensemble in TreeEnsembleRegressor/Classifier form (``prefix`` = target/class).

    Trees are uneven (a branch stops early at random), node ids are scrambled, and within a
    tree the nodes are listed root first, then in a random order.
    """
    rng = np.random.default_rng(seed)
    cols: dict[str, list[Any]] = {
        k: []
        for k in (
            "treeids",
            "nodeids",
            "featureids",
            "modes",
            "values",
            "truenodeids",
            "falsenodeids",
            "missing",
            "w_tree",
            "w_node",
            "w_id",
            "w_val",
        )
    }
    for tree in range(n_trees):
        rows: list[dict[str, Any]] = []

        def grow(level: int, rows: list[dict[str, Any]] = rows) -> int:
            me = len(rows)
            rows.append({})
            if level >= depth or (level > 0 and rng.random() < 0.2):
                rows[me] = {"mode": "LEAF"}
                return me
            left = grow(level + 1)
            right = grow(level + 1)
            rows[me] = {
                "mode": str(rng.choice(modes)),
                "feature": int(rng.integers(0, features)),
                "value": float(rng.choice(GRID) + rng.choice([0.0, 0.0, 0.25])),
                "true": left,
                "false": right,
                "missing": int(rng.integers(0, 2)) if missing else 0,
            }
            return me

        grow(0)
        ids = rng.permutation(len(rows)) + 3 if shuffle else np.arange(len(rows))
        order = [0, *(rng.permutation(np.arange(1, len(rows))) if shuffle else range(1, len(rows)))]
        for k in order:
            row = rows[k]
            cols["treeids"].append(tree)
            cols["nodeids"].append(int(ids[k]))
            cols["modes"].append(row["mode"])
            if row["mode"] == "LEAF":
                cols["featureids"].append(0)
                cols["values"].append(0.0)
                cols["truenodeids"].append(0)
                cols["falsenodeids"].append(0)
                cols["missing"].append(0)
                if weights == "all":
                    targets = list(range(outputs))
                elif weights == "class1":
                    targets = [1]
                else:
                    targets = [int(rng.integers(0, outputs))]
                for t in targets:
                    w = float(rng.random()) if positive else float(rng.standard_normal())
                    cols["w_tree"].append(tree)
                    cols["w_node"].append(int(ids[k]))
                    cols["w_id"].append(t)
                    cols["w_val"].append(round(w, 3))
            else:
                cols["featureids"].append(row["feature"])
                cols["values"].append(row["value"])
                cols["truenodeids"].append(int(ids[row["true"]]))
                cols["falsenodeids"].append(int(ids[row["false"]]))
                cols["missing"].append(row["missing"])
    attrs: dict[str, Any] = {
        "nodes_treeids": cols["treeids"],
        "nodes_nodeids": cols["nodeids"],
        "nodes_featureids": cols["featureids"],
        "nodes_modes": cols["modes"],
        "nodes_values": cols["values"],
        "nodes_truenodeids": cols["truenodeids"],
        "nodes_falsenodeids": cols["falsenodeids"],
        f"{prefix}_treeids": cols["w_tree"],
        f"{prefix}_nodeids": cols["w_node"],
        f"{prefix}_ids": cols["w_id"],
        f"{prefix}_weights": cols["w_val"],
    }
    if missing:
        attrs["nodes_missing_value_tracks_true"] = cols["missing"]
    return attrs


def as_tensors(attrs: dict[str, Any], names: Sequence[str]) -> dict[str, Any]:
    """The opset-3 form: ``name_as_tensor`` float32 tensors instead of float lists."""
    out = dict(attrs)
    for name in names:
        if name in out:
            out[f"{name}_as_tensor"] = numpy_helper.from_array(
                np.asarray(out.pop(name), dtype=np.float32), f"{name}_as_tensor"
            )
    return out


def regressor_attrs(seed: int, targets: int, **kw: Any) -> dict[str, Any]:
    return random_forest(seed, outputs=targets, **kw) | {"n_targets": targets}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("missing", [False, True])
def test_tree_regressor_modes(mode: str, missing: bool) -> None:
    attrs = regressor_attrs(11, 1, modes=[mode], missing=missing, depth=5, n_trees=6)
    x = grid_inputs((40, 5), 12, nan=0.15)
    check_ml("TreeEnsembleRegressor", {"X": x}, ["Y"], attrs)


def test_tree_mixed_modes_and_thresholds_at_infinity() -> None:
    attrs = regressor_attrs(13, 2, modes=MODES, missing=True, depth=6, n_trees=8)
    values = attrs["nodes_values"]
    for k in range(0, len(values), 7):  # some thresholds at +-inf: x < -inf never, x >= -inf always
        values[k] = float(np.inf if k % 2 else -np.inf)
    x = grid_inputs((50, 5), 14, nan=0.1)
    x[::9, 0] = np.inf
    x[::11, 1] = -np.inf
    check_ml("TreeEnsembleRegressor", {"X": x}, ["Y"], attrs)


@pytest.mark.parametrize("aggregate", ["SUM", "AVERAGE", "MIN", "MAX"])
@pytest.mark.parametrize("targets", [1, 3])
@pytest.mark.parametrize("base", [False, True])
def test_tree_regressor_aggregates(aggregate: str, targets: int, base: bool) -> None:
    attrs = regressor_attrs(20 + targets, targets, weights="one" if targets > 1 else "all", n_trees=5)
    attrs["aggregate_function"] = aggregate
    if base:
        attrs["base_values"] = [0.5 * (t + 1) for t in range(targets)]
    x = grid_inputs((30, 5), 21)
    check_ml("TreeEnsembleRegressor", {"X": x}, ["Y"], attrs)


@pytest.mark.parametrize("post", POSTS)
def test_tree_regressor_post_transforms(post: str) -> None:
    attrs = regressor_attrs(30, 4, positive=post == "PROBIT") | {"post_transform": post}
    if post == "PROBIT":  # probit of values in (0, 1)
        attrs["aggregate_function"] = "AVERAGE"
    x = grid_inputs((25, 5), 31)
    check_ml("TreeEnsembleRegressor", {"X": x}, ["Y"], attrs, rtol=1e-4)
    # One target: onnxruntime applies PROBIT only.
    one = regressor_attrs(32, 1, positive=True) | {"post_transform": post, "aggregate_function": "AVERAGE"}
    check_ml("TreeEnsembleRegressor", {"X": x}, ["Y"], one, rtol=1e-4)


def test_tree_regressor_opset3_tensors() -> None:
    attrs = regressor_attrs(40, 2, modes=["BRANCH_LEQ", "BRANCH_GT"], missing=True) | {"base_values": [1.0, -1.0]}
    attrs = as_tensors(attrs, ["nodes_values", "target_weights", "base_values"])
    x = grid_inputs((20, 5), 41, nan=0.1)
    check_ml("TreeEnsembleRegressor", {"X": x}, ["Y"], attrs, ml_opset=3)
    check_ml("TreeEnsembleRegressor", {"X": x}, ["Y"], attrs, ml_opset=3, batch=True)


def test_tree_regressor_double_tensor_refused() -> None:
    attrs = regressor_attrs(42, 1)
    attrs["nodes_values_as_tensor"] = numpy_helper.from_array(np.asarray(attrs.pop("nodes_values"), np.float64), "v")
    x = grid_inputs((3, 5), 43)
    model = ml_model("TreeEnsembleRegressor", {"X": x}, ["Y"], attrs, ml_opset=3)
    with pytest.raises(ConversionRefused):  # onnxruntime rejects it as well (at analysis) - or the lowering does
        convert_model(model, {"X": x})


@pytest.mark.parametrize("dtype", [np.int64, np.int32])
def test_tree_integer_input(dtype: Any) -> None:
    # onnxruntime's TreeEnsembleClassifier takes integer inputs (its regressor does not).
    attrs = random_forest(44, outputs=3, prefix="class", modes=MODES) | {"classlabels_int64s": [0, 1, 2]}
    x = np.random.default_rng(45).integers(-3, 4, (30, 5)).astype(dtype)
    check_ml("TreeEnsembleClassifier", {"X": x}, ["label", "scores"], attrs, batch=True)


def test_tree_single_leaf_trees_and_batches() -> None:
    attrs = regressor_attrs(46, 1, n_trees=3)
    # A fourth tree that is one leaf.
    attrs["nodes_treeids"].append(3)
    attrs["nodes_nodeids"].append(0)
    attrs["nodes_featureids"].append(0)
    attrs["nodes_modes"].append("LEAF")
    attrs["nodes_values"].append(0.0)
    attrs["nodes_truenodeids"].append(0)
    attrs["nodes_falsenodeids"].append(0)
    for key, value in (("target_treeids", 3), ("target_nodeids", 0), ("target_ids", 0), ("target_weights", 2.5)):
        attrs[key].append(value)
    x = grid_inputs((150, 5), 47)  # more rows than the kernel's block of 64
    check_ml("TreeEnsembleRegressor", {"X": x}, ["Y"], attrs, batch=True)
    # Rank 1: one row, of which onnxruntime lets trees read feature 0 only.
    attrs["nodes_featureids"] = [0] * len(attrs["nodes_featureids"])
    check_ml("TreeEnsembleRegressor", {"X": x[0]}, ["Y"], attrs)


def test_tree_weight_quirks() -> None:
    """Weights on split nodes are ignored; with one target only a leaf's first weight counts; weights are
    summed in (tree, node) order whatever order they are listed in."""
    attrs = regressor_attrs(48, 1, n_trees=3)
    n = len(attrs["target_weights"])
    order = np.random.default_rng(49).permutation(n)
    for key in ("target_treeids", "target_nodeids", "target_ids", "target_weights"):
        attrs[key] = [attrs[key][k] for k in order]
    for k in range(n):  # a second weight on every leaf
        for key, value in (
            ("target_treeids", attrs["target_treeids"][k]),
            ("target_nodeids", attrs["target_nodeids"][k]),
        ):
            attrs[key].append(value)
        attrs["target_ids"].append(0)
        attrs["target_weights"].append(100.0 + k)
    split = attrs["nodes_modes"].index("BRANCH_LEQ")
    for key, value in (
        ("target_treeids", attrs["nodes_treeids"][split]),
        ("target_nodeids", attrs["nodes_nodeids"][split]),
    ):
        attrs[key].append(value)
    attrs["target_ids"].append(0)
    attrs["target_weights"].append(1000.0)
    x = grid_inputs((30, 5), 50)
    check_ml("TreeEnsembleRegressor", {"X": x}, ["Y"], attrs)
    # Two targets: every weight of a leaf counts.
    attrs["n_targets"] = 2
    attrs["target_ids"] = [k % 2 for k in range(len(attrs["target_ids"]))]
    check_ml("TreeEnsembleRegressor", {"X": x}, ["Y"], attrs)


@pytest.mark.parametrize("post", POSTS)
@pytest.mark.parametrize("base", [False, True])
def test_tree_classifier_multiclass(post: str, base: bool) -> None:
    classes = 4
    attrs = random_forest(50, outputs=classes, prefix="class", weights="one", positive=post == "PROBIT", missing=True)
    attrs |= {"classlabels_int64s": [5, 6, 9, 2], "post_transform": post}
    if base:
        attrs["base_values"] = [0.1, -0.2, 0.3, 0.05] if post != "PROBIT" else [0.01, 0.02, 0.03, 0.04]
    x = grid_inputs((30, 5), 51, nan=0.1)
    check_ml("TreeEnsembleClassifier", {"X": x}, ["label", "scores"], attrs, rtol=1e-4, batch=base)


def test_tree_classifier_opset3_tensors() -> None:
    attrs = random_forest(52, outputs=3, prefix="class", modes=["BRANCH_LT", "BRANCH_GTE"])
    attrs |= {"classlabels_int64s": [0, 1, 2], "base_values": [0.5, 0.0, -0.5], "post_transform": "SOFTMAX"}
    attrs = as_tensors(attrs, ["nodes_values", "class_weights", "base_values"])
    x = grid_inputs((20, 5), 53)
    check_ml("TreeEnsembleClassifier", {"X": x}, ["label", "scores"], attrs, ml_opset=3)


# The two-class cases, as onnxruntime distinguishes them: weights for one class only (with all
# weights positive: probabilities; or mixed: margins, as gradient boosting writes them), or for
# both; with 0, 1 or 2 base values. Cases where onnxruntime leaves a score unset are left out.
BINARY_CASES = [
    # (weights, positive, base_values, post)
    ("class1", True, None, "NONE"),
    ("class1", True, None, "LOGISTIC"),
    ("class1", False, None, "NONE"),
    ("class1", False, None, "LOGISTIC"),
    ("class1", False, [0.3, 0.3], "LOGISTIC"),
    ("class1", False, [0.0, 0.4], "NONE"),
    ("class1", True, [0.2], "NONE"),
    ("all", True, None, "NONE"),
    ("all", True, None, "SOFTMAX"),
    ("all", False, [0.25, -0.5], "NONE"),
    ("all", False, [0.25, -0.5], "LOGISTIC"),
    ("all", False, [0.1], "SOFTMAX_ZERO"),
]


@pytest.mark.parametrize("weights,positive,base,post", BINARY_CASES)
def test_tree_classifier_two_classes(weights: str, positive: bool, base: list[float] | None, post: str) -> None:
    attrs = random_forest(60, outputs=2, prefix="class", weights=weights, positive=positive, n_trees=3)
    attrs |= {"classlabels_int64s": [3, 8], "post_transform": post}
    if base is not None:
        attrs["base_values"] = base
    x = grid_inputs((40, 5), 61)
    check_ml("TreeEnsembleClassifier", {"X": x}, ["label", "scores"], attrs)


def test_tree_classifier_two_classes_probit() -> None:
    # One class id, no base values, PROBIT: onnxruntime fills only the first score column.
    attrs = random_forest(62, outputs=2, prefix="class", weights="class1", positive=True, n_trees=2)
    attrs |= {"classlabels_int64s": [0, 1], "post_transform": "PROBIT", "base_values": [0.1]}
    x = grid_inputs((20, 5), 63)
    model = ml_model("TreeEnsembleClassifier", {"X": x}, ["label", "scores"], attrs)
    want = ort_run(model, {"X": x})
    got = run_converted(model, {"X": x})
    np.testing.assert_array_equal(got["label"], want["label"])
    np.testing.assert_allclose(got["scores"][:, 0], want["scores"][:, 0], rtol=1e-5)


def test_tree_refusals() -> None:
    x = grid_inputs((2, 5), 70)
    attrs = random_forest(71, outputs=2, prefix="class") | {"classlabels_strings": ["a", "b"]}
    assert "string class labels" in refusal(
        ml_model("TreeEnsembleClassifier", {"X": x}, ["label", "scores"], attrs), {"X": x}
    )
    # A feature the input does not have.
    attrs = regressor_attrs(72, 1)
    attrs["nodes_featureids"] = [
        f + 10 if m != "LEAF" else 0 for f, m in zip(attrs["nodes_featureids"], attrs["nodes_modes"], strict=True)
    ]
    with pytest.raises(ConversionRefused):
        convert_model(ml_model("TreeEnsembleRegressor", {"X": x}, ["Y"], attrs), {"X": x})


def test_tree_lowering_refusals() -> None:
    """Refusals of the lowering itself (onnxruntime accepts these models)."""
    from agent.convert.ir import Node
    from agent.convert.lower import Unsupported
    from agent.convert.ops import ml

    # A cycle: onnxruntime would loop forever; the kernel must never.
    attrs = {
        "nodes_treeids": [0, 0, 0],
        "nodes_nodeids": [0, 1, 2],
        "nodes_featureids": [0, 0, 0],
        "nodes_modes": ["BRANCH_LEQ", "BRANCH_LEQ", "LEAF"],
        "nodes_values": [0.0, 1.0, 0.0],
        "nodes_truenodeids": [1, 0, 0],
        "nodes_falsenodeids": [2, 2, 0],
        "target_treeids": [0],
        "target_nodeids": [2],
        "target_ids": [0],
        "target_weights": [1.0],
    }
    node = Node("TreeEnsembleRegressor", ML, "t", ["X"], ["Y"], attrs, 1)
    forest = ml._forest_from_attrs(node, "target", "target_ids")
    with pytest.raises(Unsupported, match="cycle"):
        ml._encode_forest(forest, 1, 1, single=True)
    attrs["nodes_truenodeids"] = [1, 2, 0]
    ml._encode_forest(ml._forest_from_attrs(node, "target", "target_ids"), 1, 1, single=True)
    with pytest.raises(Unsupported, match="feature"):
        ml._encode_forest(ml._forest_from_attrs(node, "target", "target_ids"), 0, 1, single=True)


def test_tree_ensemble_opset5() -> None:
    # TreeEnsemble (ai.onnx.ml 5): two trees, one with set membership, NaN going true on one split.
    x = np.array([[1.2, 0.0], [3.4, 1.0], [-0.12, 2.0], [np.nan, 3.0], [12.0, -1.0], [7.0, np.nan]], np.float32)
    attrs = {
        "n_targets": 3,
        "aggregate_function": 1,
        "post_transform": 0,
        "tree_roots": [0, 3],
        "nodes_featureids": [0, 0, 0, 1],
        "nodes_modes": numpy_helper.from_array(np.array([0, 6, 6, 3], np.uint8), "modes"),
        "nodes_splits": numpy_helper.from_array(np.array([11.0, 0.0, 0.0, 1.5], np.float32), "splits"),
        "membership_values": numpy_helper.from_array(
            np.array([1.2, 3.7, 8.0, 9.0, np.nan, 12.0, 7.0, np.nan], np.float32), "members"
        ),
        "nodes_truenodeids": [1, 0, 1, 4],
        "nodes_trueleafs": [0, 1, 1, 1],
        "nodes_falsenodeids": [2, 2, 3, 5],
        "nodes_falseleafs": [0, 1, 1, 1],
        "nodes_missing_value_tracks_true": [0, 0, 1, 1],
        "leaf_targetids": [0, 1, 2, 0, 1, 2],
        "leaf_weights": numpy_helper.from_array(np.array([1, 10, 1000, 100, 0.5, -2], np.float32), "w"),
    }
    check_ml("TreeEnsemble", {"X": x}, ["Y"], attrs, ml_opset=5)


# -- scikit-learn models -------------------------------------------------------------------------


@pytest.mark.parametrize("name", [n for n in cm.SKLEARN_MODELS if n != "mlp"])
def test_sklearn_model(name: str) -> None:
    model = cm.sklearn_onnx(name)
    x = cm.sklearn_inputs(name, 45, seed=11)
    got = assert_matches(model, {"X": x}, batch=True, rtol=1e-5, atol=1e-6)
    estimator = cm.sklearn_estimator(name)
    if name in cm.REGRESSORS:
        np.testing.assert_allclose(got["variable"][:, 0], estimator.predict(x), rtol=1e-4, atol=1e-3)
    elif name == "scaler":
        np.testing.assert_allclose(got["variable"], estimator.transform(x), rtol=1e-5, atol=1e-5)
    else:
        np.testing.assert_array_equal(got["label"], estimator.predict(x))
        np.testing.assert_allclose(got["probabilities"], estimator.predict_proba(x), rtol=1e-4, atol=1e-5)


def test_sklearn_mlp() -> None:
    """MLPClassifier: MatMul/Add/Relu/Softmax/ArgMax (other families) and ArrayFeatureExtractor for the label."""
    model = cm.sklearn_mlp()
    x = cm.sklearn_inputs("mlp", 33, seed=12)
    got = assert_matches(model, {"X": x}, batch=True, rtol=1e-4, atol=1e-6)
    estimator = cm.sklearn_estimator("mlp")
    np.testing.assert_array_equal(got["label"], estimator.predict(x))


def to_onnx(estimator: Any, x: np.ndarray, **options: Any) -> onnx.ModelProto:
    from skl2onnx import to_onnx as skl_to_onnx
    from sklearn.base import is_classifier

    opts = {id(estimator): {"zipmap": False, **options}} if is_classifier(estimator) else None
    return cm.name_batch_dim(skl_to_onnx(estimator, x[:1], options=opts))


def binary_data(n: int = 300, seed: int = 0, nan: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 6)).astype(np.float32)
    y = ((x[:, 0] + 0.5 * x[:, 1] * x[:, 2] + 0.3 * rng.standard_normal(n)) > 0).astype(np.int64) * 5 + 2  # labels 2, 7
    if nan:
        x[rng.random(x.shape) < nan] = np.nan
    return x, y


def test_sklearn_binary_classifiers() -> None:
    from sklearn.ensemble import GradientBoostingClassifier, RandomForestClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.tree import DecisionTreeClassifier

    x, y = binary_data()
    test = binary_data(64, seed=1)[0]
    for est in (
        DecisionTreeClassifier(max_depth=5, random_state=0),
        RandomForestClassifier(n_estimators=5, max_depth=4, random_state=0),
        GradientBoostingClassifier(n_estimators=8, max_depth=3, random_state=0),
        LogisticRegression(),
    ):
        est.fit(x, y)
        got = assert_matches(to_onnx(est, x), {"X": test}, batch=True, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(got["label"], est.predict(test), err_msg=type(est).__name__)
        np.testing.assert_allclose(got["probabilities"], est.predict_proba(test), rtol=1e-4, atol=1e-5)


def test_sklearn_boosting_and_missing_values() -> None:
    from sklearn.ensemble import GradientBoostingRegressor, RandomForestClassifier
    from sklearn.tree import DecisionTreeClassifier, DecisionTreeRegressor

    x, y = binary_data(nan=0.1)
    test = binary_data(80, seed=2, nan=0.15)[0]
    yr = np.nan_to_num(x[:, 0]) * 3 + y
    for est in (GradientBoostingRegressor(n_estimators=6, max_depth=3, random_state=0),):
        est.fit(np.nan_to_num(x), yr)
        clean = np.nan_to_num(test)
        got = assert_matches(to_onnx(est, clean), {"X": clean}, batch=True)
        np.testing.assert_allclose(got["variable"][:, 0], est.predict(clean), rtol=1e-4, atol=1e-4)
    # Trees trained with missing values. skl2onnx 1.20 writes nodes_missing_value_tracks_true as all 0,
    # so NaN goes the false way whatever scikit-learn learnt: rows with NaN match onnxruntime, the
    # others scikit-learn too.
    for est in (
        DecisionTreeRegressor(max_depth=5, random_state=0),
        DecisionTreeClassifier(max_depth=5, random_state=0),
        RandomForestClassifier(n_estimators=4, max_depth=4, random_state=0),
    ):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            est.fit(x, yr if est.__class__.__name__.endswith("Regressor") else y)
            model = to_onnx(est, x)
        got = assert_matches(model, {"X": test}, batch=True, rtol=1e-5, atol=1e-5)
        clean = ~np.isnan(test).any(axis=1)
        if "label" in got:
            np.testing.assert_array_equal(got["label"][clean], est.predict(test[clean]))
            np.testing.assert_allclose(
                got["probabilities"][clean], est.predict_proba(test[clean]), rtol=1e-4, atol=1e-5
            )
        else:
            np.testing.assert_allclose(got["variable"][clean, 0], est.predict(test[clean]), rtol=1e-4, atol=1e-4)


def test_zipmap_refused_with_hint() -> None:
    from skl2onnx import to_onnx as skl_to_onnx

    est = cm.sklearn_estimator("decision_tree")
    x = cm.sklearn_inputs("decision_tree", 2)
    model = cm.name_batch_dim(skl_to_onnx(est, x[:1]))  # zipmap on (the default)
    assert "zipmap" in refusal(model, {"X": x}, batch=True)


# -- ONNX's node tests in the ai.onnx.ml domain ----------------------------------------------


def ml_node_cases() -> list[Any]:
    from onnx.backend.test.case.node import collect_testcases

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cases = collect_testcases(None)
    return [c for c in cases if any(n.domain == ML for n in c.model.graph.node)]


# Node tests that are out of reach: string tensors and float64 are not served.
UNSUPPORTED_NODE_TESTS = {
    "test_ai_onnx_ml_label_encoder_string_int": "string input",
    "test_ai_onnx_ml_label_encoder_string_int_no_default": "string input",
    "test_ai_onnx_ml_label_encoder_tensor_mapping": "string input",
    "test_ai_onnx_ml_label_encoder_tensor_value_only_mapping": "string input",
    "test_ai_onnx_ml_tree_ensemble_single_tree": "float64 input",
}


@pytest.mark.parametrize("case", ml_node_cases(), ids=lambda c: c.name)
def test_onnx_ml_node_case(case: Any) -> None:
    from agent.convert.backend import EdgeBackend

    inputs, outputs = case.data_sets[0]
    if case.name in UNSUPPORTED_NODE_TESTS:
        with pytest.raises(ConversionRefused):
            EdgeBackend.prepare(case.model).run(inputs)
        return
    got = EdgeBackend.prepare(case.model).run(inputs)
    for g, want in zip(got, outputs, strict=True):
        np.testing.assert_allclose(g, want, rtol=case.rtol, atol=case.atol)

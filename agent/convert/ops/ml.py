"""Family "ml" (native/onnx/ops_ml.c): the ai.onnx.ml ops that scikit-learn models use (skl2onnx).

Scaler, Normalizer, LinearClassifier, LinearRegressor, TreeEnsembleClassifier,
TreeEnsembleRegressor (opsets 1 and 3, the ``*_as_tensor`` attributes in float
only), TreeEnsemble (opset 5), ArrayFeatureExtractor and Binarizer. ZipMap and
string class labels are refused: their outputs (maps, strings) cannot be served.

The results follow onnxruntime's CPU kernels, the converter's reference: float32
arithmetic, trees summed in the order onnxruntime sums them, its post-transforms
(including its probit approximation) and its quirks in the two-class case of
TreeEnsembleClassifier.

Tree ensembles are encoded at build time into compact arrays the kernel walks:

- ``nodes``: int32 [n_splits, 4] per split node: threshold (float32 bits), feature
  index | kind flags, left child, right child. A child >= 0 is a split node; a
  child < 0 is the leaf ``~child``. Every ONNX comparison mode is brought to
  "go left iff ``x <= t``" (or ``x == t`` for BRANCH_EQ/NEQ): ``x < t`` is
  ``x <= nextafter(t, -inf)`` for float32 ``x``, the ``>`` modes swap the
  children; a flag sends NaN left where the ONNX node sends it to the side that
  is now the left one (``missing_value_tracks_true``, or NaN failing a ``>``).
- ``roots``: int32 [n_trees], the root of each tree (a split index or ``~leaf``).
- ``leaf_start``/``leaf_ids``/``leaf_values``: each leaf's (target or class,
  weight) pairs, in onnxruntime's order; "dense" when every leaf has one weight
  per output in output order (scikit-learn's forests): ``leaf_values`` alone.

The kernel scores rows in blocks of 64, tree by tree, four rows walking a tree at
once so that their node loads overlap.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from agent.convert.ir import Node
from agent.convert.lower import Lowerer, Unsupported
from agent.convert.ops import FAMILY_BASE, lowering

BASE = FAMILY_BASE["ml"]
SCALER = BASE + 0
NORMALIZER = BASE + 1
LINEAR = BASE + 2
TREES = BASE + 3
ARRAY_FEATURE_EXTRACTOR = BASE + 4
BINARIZER = BASE + 5
OPCODES = {
    "scaler": SCALER,
    "normalizer": NORMALIZER,
    "linear": LINEAR,
    "trees": TREES,
    "array_feature_extractor": ARRAY_FEATURE_EXTRACTOR,
    "binarizer": BINARIZER,
}

ML = "ai.onnx.ml"
POST_TRANSFORMS = {"NONE": 0, "LOGISTIC": 1, "SOFTMAX": 2, "SOFTMAX_ZERO": 3, "PROBIT": 4}
POST_NONE, POST_LOGISTIC, POST_SOFTMAX, POST_SOFTMAX_ZERO, POST_PROBIT = range(5)
NORMS = {"MAX": 0, "L1": 1, "L2": 2}
AGGREGATES = {"AVERAGE": 0, "SUM": 1, "MIN": 2, "MAX": 3}
AGG_AVERAGE, AGG_SUM, AGG_MIN, AGG_MAX = range(4)
# Tree kernel modes (iattr[0]).
TREE_REGRESSOR_1, TREE_REGRESSOR_N, TREE_CLASSIFIER = range(3)
# Split node kinds, in the bits above the feature index.
KIND_EQ = 1 << 24
KIND_NAN_LEFT = 1 << 25
MAX_FEATURES = 1 << 24
# Rows the tree kernel scores together (their scores live in scratch).
TREE_BLOCK = 64
NUMERIC_INPUTS = (np.dtype(np.float32), np.dtype(np.int32), np.dtype(np.int64))
STRING_LABELS = (
    "string class labels (classlabels_strings) cannot be served: only numeric tensors can; train on integer labels"
)
ZIPMAP_HINT = (
    "ZipMap outputs a sequence of maps, which cannot be served: convert with "
    "options={id(model): {'zipmap': False}} to get the probabilities as a tensor"
)


# -- helpers ----------------------------------------------------------------------------


def _text(value: Any, default: str) -> str:
    if value is None:
        return default
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


def _post_transform(node: Node) -> int:
    name = _text(node.attr("post_transform"), "NONE")
    if name not in POST_TRANSFORMS:
        raise Unsupported(f"post_transform {name!r} is not one of {', '.join(POST_TRANSFORMS)}")
    return POST_TRANSFORMS[name]


def _numeric_input(node: Node, lw: Lowerer, index: int = 0, dtypes: tuple[np.dtype, ...] = NUMERIC_INPUTS) -> None:
    value = lw.value(node.inputs[index])
    if value.dtype not in dtypes:
        raise Unsupported(
            f"input {index} has element type {value.dtype}; supported: {', '.join(str(d) for d in dtypes)}"
        )


def _rows_features(node: Node, lw: Lowerer) -> tuple[int, int]:
    """(rows at batch 1, features) of a [N, F] or [F] input, as onnxruntime's ML kernels read it."""
    x = lw.value(node.inputs[0])
    if len(x.shape) == 1:
        if x.batched:
            raise Unsupported("a one-dimensional input is one row of features; it cannot carry the batch")
        return 1, x.shape[0]
    if len(x.shape) == 2:
        return x.shape[0], x.shape[1]
    raise Unsupported(f"input has rank {len(x.shape)}; supported: 1 ([features]) or 2 ([rows, features])")


def _floats(node: Node, name: str) -> np.ndarray | None:
    """A float attribute (list) or its ``*_as_tensor`` form (float32 only), as float32; None when absent."""
    plain = node.attr(name)
    tensor = node.attr(f"{name}_as_tensor")
    if plain is not None and tensor is not None:
        raise Unsupported(f"both {name} and {name}_as_tensor are set")
    if tensor is not None:
        array = np.asarray(tensor)
        if array.dtype != np.float32:
            raise Unsupported(f"{name}_as_tensor has element type {array.dtype}; only float32 is supported")
        return array.reshape(-1)
    if plain is None:
        return None
    return np.asarray(plain, dtype=np.float32).reshape(-1)


def _ints(node: Node, name: str) -> np.ndarray:
    value = node.attr(name)
    return np.asarray([] if value is None else value, dtype=np.int64).reshape(-1)


# -- before analysis ------------------------------------------------------------------------


def early_problem(node: Node) -> str | None:
    """Why an ai.onnx.ml node can never be converted, said before onnxruntime runs the model
    (agent/convert/analyze.py): afterwards its map or string outputs would only be named by type."""
    if node.op_type == "ZipMap":
        return ZIPMAP_HINT
    if node.attr("classlabels_strings"):
        return STRING_LABELS
    return None


def rewrite_model(model: Any) -> Any:
    """ONNX-level rewrites that analysis needs (agent/convert/analyze.py calls it first); ``model`` is not changed.

    ArrayFeatureExtractor on a one-dimensional X gives a [1, k] result: with indices that carry the
    batch (MLPClassifier's label, ``classes[argmax]``), the batch would sit in dimension 1. When
    that result is only reshaped, Gather(X, indices) (the indices' shape, batch first, same
    values in the same order) replaces it, and the Reshapes after it give what they gave before.
    """
    import onnx
    from onnx import numpy_helper

    graph = model.graph
    if not any(p.domain == ML and p.op_type == "ArrayFeatureExtractor" for p in graph.node):
        return model
    # Small constants only (the X and shapes this looks at): weights are not decoded.
    consts: dict[str, np.ndarray] = {
        init.name: numpy_helper.to_array(init)
        for init in graph.initializer
        if len(init.dims) <= 1 and not init.data_location
    }
    for proto in graph.node:
        if proto.op_type == "Constant" and proto.domain in ("", "ai.onnx") and proto.output:
            for attr in proto.attribute:
                if attr.name == "value" and len(attr.t.dims) <= 1:
                    consts[proto.output[0]] = numpy_helper.to_array(attr.t)
    outputs = {o.name for o in graph.output}
    targets = []
    for k, proto in enumerate(graph.node):
        if proto.domain != ML or proto.op_type != "ArrayFeatureExtractor" or len(proto.input) < 2:
            continue
        x = consts.get(proto.input[0])
        result = proto.output[0] if proto.output else ""
        if x is None or x.ndim != 1 or not result or result in outputs:
            continue
        users = [n for n in graph.node if result in n.input]
        if users and all(_plain_reshape(n, result, consts) for n in users):
            targets.append(k)
    if not targets:
        return model
    rewritten = onnx.ModelProto()
    rewritten.CopyFrom(model)
    for k in targets:
        old = rewritten.graph.node[k]
        gather = onnx.helper.make_node("Gather", [old.input[0], old.input[1]], [old.output[0]], name=old.name, axis=0)
        rewritten.graph.node[k].CopyFrom(gather)
        stale = [vi for vi in rewritten.graph.value_info if vi.name == old.output[0]]
        for vi in stale:
            rewritten.graph.value_info.remove(vi)
    return rewritten


def _plain_reshape(proto: Any, name: str, consts: dict[str, np.ndarray]) -> bool:
    """A Reshape of ``name`` to a constant shape that does not copy dimensions of its input (no 0)."""
    if proto.op_type != "Reshape" or proto.domain not in ("", "ai.onnx") or len(proto.input) < 2:
        return False
    if proto.input[0] != name or name in proto.input[1:]:
        return False
    shape = consts.get(proto.input[1])
    allowzero = any(a.name == "allowzero" and a.i for a in proto.attribute)
    return shape is not None and (allowzero or not bool(np.any(np.asarray(shape) == 0)))


# -- ZipMap -----------------------------------------------------------------------------


@lowering("ZipMap", domain=ML)
def lower_zipmap(node: Node, lw: Lowerer) -> None:
    raise Unsupported(ZIPMAP_HINT)


# -- Scaler, Normalizer, Binarizer --------------------------------------------------------


@lowering("Scaler", domain=ML)
def lower_scaler(node: Node, lw: Lowerer) -> None:
    _numeric_input(node, lw)
    x = lw.value(node.inputs[0])
    if not x.shape:
        raise Unsupported("input is a scalar; onnxruntime requires at least one dimension")
    scale = _floats(node, "scale")
    offset = _floats(node, "offset")
    if scale is None or scale.size == 0:
        raise Unsupported("scale is empty")
    if offset is None or offset.size != scale.size:
        raise Unsupported("offset must have as many values as scale")
    stride = x.shape[0] if len(x.shape) == 1 else x.shape[1]
    if scale.size != 1:
        if len(x.shape) == 1 and x.batched:
            raise Unsupported("per-feature scale on a one-dimensional batched input (its length is the batch)")
        if scale.size != stride:
            raise Unsupported(f"scale has {scale.size} values; it needs 1 or {stride} (the input's dimension 1)")
    offset_id = lw.const(offset, f"{node.name}.offset")
    scale_id = lw.const(scale, f"{node.name}.scale")
    lw.emit(SCALER, [lw.input(node, 0), offset_id, scale_id], [lw.output(node, 0)])


@lowering("Normalizer", domain=ML)
def lower_normalizer(node: Node, lw: Lowerer) -> None:
    _numeric_input(node, lw)
    x = lw.value(node.inputs[0])
    if len(x.shape) not in (1, 2):
        raise Unsupported(f"input has rank {len(x.shape)}; onnxruntime's Normalizer takes rank 1 or 2")
    if len(x.shape) == 1 and x.batched:
        raise Unsupported("a one-dimensional input is normalised as one row; it cannot carry the batch")
    norm = _text(node.attr("norm"), "MAX")
    if norm not in NORMS:
        raise Unsupported(f"norm {norm!r} is not one of MAX, L1, L2")
    lw.emit(NORMALIZER, [lw.input(node, 0)], [lw.output(node, 0)], ints=[NORMS[norm]])


@lowering("Binarizer", domain=ML)
def lower_binarizer(node: Node, lw: Lowerer) -> None:
    _numeric_input(node, lw)
    threshold = float(node.attr("threshold", 0.0))
    lw.emit(BINARIZER, [lw.input(node, 0)], [lw.output(node, 0)], floats=[threshold])


# -- ArrayFeatureExtractor ------------------------------------------------------------------


@lowering("ArrayFeatureExtractor", domain=ML)
def lower_array_feature_extractor(node: Node, lw: Lowerer) -> None:
    x = lw.value(node.inputs[0])
    y = lw.value(node.inputs[1])
    if not x.shape:
        raise Unsupported("X is a scalar")
    if y.dtype != np.int64:
        raise Unsupported(f"indices have element type {y.dtype}; int64 expected")
    if y.batch_valued:
        raise Unsupported("indices are computed from the batch size")
    stride = x.shape[-1]
    if len(x.shape) == 1 and x.batched:
        raise Unsupported("X is one-dimensional and batched: its last dimension is the batch")
    if y.const is not None:
        idx = np.asarray(y.const).reshape(-1)
        if idx.size == 0:
            raise Unsupported("no indices")
        bad = idx[(idx < 0) | (idx >= stride)]
        if bad.size:
            raise Unsupported(f"index {int(bad[0])} is out of range for a last dimension of {stride}")
    lw.emit(ARRAY_FEATURE_EXTRACTOR, [lw.input(node, 0), lw.input(node, 1)], [lw.output(node, 0)])


# -- linear models ------------------------------------------------------------------------


@lowering("LinearClassifier", domain=ML)
def lower_linear_classifier(node: Node, lw: Lowerer) -> None:
    _numeric_input(node, lw)
    _, features = _rows_features(node, lw)
    if node.attr("classlabels_strings"):
        raise Unsupported(STRING_LABELS)
    coefficients = _floats(node, "coefficients")
    intercepts = _floats(node, "intercepts")
    if intercepts is None or intercepts.size == 0:
        raise Unsupported("intercepts are missing (onnxruntime takes the number of classes from them)")
    classes = int(intercepts.size)
    if coefficients is None or coefficients.size != classes * features:
        size = 0 if coefficients is None else coefficients.size
        raise Unsupported(
            f"coefficients has {size} values; {classes} classes x {features} features need {classes * features}"
        )
    labels = _ints(node, "classlabels_ints")
    post = _post_transform(node)
    second = 0
    if classes == 1:
        # One score: label = score > 0 ? labels[1] : labels[0]; two given labels add a second score column.
        if labels.size == 2:
            second = 1
            if post == POST_PROBIT:
                raise Unsupported(
                    "PROBIT with one coefficient row and two class labels (onnxruntime leaves half the scores unset)"
                )
        else:
            labels = np.asarray([0, 1], dtype=np.int64)
    elif labels.size < classes:
        raise Unsupported(f"classlabels_ints has {labels.size} labels for {classes} classes")
    if len(node.outputs) < 2 or not node.outputs[1]:
        raise Unsupported("the scores output is missing")
    label_out = lw.value(node.outputs[0])
    if label_out.dtype != np.int64:
        raise Unsupported(f"label output has element type {label_out.dtype}; int64 expected")
    inputs = [
        lw.input(node, 0),
        lw.const(coefficients.reshape(classes, features), f"{node.name}.coefficients"),
        lw.const(intercepts, f"{node.name}.intercepts"),
        lw.const(labels, f"{node.name}.labels"),
    ]
    _linear_scratch(node, lw, features)
    lw.emit(LINEAR, inputs, [lw.output(node, 0), lw.output(node, 1)], ints=[1, classes, features, post, second])


@lowering("LinearRegressor", domain=ML)
def lower_linear_regressor(node: Node, lw: Lowerer) -> None:
    _numeric_input(node, lw, dtypes=(np.dtype(np.float32),))
    _, features = _rows_features(node, lw)
    targets = int(node.attr("targets", 1))
    if targets < 1:
        raise Unsupported(f"targets is {targets}")
    coefficients = _floats(node, "coefficients")
    if coefficients is None or coefficients.size != targets * features:
        size = 0 if coefficients is None else coefficients.size
        raise Unsupported(
            f"coefficients has {size} values; {targets} targets x {features} features need {targets * features}"
        )
    intercepts = _floats(node, "intercepts")
    # onnxruntime uses the intercepts only when there is one per target.
    bias = (
        lw.const(intercepts, f"{node.name}.intercepts") if intercepts is not None and intercepts.size == targets else -1
    )
    post = _post_transform(node)
    inputs = [lw.input(node, 0), lw.const(coefficients.reshape(targets, features), f"{node.name}.coefficients"), bias]
    _linear_scratch(node, lw, features)
    lw.emit(LINEAR, inputs, [lw.output(node, 0)], ints=[0, targets, features, post, 0])


def _linear_scratch(node: Node, lw: Lowerer, features: int) -> None:
    # A row of integer input converted to float.
    if lw.value(node.inputs[0]).dtype != np.float32:
        lw.scratch(fixed=4 * features + 32)


# -- tree ensembles -------------------------------------------------------------------------


@dataclass
class Forest:
    """A tree ensemble in the TreeEnsembleClassifier/Regressor attribute layout, normalised."""

    treeids: np.ndarray
    nodeids: np.ndarray
    featureids: np.ndarray
    modes: list[str]
    values: np.ndarray  # float32 thresholds
    truenodeids: np.ndarray
    falsenodeids: np.ndarray
    missing_true: np.ndarray  # bool per node
    w_treeids: np.ndarray
    w_nodeids: np.ndarray
    w_ids: np.ndarray  # target or class of each weight
    w_values: np.ndarray  # float32
    # Set membership per node (TreeEnsemble opset 5's BRANCH_MEMBER), else None.
    members: list[np.ndarray | None] | None = None


@dataclass
class Encoded:
    nodes: np.ndarray  # int32 [n_splits, 4]
    roots: np.ndarray  # int32 [n_trees]
    leaf_start: np.ndarray  # int32 [n_leaves + 1]
    leaf_ids: np.ndarray  # int32
    leaf_values: np.ndarray  # float32
    only_le: bool  # every split is "x <= t", NaN right: the kernel's fast loop
    dense: bool  # each leaf has one weight per output, in output order: leaf_start/leaf_ids are implied


MODES = ("BRANCH_LEQ", "BRANCH_LT", "BRANCH_GTE", "BRANCH_GT", "BRANCH_EQ", "BRANCH_NEQ", "LEAF", "BRANCH_MEMBER")


def _forest_from_attrs(node: Node, weights_prefix: str, ids_name: str) -> Forest:
    n = _ints(node, "nodes_nodeids").size
    modes = node.attr("nodes_modes") or []
    modes = [_text(m, "") for m in modes]
    values = _floats(node, "nodes_values")
    if values is None:
        values = np.zeros(0, dtype=np.float32)
    arrays = {
        "nodes_treeids": _ints(node, "nodes_treeids"),
        "nodes_featureids": _ints(node, "nodes_featureids"),
        "nodes_truenodeids": _ints(node, "nodes_truenodeids"),
        "nodes_falsenodeids": _ints(node, "nodes_falsenodeids"),
    }
    for name, array in arrays.items():
        if array.size != n:
            raise Unsupported(f"{name} has {array.size} values for {n} nodes")
    if len(modes) != n or values.size != n:
        raise Unsupported(f"nodes_modes/nodes_values do not have one value per node ({n})")
    missing = _ints(node, "nodes_missing_value_tracks_true")
    missing_true = np.zeros(n, dtype=bool)
    missing_true[: min(n, missing.size)] = missing[:n] == 1
    w_values = _floats(node, f"{weights_prefix}_weights")
    w_values = np.zeros(0, dtype=np.float32) if w_values is None else w_values
    w_treeids = _ints(node, f"{weights_prefix}_treeids")
    w_nodeids = _ints(node, f"{weights_prefix}_nodeids")
    w_ids = _ints(node, ids_name)
    if not (w_treeids.size == w_nodeids.size == w_ids.size == w_values.size):
        raise Unsupported(f"the {weights_prefix}_* attributes differ in length")
    for mode in modes:
        if mode not in MODES[:7]:
            raise Unsupported(f"node mode {mode!r} is not one of {', '.join(MODES[:7])}")
    return Forest(
        treeids=arrays["nodes_treeids"],
        nodeids=_ints(node, "nodes_nodeids"),
        featureids=arrays["nodes_featureids"],
        modes=modes,
        values=values.astype(np.float32),
        truenodeids=arrays["nodes_truenodeids"],
        falsenodeids=arrays["nodes_falsenodeids"],
        missing_true=missing_true,
        w_treeids=w_treeids,
        w_nodeids=w_nodeids,
        w_ids=w_ids,
        w_values=w_values.astype(np.float32),
    )


def _below(t: np.float32) -> np.float32:
    """The largest float32 below ``t`` (``x < t`` is ``x <= _below(t)`` for float32 ``x``); NaN for -inf (never)."""
    if np.isneginf(t):
        return np.float32(np.nan)
    return np.nextafter(np.float32(t), np.float32(-np.inf))


def _lookup(trees: np.ndarray, nodes: np.ndarray, q_trees: np.ndarray, q_nodes: np.ndarray) -> np.ndarray:
    """Index of each queried (tree, node) among the nodes, -1 where there is none."""
    _, t_rank = np.unique(np.concatenate([trees, q_trees]), return_inverse=True)
    _, n_rank = np.unique(np.concatenate([nodes, q_nodes]), return_inverse=True)
    width = int(n_rank.max(initial=0)) + 1
    keys = t_rank.reshape(-1).astype(np.int64) * width + n_rank.reshape(-1)
    base, query = keys[: trees.size], keys[trees.size :]
    order = np.argsort(base, kind="stable")
    ordered = base[order]
    if ordered.size > 1 and bool(np.any(ordered[1:] == ordered[:-1])):
        dup = order[1:][ordered[1:] == ordered[:-1]][0]
        raise Unsupported(f"node {int(nodes[dup])} of tree {int(trees[dup])} is defined twice")
    pos = np.minimum(np.searchsorted(ordered, query), max(ordered.size - 1, 0))
    found = ordered[pos] == query
    return np.where(found, order[pos], -1).astype(np.int64)


def _encode_forest(forest: Forest, n_features: int, n_outputs: int, single: bool) -> Encoded:
    """Encode ``forest`` as the kernel's arrays, reproducing how onnxruntime builds and walks it.

    ``single``: one target (onnxruntime then uses each leaf's first weight only, whatever its target id).
    """
    n = len(forest.modes)
    if n == 0:
        raise Unsupported("the ensemble has no nodes")
    if n_features > MAX_FEATURES:
        raise Unsupported(f"the input has {n_features} features; trees can read at most {MAX_FEATURES}")
    is_leaf = np.array([m == "LEAF" for m in forest.modes], dtype=bool)
    splits = np.flatnonzero(~is_leaf)
    leaves = np.flatnonzero(is_leaf)
    split_of = np.full(n, -1, dtype=np.int64)
    leaf_of = np.full(n, -1, dtype=np.int64)
    split_of[splits] = np.arange(splits.size)
    leaf_of[leaves] = np.arange(leaves.size)
    n_w = forest.w_ids.size

    # One look-up for every reference: weights' nodes, then true and false children of splits.
    found = _lookup(
        forest.treeids,
        forest.nodeids,
        np.concatenate([forest.w_treeids, forest.treeids[splits], forest.treeids[splits]]),
        np.concatenate([forest.w_nodeids, forest.truenodeids[splits], forest.falsenodeids[splits]]),
    )
    w_node, true_node, false_node = found[:n_w], found[n_w : n_w + splits.size], found[n_w + splits.size :]

    # Leaves' weights in onnxruntime's order: by (tree, node), then as given; weights on split
    # nodes are ignored (old onnxmltools wrote some).
    if bool(np.any(w_node < 0)):
        k = int(np.flatnonzero(w_node < 0)[0])
        raise Unsupported(
            f"a weight refers to node {int(forest.w_nodeids[k])} of tree {int(forest.w_treeids[k])}, which is missing"
        )
    keep = np.flatnonzero(is_leaf[w_node])
    w_leaf = leaf_of[w_node[keep]]
    w_ids = forest.w_ids[keep]
    if not single and w_ids.size and (int(w_ids.min()) < 0 or int(w_ids.max()) >= n_outputs):
        bad = int(w_ids[(w_ids < 0) | (w_ids >= n_outputs)][0])
        raise Unsupported(f"a weight is for target/class {bad}; there are {n_outputs}")
    order = np.lexsort((keep, w_leaf))
    counts = np.bincount(w_leaf, minlength=leaves.size)
    if bool(np.any(counts == 0)):
        i = int(leaves[np.flatnonzero(counts == 0)[0]])
        raise Unsupported(f"leaf {int(forest.nodeids[i])} of tree {int(forest.treeids[i])} has no weight")
    starts = np.concatenate([[0], np.cumsum(counts)])
    ids = w_ids[order]
    vals = forest.w_values[keep][order]
    if single:
        vals = vals[starts[:-1]]
        ids = np.zeros(leaves.size, dtype=np.int64)
        starts = np.arange(leaves.size + 1)
    n_per_leaf = 1 if single else n_outputs
    dense = bool(np.all(counts == n_per_leaf)) if not single else True
    if dense and not single:
        dense = bool(
            np.array_equal(ids.reshape(-1, n_outputs), np.broadcast_to(np.arange(n_outputs), (leaves.size, n_outputs)))
        )

    # Split nodes: children must exist, in the same tree, not the node itself; features in range.
    for which, child, ids_attr in (("true", true_node, forest.truenodeids), ("false", false_node, forest.falsenodeids)):
        bad_at = np.flatnonzero((child < 0) | (child == splits))
        if bad_at.size:
            i = int(splits[bad_at[0]])
            what = "is the node itself" if child[bad_at[0]] >= 0 else "does not exist"
            raise Unsupported(
                f"node {int(forest.nodeids[i])} of tree {int(forest.treeids[i])}: "
                f"{which} child {int(ids_attr[i])} {what}"
            )
    features = forest.featureids[splits]
    if features.size and (int(features.min()) < 0 or int(features.max()) >= n_features):
        i = int(splits[np.flatnonzero((features < 0) | (features >= n_features))[0]])
        raise Unsupported(
            f"node {int(forest.nodeids[i])} of tree {int(forest.treeids[i])} reads feature "
            f"{int(forest.featureids[i])}; the input has {n_features}"
        )

    # Roots: the first node of each run of equal tree ids, as onnxruntime takes them.
    roots_at = np.flatnonzero(np.concatenate([[True], forest.treeids[1:] != forest.treeids[:-1]]))
    if not (bool(np.all(true_node > splits)) and bool(np.all(false_node > splits))):
        # Children listed before their parent (never so in preorder): look for a cycle.
        _check_acyclic(
            roots_at.tolist(), splits, list(zip(true_node.tolist(), false_node.tolist(), strict=True)), is_leaf
        )

    def ref(i: np.ndarray) -> np.ndarray:
        return np.where(is_leaf[i], ~leaf_of[i], split_of[i])

    # Split records: every mode as "go left iff x <= t" (or x == t), NaN left or right.
    t = forest.values[splits].astype(np.float32)
    below = np.where(np.isneginf(t), np.float32(np.nan), np.nextafter(t, np.float32(-np.inf))).astype(np.float32)
    miss = forest.missing_true[splits]
    true_ref, false_ref = ref(true_node), ref(false_node)
    modes = np.array([forest.modes[i] for i in splits.tolist()], dtype=object)
    swap = np.isin(modes, ["BRANCH_GT", "BRANCH_GTE", "BRANCH_NEQ"])
    thr = np.where(np.isin(modes, ["BRANCH_LT", "BRANCH_GTE"]), below, t)
    eq = np.isin(modes, ["BRANCH_EQ", "BRANCH_NEQ", "BRANCH_MEMBER"])
    # NaN fails every comparison but !=: it goes to the false child unless missing values track true.
    nan_true = miss | (modes == "BRANCH_NEQ")
    nan_left = np.where(swap, ~nan_true, nan_true)
    flags = np.where(eq, KIND_EQ, 0) | np.where(nan_left, KIND_NAN_LEFT, 0)
    records = np.zeros((splits.size, 4), dtype=np.int32)
    records[:, 0] = thr.view(np.int32)
    records[:, 1] = features.astype(np.int64) | flags
    records[:, 2] = np.where(swap, false_ref, true_ref)
    records[:, 3] = np.where(swap, true_ref, false_ref)
    only_le = not bool(np.any(flags))

    # Set membership (TreeEnsemble 5): a chain of equality tests, each failing into the next.
    extra: list[list[int]] = []
    for s in np.flatnonzero(modes == "BRANCH_MEMBER").tolist():
        assert forest.members is not None
        members = forest.members[int(splits[s])]
        values = [] if members is None else members.astype(np.float32).tolist()
        kind = KIND_EQ | (KIND_NAN_LEFT if miss[s] else 0)
        if not values:  # never a member: compare with NaN
            records[s] = _record(np.float32(np.nan), int(features[s]), kind, int(true_ref[s]), int(false_ref[s]))
            continue
        nxt = int(false_ref[s])
        for v in reversed(values[1:]):
            extra.append(_record(np.float32(v), int(features[s]), kind, int(true_ref[s]), nxt))
            nxt = splits.size + len(extra) - 1
        records[s] = _record(np.float32(values[0]), int(features[s]), kind, int(true_ref[s]), nxt)
    nodes = np.concatenate([records, np.asarray(extra, dtype=np.int64).reshape(-1, 4).astype(np.int32)])
    if nodes.shape[0] == 0:
        nodes = np.zeros((1, 4), dtype=np.int32)  # unused: every tree is a single leaf
    return Encoded(
        nodes=np.ascontiguousarray(nodes, dtype=np.int32),
        roots=ref(roots_at).astype(np.int32),
        leaf_start=starts.astype(np.int32),
        leaf_ids=ids.astype(np.int32),
        leaf_values=vals.astype(np.float32),
        only_le=only_le,
        dense=dense,
    )


def _record(threshold: np.float32, feature: int, kind: int, left: int, right: int) -> list[int]:
    bits = int(np.asarray(threshold, dtype=np.float32).view(np.int32))
    return [bits, feature | kind, left, right]


def _check_acyclic(roots: list[int], splits: np.ndarray, children: list[tuple[int, int]], is_leaf: np.ndarray) -> None:
    """Refuse a tree whose walk could loop (onnxruntime would hang on it; the kernel must not)."""
    position = {int(i): k for k, i in enumerate(splits.tolist())}
    state: dict[int, int] = {}  # 1: on the current path, 2: done
    for root in roots:
        if is_leaf[root] or state.get(root) == 2:
            continue
        stack: list[tuple[int, int]] = [(root, 0)]
        state[root] = 1
        while stack:
            current, step = stack.pop()
            if step == 2:
                state[current] = 2
                continue
            stack.append((current, step + 1))
            child = children[position[current]][step]
            if is_leaf[child]:
                continue
            seen = state.get(child)
            if seen == 1:
                raise Unsupported("a tree has a cycle: walking it would never reach a leaf")
            if seen is None:
                state[child] = 1
                stack.append((child, 0))


def _feature_limit(node: Node, lw: Lowerer, features: int) -> int:
    """How many features a tree may read: onnxruntime counts one for a rank-1 input (one row)."""
    return 1 if len(lw.value(node.inputs[0]).shape) == 1 else features


def _tree_inputs(lw: Lowerer, node: Node, enc: Encoded) -> list[int]:
    name = node.name
    unused = np.zeros(1, np.int32)
    return [
        lw.input(node, 0),
        lw.const(enc.nodes, f"{name}.nodes"),
        lw.const(enc.roots, f"{name}.roots"),
        lw.const(unused if enc.dense else enc.leaf_start, f"{name}.leaf_start"),
        lw.const(unused if enc.dense or not enc.leaf_ids.size else enc.leaf_ids, f"{name}.leaf_ids"),
        lw.const(enc.leaf_values if enc.leaf_values.size else np.zeros(1, np.float32), f"{name}.leaf_values"),
    ]


def _tree_scratch(lw: Lowerer, node: Node, n_features: int, n_outputs: int) -> None:
    x = lw.value(node.inputs[0])
    convert = TREE_BLOCK * n_features * 4 if x.dtype != np.float32 else 0
    lw.scratch(fixed=TREE_BLOCK * n_outputs * 5 + convert + 64)


@lowering("TreeEnsembleRegressor", domain=ML)
def lower_tree_regressor(node: Node, lw: Lowerer) -> None:
    _numeric_input(node, lw)
    _, features = _rows_features(node, lw)
    targets = int(node.attr("n_targets", 0) or 0)
    if targets < 1:
        raise Unsupported("n_targets must be at least 1")
    aggregate = _text(node.attr("aggregate_function"), "SUM")
    if aggregate not in AGGREGATES:
        raise Unsupported(f"aggregate_function {aggregate!r} is not one of {', '.join(AGGREGATES)}")
    base = _floats(node, "base_values")
    base = np.zeros(0, np.float32) if base is None else base
    forest = _forest_from_attrs(node, "target", "target_ids")
    _emit_regressor(node, lw, forest, features, targets, AGGREGATES[aggregate], _post_transform(node), base)


def _emit_regressor(
    node: Node, lw: Lowerer, forest: Forest, features: int, targets: int, aggregate: int, post: int, base: np.ndarray
) -> None:
    single = targets == 1
    enc = _encode_forest(forest, _feature_limit(node, lw, features), targets, single)
    if single:
        # onnxruntime's one-target path: base_values count only when there is exactly one.
        mode = TREE_REGRESSOR_1
        base_used = base if base.size == 1 else np.zeros(1, np.float32)
        if post != POST_PROBIT:
            post = POST_NONE  # onnxruntime applies no other transform to a single target
    else:
        # onnxruntime adds base_values only when there is one per target.
        mode = TREE_REGRESSOR_N
        base_used = base if base.size == targets else np.zeros(0, np.float32)
    out = lw.value(node.outputs[0])
    if out.dtype != np.float32:
        raise Unsupported(f"output has element type {out.dtype}; float32 expected")
    base_param = base_used if base_used.size else np.zeros(1, np.float32)
    inputs = [*_tree_inputs(lw, node, enc), lw.const(base_param.astype(np.float32), f"{node.name}.base_values")]
    _tree_scratch(lw, node, features, targets)
    ints = [mode, targets, aggregate, post, features, int(enc.only_le), int(base_used.size), 0, 0, enc.roots.size]
    ints.append(int(enc.dense))
    lw.emit(TREES, inputs, [lw.output(node, 0)], ints=ints)


@lowering("TreeEnsembleClassifier", domain=ML)
def lower_tree_classifier(node: Node, lw: Lowerer) -> None:
    _numeric_input(node, lw)
    _, features = _rows_features(node, lw)
    if node.attr("classlabels_strings"):
        raise Unsupported(STRING_LABELS)
    labels = _ints(node, "classlabels_int64s")
    classes = int(labels.size)
    if classes < 2:
        raise Unsupported(f"{classes} class label(s); at least 2 are needed")
    forest = _forest_from_attrs(node, "class", "class_ids")
    enc = _encode_forest(forest, _feature_limit(node, lw, features), classes, single=False)
    base = _floats(node, "base_values")
    base = np.zeros(0, np.float32) if base is None else base
    if classes > 2 and base.size > classes:
        raise Unsupported(f"base_values has {base.size} values for {classes} classes")
    post = _post_transform(node)
    # onnxruntime's two-class special case: one class id among the weights.
    binary_case = classes == 2 and np.unique(forest.w_ids).size == 1
    all_positive = not bool(np.any(forest.w_values < 0))
    if len(node.outputs) < 2 or not node.outputs[1]:
        raise Unsupported("the scores output is missing")
    if lw.value(node.outputs[0]).dtype != np.int64:
        raise Unsupported("the label output must be int64")
    base_param = base if base.size else np.zeros(1, np.float32)
    inputs = [
        *_tree_inputs(lw, node, enc),
        lw.const(base_param.astype(np.float32), f"{node.name}.base_values"),
        lw.const(labels, f"{node.name}.labels"),
    ]
    _tree_scratch(lw, node, features, classes)
    ints = [TREE_CLASSIFIER, classes, AGG_SUM, post, features, int(enc.only_le), int(base.size)]
    ints += [int(binary_case), int(all_positive), enc.roots.size, int(enc.dense)]
    lw.emit(TREES, inputs, [lw.output(node, 0), lw.output(node, 1)], ints=ints)


# TreeEnsemble (ai.onnx.ml opset 5): nodes_modes as a uint8 tensor.
MODES_V5 = {
    0: "BRANCH_LEQ",
    1: "BRANCH_LT",
    2: "BRANCH_GTE",
    3: "BRANCH_GT",
    4: "BRANCH_EQ",
    5: "BRANCH_NEQ",
    6: "BRANCH_MEMBER",
}
AGGREGATES_V5 = {0: AGG_AVERAGE, 1: AGG_SUM, 2: AGG_MIN, 3: AGG_MAX}


@lowering("TreeEnsemble", domain=ML)
def lower_tree_ensemble(node: Node, lw: Lowerer) -> None:
    _numeric_input(node, lw, dtypes=(np.dtype(np.float32),))
    _, features = _rows_features(node, lw)
    targets = int(node.attr("n_targets", 0) or 0)
    if targets < 1:
        raise Unsupported("n_targets must be at least 1")
    aggregate = AGGREGATES_V5.get(int(node.attr("aggregate_function", 1)))
    if aggregate is None:
        raise Unsupported(f"aggregate_function {node.attr('aggregate_function')} is not 0..3")
    post = int(node.attr("post_transform", 0))
    if post not in range(5):
        raise Unsupported(f"post_transform {post} is not 0..4")
    forest = _forest_from_v5(node)
    _emit_regressor(node, lw, forest, features, targets, aggregate, post, np.zeros(0, np.float32))


def _tensor_attr(node: Node, name: str, dtype: type | None = None) -> np.ndarray | None:
    value = node.attr(name)
    if value is None:
        return None
    array = np.asarray(value).reshape(-1)
    if dtype is not None and array.dtype != dtype:
        raise Unsupported(f"{name} has element type {array.dtype}; {np.dtype(dtype)} is supported")
    return array


def _forest_from_v5(node: Node) -> Forest:
    """TreeEnsemble's layout (node and leaf indices, trees by their roots) as a Forest of tree/node ids."""
    splits = _tensor_attr(node, "nodes_splits", np.float32)
    modes_raw = _tensor_attr(node, "nodes_modes")
    weights = _tensor_attr(node, "leaf_weights", np.float32)
    if splits is None or modes_raw is None or weights is None:
        raise Unsupported("nodes_splits, nodes_modes and leaf_weights are required")
    features = _ints(node, "nodes_featureids")
    true_ids, false_ids = _ints(node, "nodes_truenodeids"), _ints(node, "nodes_falsenodeids")
    true_leaf, false_leaf = _ints(node, "nodes_trueleafs"), _ints(node, "nodes_falseleafs")
    missing = _ints(node, "nodes_missing_value_tracks_true")
    roots = _ints(node, "tree_roots")
    targets = _ints(node, "leaf_targetids")
    n = splits.size
    for name, array in (
        ("nodes_modes", modes_raw),
        ("nodes_featureids", features),
        ("nodes_truenodeids", true_ids),
        ("nodes_falsenodeids", false_ids),
        ("nodes_trueleafs", true_leaf),
        ("nodes_falseleafs", false_leaf),
    ):
        if array.size != n:
            raise Unsupported(f"{name} has {array.size} values for {n} nodes")
    if targets.size != weights.size:
        raise Unsupported("leaf_targetids and leaf_weights differ in length")
    modes = []
    for m in modes_raw.tolist():
        if int(m) not in MODES_V5:
            raise Unsupported(f"node mode {int(m)} is not 0..6")
        modes.append(MODES_V5[int(m)])
    member_values = _tensor_attr(node, "membership_values")
    members: list[np.ndarray | None] = [None] * n
    if "BRANCH_MEMBER" in modes:
        if member_values is None:
            raise Unsupported("BRANCH_MEMBER nodes without membership_values")
        groups: list[list[float]] = [[]]
        for v in member_values.astype(np.float32).tolist():
            if np.isnan(v):
                groups.append([])
            else:
                groups[-1].append(v)
        member_nodes = [i for i, m in enumerate(modes) if m == "BRANCH_MEMBER"]
        if len(groups) < len(member_nodes):
            raise Unsupported("membership_values has fewer sets than BRANCH_MEMBER nodes")
        for k, i in enumerate(member_nodes):
            members[i] = np.asarray(groups[k], dtype=np.float32)

    # Re-express as tree/node ids: every split node and every leaf gets a node id in its tree.
    tree_of_split: dict[int, int] = {}
    tree_of_leaf: dict[int, int] = {}
    out_tree: list[int] = []
    out_node: list[int] = []
    out_feat: list[int] = []
    out_mode: list[str] = []
    out_val: list[float] = []
    out_true: list[int] = []
    out_false: list[int] = []
    out_miss: list[bool] = []
    out_members: list[np.ndarray | None] = []
    w_tree: list[int] = []
    w_node: list[int] = []
    w_ids: list[int] = []
    w_vals: list[float] = []
    for tree, root in enumerate(roots.tolist()):
        ids: dict[tuple[str, int], int] = {}
        # Root is a split node index (a tree that is a single leaf is not expressible in TreeEnsemble).
        stack = [("split", int(root))]
        order: list[tuple[str, int]] = []
        while stack:
            item = stack.pop()
            if item in ids:
                continue
            kind, i = item
            if kind == "split" and not 0 <= i < n:
                raise Unsupported(f"tree {tree}: node index {i} is out of range")
            if kind == "leaf" and not 0 <= i < weights.size:
                raise Unsupported(f"tree {tree}: leaf index {i} is out of range")
            if kind == "split" and (tree_of_split.get(i, tree) != tree):
                raise Unsupported(f"node {i} is shared by two trees")
            if kind == "leaf" and (tree_of_leaf.get(i, tree) != tree):
                raise Unsupported(f"leaf {i} is shared by two trees")
            ids[item] = len(ids)
            order.append(item)
            if kind == "split":
                tree_of_split[i] = tree
                stack.append(("leaf" if false_leaf[i] else "split", int(false_ids[i])))
                stack.append(("leaf" if true_leaf[i] else "split", int(true_ids[i])))
            else:
                tree_of_leaf[i] = tree
            if len(ids) > 4 * (n + weights.size) + 4:
                raise Unsupported("a tree has a cycle")
        for kind, i in order:
            out_tree.append(tree)
            out_node.append(ids[(kind, i)])
            if kind == "split":
                out_feat.append(int(features[i]))
                out_mode.append(modes[i])
                out_val.append(float(splits[i]))
                out_true.append(ids[("leaf" if true_leaf[i] else "split", int(true_ids[i]))])
                out_false.append(ids[("leaf" if false_leaf[i] else "split", int(false_ids[i]))])
                out_miss.append(bool(i < missing.size and missing[i] == 1))
                out_members.append(members[i])
            else:
                out_feat.append(0)
                out_mode.append("LEAF")
                out_val.append(0.0)
                out_true.append(0)
                out_false.append(0)
                out_miss.append(False)
                out_members.append(None)
                w_tree.append(tree)
                w_node.append(ids[(kind, i)])
                w_ids.append(int(targets[i]))
                w_vals.append(float(weights[i]))
    return Forest(
        treeids=np.asarray(out_tree, dtype=np.int64),
        nodeids=np.asarray(out_node, dtype=np.int64),
        featureids=np.asarray(out_feat, dtype=np.int64),
        modes=out_mode,
        values=np.asarray(out_val, dtype=np.float32),
        truenodeids=np.asarray(out_true, dtype=np.int64),
        falsenodeids=np.asarray(out_false, dtype=np.int64),
        missing_true=np.asarray(out_miss, dtype=bool),
        w_treeids=np.asarray(w_tree, dtype=np.int64),
        w_nodeids=np.asarray(w_node, dtype=np.int64),
        w_ids=np.asarray(w_ids, dtype=np.int64),
        w_values=np.asarray(w_vals, dtype=np.float32),
        members=out_members,
    )

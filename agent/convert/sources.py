"""Where a model to convert comes from: an ONNX file, or an MLflow model directory.

MLflow directories are read from their ``MLmodel`` file: the ``onnx`` flavor is
an ONNX file already; the ``sklearn`` flavor is converted with skl2onnx (class
probabilities as a plain tensor: ZipMap off). The ``pytorch`` flavor is refused
with the way round it (export with ``torch.onnx.export``, build with ``--onnx``).

Model files come from users' machines and registries, so they are read with
care: bounded sizes, no symbolic link followed, external ONNX data only from
plain files beside the model, and a pickled scikit-learn model (which runs code
when loaded) only when the caller says it trusts it. The skops format, MLflow
3's default, is loaded with skops' own list of trusted types.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.artefacts import read_bounded_file
from agent.errors import ConversionRefused, InvalidModel

MLMODEL = "MLmodel"
MAX_MLMODEL_BYTES = 1 << 20
MAX_ONNX_BYTES = 2 << 30  # protobuf's own limit for one message
MAX_SKLEARN_BYTES = 1 << 30
# skl2onnx's opsets: the newest the converter's op table covers.
SKLEARN_TARGET_OPSET = {"": 21, "ai.onnx.ml": 3}


@dataclass
class Source:
    model: Any  # onnx.ModelProto
    name: str  # suggested model name
    description: str


def read_regular(path: Path, limit: int) -> bytes:
    """A regular file's bytes (agent.artefacts' rules: no link, no special file, bounded size)."""
    try:
        return read_bounded_file(path, limit)
    except InvalidModel as exc:
        raise ConversionRefused(str(exc)) from exc


def default_name(stem: str) -> str:
    """A valid model name from a file or directory name."""
    import re

    name = re.sub(r"[^a-z0-9._-]+", "-", stem.lower()).strip("-._")
    return (name or "model")[:63]


def from_onnx_file(path: Path) -> Source:
    import onnx
    from onnx.external_data_helper import load_external_data_for_model, uses_external_data

    data = read_regular(path, MAX_ONNX_BYTES)
    try:
        model = onnx.load_from_string(data)
    except Exception as exc:
        raise ConversionRefused(f"{path} is not an ONNX model: {exc}") from exc
    external = [t for t in _all_tensors(model) if uses_external_data(t)]
    if external:
        base = path.parent
        for tensor in external:
            location = next((e.value for e in tensor.external_data if e.key == "location"), "")
            if not location or "/" in location or "\\" in location or location in (".", ".."):
                raise ConversionRefused(
                    f"{path}: tensor {tensor.name!r} keeps its data in {location!r}; external data must be a "
                    "plain file beside the model"
                )
            target = base / location
            if target.is_symlink() or not target.is_file():
                raise ConversionRefused(f"{path}: external data file {location!r} is missing or not a regular file")
        try:
            load_external_data_for_model(model, str(base))
        except Exception as exc:
            raise ConversionRefused(f"{path}: cannot load external data: {exc}") from exc
    return Source(model=model, name=default_name(path.stem), description=f"converted from {path.name}")


def _all_tensors(model: Any) -> list[Any]:
    tensors = list(model.graph.initializer)
    for node in model.graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                tensors.append(attr.t)
    return tensors


def is_mlflow_dir(path: Path) -> bool:
    return path.is_dir() and (path / MLMODEL).is_file()


def from_mlflow_dir(path: Path, *, allow_pickle: bool = False) -> Source:
    import yaml

    text = read_regular(path / MLMODEL, MAX_MLMODEL_BYTES)
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConversionRefused(f"{path / MLMODEL} is not valid YAML: {exc}") from exc
    flavors = doc.get("flavors") if isinstance(doc, dict) else None
    if not isinstance(flavors, dict):
        raise ConversionRefused(f"{path / MLMODEL} has no flavors")
    name = default_name(path.resolve().name)
    if isinstance(flavors.get("onnx"), dict):
        source = from_onnx_file(path / _plain_name(path, flavors["onnx"].get("data", "model.onnx")))
        return Source(source.model, name, f"MLflow onnx model {path.name}")
    if isinstance(flavors.get("sklearn"), dict):
        return _from_sklearn_flavor(path, flavors["sklearn"], doc, name, allow_pickle=allow_pickle)
    known = ", ".join(sorted(k for k in flavors if k != "python_function")) or "none"
    if "pytorch" in flavors:
        raise ConversionRefused(
            f"{path}: the pytorch flavor is not converted directly; export the module with torch.onnx.export "
            "(a dynamic batch axis) and build with --onnx"
        )
    raise ConversionRefused(f"{path}: no flavor this converter reads (onnx, sklearn); the model has: {known}")


def _plain_name(base: Path, name: Any) -> str:
    if not isinstance(name, str) or not name or "/" in name or name in (".", ".."):
        raise ConversionRefused(f"{base / MLMODEL} names a model file {name!r}; it must be a plain file name")
    return name


def _from_sklearn_flavor(
    path: Path, flavor: dict[str, Any], doc: dict[str, Any], name: str, *, allow_pickle: bool
) -> Source:
    fmt = str(flavor.get("serialization_format") or "cloudpickle")
    model_file = path / _plain_name(path, flavor.get("pickled_model", "model.pkl"))
    data = read_regular(model_file, MAX_SKLEARN_BYTES)
    if fmt == "skops":
        try:
            import skops.io as sio
        except ImportError as exc:
            raise ConversionRefused(
                "reading an MLflow skops model needs the skops package (pip install skops)"
            ) from exc
        untrusted = sio.get_untrusted_types(data=data)
        if untrusted:
            raise ConversionRefused(
                f"{model_file} holds types skops does not trust: {', '.join(untrusted[:8])}; "
                "only scikit-learn's own estimators are converted"
            )
        estimator = sio.loads(data)
    elif fmt in ("pickle", "cloudpickle"):
        if not allow_pickle:
            raise ConversionRefused(
                f"{model_file} is a pickle, which runs code when loaded; pass --allow-pickle if you trust "
                "where it came from (or save it with MLflow's skops format)"
            )
        import pickle

        estimator = pickle.loads(data)
    else:
        raise ConversionRefused(f"{model_file}: serialization format {fmt!r} is not supported (skops, pickle)")
    model = sklearn_to_onnx(estimator, n_features=_signature_features(doc))
    return Source(model, name, f"MLflow sklearn model {path.name} ({type(estimator).__name__})")


def _signature_features(doc: dict[str, Any]) -> int | None:
    """Feature count from an MLflow signature: a tensor spec [-1, F] or F column specs."""
    import json

    signature = doc.get("signature")
    if not isinstance(signature, dict) or not isinstance(signature.get("inputs"), str):
        return None
    try:
        inputs = json.loads(signature["inputs"])
    except ValueError:
        return None
    if not isinstance(inputs, list) or not inputs:
        return None
    first = inputs[0]
    if isinstance(first, dict) and first.get("type") == "tensor":
        shape = (first.get("tensor-spec") or {}).get("shape")
        if isinstance(shape, list) and len(shape) == 2 and isinstance(shape[1], int) and shape[1] > 0:
            return int(shape[1])
        return None
    return len(inputs)


def sklearn_to_onnx(estimator: Any, *, n_features: int | None = None) -> Any:
    """A fitted scikit-learn estimator or pipeline as ONNX: input "X" float32 [N, F]."""
    try:
        from skl2onnx import convert_sklearn
        from skl2onnx.common.data_types import FloatTensorType
    except ImportError as exc:
        raise ConversionRefused(
            "converting scikit-learn models needs skl2onnx (pip install edge-agent[convert])"
        ) from exc
    features = n_features or getattr(estimator, "n_features_in_", None)
    if not isinstance(features, int) or features < 1:
        raise ConversionRefused("cannot tell how many features the scikit-learn model takes (no n_features_in_)")
    final = estimator.steps[-1][1] if hasattr(estimator, "steps") else estimator
    options = {id(final): {"zipmap": False}} if hasattr(final, "predict_proba") else None
    try:
        return convert_sklearn(
            estimator,
            initial_types=[("X", FloatTensorType([None, features]))],
            options=options,
            target_opset=SKLEARN_TARGET_OPSET,
        )
    except Exception as exc:
        raise ConversionRefused(f"skl2onnx cannot convert {type(estimator).__name__}: {exc}") from exc

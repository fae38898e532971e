"""``edge-agent image build`` with ONNX files and MLflow directories, as a user types it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import onnx
from convert_models import mlflow_sklearn_dir
from modelkit import make_scale_model
from onnx import TensorProto as TP
from onnx import helper

REPO = Path(__file__).resolve().parent.parent


def edge(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_AGENT_")}
    return subprocess.run(
        [sys.executable, "-m", "agent", *args], capture_output=True, text=True, timeout=300, cwd=cwd, env=env
    )


def cast_model(path: Path) -> Path:
    x = helper.make_tensor_value_info("x", TP.FLOAT, ["N", 3])
    y = helper.make_tensor_value_info("y", TP.INT64, ["N", 3])
    graph = helper.make_graph([helper.make_node("Cast", ["x"], ["y"], to=TP.INT64)], "g", [x], [y])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_build_from_onnx_writes_a_layout_and_the_model_directory(tmp_path: Path) -> None:
    source = cast_model(tmp_path / "Cast Model.onnx")
    built = edge("image", "build", "--onnx", str(source), "--version", "4", "--model-dir", "kept", cwd=tmp_path)
    assert built.returncode == 0, built.stderr
    # Default name from the file name; default layout NAME-VERSION.oci; progress on stderr.
    assert "built cast-model:4 sha256:" in built.stdout
    assert (tmp_path / "cast-model-4.oci" / "index.json").exists()
    assert "analysing the graph" in built.stderr and "kernel calls" in built.stderr
    doc = json.loads((tmp_path / "kept" / "model.json").read_text())
    assert (doc["name"], doc["version"], doc["abi_version"]) == ("cast-model", "4", 2)
    # The same source builds the same image (reproducible).
    again = edge("image", "build", "--onnx", str(source), "--version", "4", "-o", "again.oci", cwd=tmp_path)
    assert again.stdout.split()[2] == built.stdout.split()[2]


def test_refusals_list_every_node_and_exit_65(tmp_path: Path) -> None:
    x = helper.make_tensor_value_info("x", TP.FLOAT, ["N", 4])
    y = helper.make_tensor_value_info("y", TP.FLOAT, ["N", 2, 2])
    nodes = [
        helper.make_node("Reshape", ["x", "shape"], ["sq"]),
        helper.make_node("Det", ["sq"], ["d"], name="det_a"),
        helper.make_node("Det", ["sq"], ["e"], name="det_b"),
        helper.make_node("Identity", ["sq"], ["y"]),
    ]
    d = helper.make_tensor_value_info("d", TP.FLOAT, ["N"])
    e = helper.make_tensor_value_info("e", TP.FLOAT, ["N"])
    shape = helper.make_tensor("shape", TP.INT64, [3], [-1, 2, 2])
    graph = helper.make_graph(nodes, "g", [x], [y, d, e], [shape])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "det.onnx")
    refused = edge("image", "build", "--onnx", "det.onnx", cwd=tmp_path)
    assert refused.returncode == 65, refused.stderr
    assert "node 'det_a' (Det)" in refused.stderr and "node 'det_b' (Det)" in refused.stderr
    assert not list(tmp_path.glob("*.oci"))


def test_missing_file_exit_66_and_usage_errors_exit_2(tmp_path: Path) -> None:
    assert edge("image", "build", "--onnx", "nope.onnx", cwd=tmp_path).returncode == 66
    assert edge("image", "build", cwd=tmp_path).returncode == 2
    model = make_scale_model(tmp_path / "scale")
    assert edge("image", "build", str(model), "--version", "2", cwd=tmp_path).returncode == 2
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not a model at all")
    bad = edge("image", "build", "--onnx", str(garbage), cwd=tmp_path)
    assert bad.returncode == 65 and "not an ONNX model" in bad.stderr


def test_name_for_a_model_directory_still_names_the_layout_entry(tmp_path: Path) -> None:
    model = make_scale_model(tmp_path / "scale")
    old = edge("image", "build", str(model), "-o", "old.oci", "--name", "stable", cwd=tmp_path)
    assert old.returncode == 0 and "deprecated: use --ref-name" in old.stderr
    assert old.stdout.startswith("built scale:1") and "oci:old.oci:stable" in old.stdout
    new = edge("image", "build", str(model), "-o", "new.oci", "--ref-name", "stable", cwd=tmp_path)
    assert new.returncode == 0 and not new.stderr and "oci:new.oci:stable" in new.stdout


def test_mlflow_pickle_needs_allow_pickle(tmp_path: Path) -> None:
    directory = mlflow_sklearn_dir(tmp_path / "pickled", serialization_format="cloudpickle")
    refused = edge("image", "build", str(directory), cwd=tmp_path)
    assert refused.returncode == 65 and "--allow-pickle" in refused.stderr

# ruff: noqa: F811 - the registry fixture is imported by name and taken as an argument
"""Converted models end to end: built -> signed -> pushed to a real registry -> deployed to a
running agent (which pulls, verifies, warms and switches) -> served through the v2 API, with
outputs matching onnxruntime on the same ONNX model.

The registry is Debian's docker-registry; the agent is a real ``edge-agent run`` process;
the CLI verbs are the ones an operator types (``image build --onnx``, ``image build
MLFLOW_DIR``, ``image push``, ``image sign``, ``deploy``).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from conftest import http
from convert_models import (
    digits_inputs,
    digits_mlp,
    image_inputs,
    mlflow_sklearn_dir,
    resnet50_shaped,
    sklearn_inputs,
    sklearn_random_forest_classifier,
    sklearn_scaler_logreg,
)
from convert_testkit import ort_run
from images_fixtures import ImageEnv, KeyPair, Registry, make_keypair, needs_registry, registry  # noqa: F401

REPO = Path(__file__).resolve().parent.parent
pytestmark = needs_registry


@pytest.fixture(scope="module")
def key(tmp_path_factory: pytest.TempPathFactory) -> KeyPair:
    return make_keypair(tmp_path_factory.mktemp("keys"), "release")


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, registry: Registry, key: KeyPair) -> ImageEnv:
    return ImageEnv(
        tmp_path_factory.mktemp("e2e"),
        hosts={registry.host: {"plain_http": True}},
        keys={"release": key.public_path},
        scopes={f"{registry.host}/models": ["release"]},
    )


@pytest.fixture(scope="module")
def agent(env: ImageEnv) -> Iterator[Any]:
    from conftest import AgentProcess
    from images_fixtures import free_port

    proc = AgentProcess(
        env.state_dir,
        free_port(),
        ["--config", str(env.config_path), "--no-seed"],
        # The ResNet-50-shaped model holds 100 MB of weights per instance.
        {"EDGE_AGENT_MEMORY_LIMIT_MB": "1024", "EDGE_AGENT_REQUEST_TIMEOUT_MS": "60000"},
    )
    try:
        proc.wait_ready()
        yield proc
    finally:
        proc.terminate()


def cli(env: ImageEnv, *args: str, timeout: float = 300.0) -> subprocess.CompletedProcess[str]:
    result = env.cli(*args, timeout=timeout)
    assert result.returncode == 0, f"edge-agent {' '.join(args)} exited {result.returncode}:\n{result.stderr}"
    return result


def build(*args: str) -> None:
    """``edge-agent image build`` (it takes no config: converting needs no registry or key)."""
    keep = ("EDGE_AGENT_ONNX_KERNELS",)  # a developer's kernel build, when one is set
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_AGENT_") or k in keep}
    result = subprocess.run(
        [sys.executable, "-m", "agent", "image", "build", *args],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
        env=env,
    )
    assert result.returncode == 0, f"image build {' '.join(args)} exited {result.returncode}:\n{result.stderr}"


def publish(env: ImageEnv, work: Path, key: KeyPair, ref: str, build_args: list[str]) -> None:
    """image build (convert) -> image push -> image sign, as an operator runs them."""
    layout = work / f"layout-{ref.rsplit('/', 1)[1].replace(':', '-')}"
    build(*build_args, "-o", str(layout))
    if ref.endswith("digits-cnn:2") or "forest" in ref:
        # The two-step form, for some: push, then sign.
        cli(env, "image", "push", str(layout), ref)
        cli(env, "image", "sign", ref, "--key", str(key.private_path))
    else:
        cli(env, "image", "push", str(layout), ref, "--sign-key", str(key.private_path))


def deploy(env: ImageEnv, agent: Any, ref: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "agent", "deploy", ref, "--url", agent.url, "--state-dir", str(env.state_dir)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
        env={k: v for k, v in os.environ.items() if not k.startswith("EDGE_AGENT_")},
    )
    assert proc.returncode == 0, (
        f"deploy {ref} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}\n{agent.log()[-4000:]}"
    )


def infer(agent: Any, name: str, inputs: dict[str, np.ndarray], version: str | None = None) -> dict[str, np.ndarray]:
    body = {
        "inputs": [
            {"name": n, "datatype": _datatype(a), "shape": list(a.shape), "data": a.reshape(-1).tolist()}
            for n, a in inputs.items()
        ]
    }
    path = f"/v2/models/{name}" + (f"/versions/{version}" if version else "") + "/infer"
    status, reply = http("POST", agent.url + path, body, timeout=120)
    assert status == 200, reply
    return {o["name"]: np.asarray(o["data"]).reshape(o["shape"]) for o in reply["outputs"]}, reply


def _datatype(array: np.ndarray) -> str:
    return {"float32": "FP32", "int64": "INT64"}[str(array.dtype)]


def assert_like_onnxruntime(
    model: onnx.ModelProto, got: dict[str, np.ndarray], feed: dict[str, np.ndarray], *, row_by_row: bool = False
) -> None:
    """``row_by_row``: onnxruntime runs one row at a time. Dynamic quantization takes its range from
    all the rows onnxruntime is given; the converted model quantizes each row on its own (its rows
    must not depend on each other: the agent splits and batches requests), as onnxruntime does
    for a single row."""
    if row_by_row:
        rows = [
            ort_run(model, {k: v[i : i + 1] for k, v in feed.items()}) for i in range(len(next(iter(feed.values()))))
        ]
        want = {name: np.concatenate([r[name] for r in rows]) for name in rows[0]}
    else:
        want = ort_run(model, feed)
    assert set(got) == set(want)
    for name, expected in want.items():
        if expected.dtype.kind == "f":
            np.testing.assert_allclose(got[name], expected, rtol=1e-3, atol=1e-4, err_msg=name)
        else:
            np.testing.assert_array_equal(got[name], expected, err_msg=name)


def test_digits_mlp_built_from_onnx_by_the_cli(
    env: ImageEnv, agent: Any, registry: Registry, key: KeyPair, tmp_path: Path
) -> None:
    model = digits_mlp()
    onnx.save(model, tmp_path / "mlp.onnx")
    ref = f"{registry.host}/models/digits-mlp:1"
    publish(env, tmp_path, key, ref, ["--onnx", str(tmp_path / "mlp.onnx"), "--name", "digits-mlp", "--version", "1"])
    deploy(env, agent, ref)
    feed = {"pixels": digits_inputs(5, seed=3)}
    got, reply = infer(agent, "digits-mlp", feed)
    assert reply["model_version"] == "1"
    assert_like_onnxruntime(model, got, feed)


def test_torch_cnn_then_its_int8_version_hot_swapped(
    env: ImageEnv, agent: Any, registry: Registry, key: KeyPair, tmp_path: Path
) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # Trained and exported by PyTorch now (torch.onnx.export), not the committed copy.
    trained = subprocess.run(
        [sys.executable, str(REPO / "native/models/train_digits_cnn.py"), "--out", str(tmp_path / "cnn.onnx")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert trained.returncode == 0, trained.stderr
    model = onnx.load(str(tmp_path / "cnn.onnx"))
    assert {n.op_type for n in model.graph.node} >= {"Conv", "MaxPool", "Gemm"}
    quantize_dynamic(str(tmp_path / "cnn.onnx"), str(tmp_path / "cnn-int8.onnx"), weight_type=QuantType.QInt8)
    int8 = onnx.load(str(tmp_path / "cnn-int8.onnx"))
    feed = {"pixels": digits_inputs(7, seed=4).reshape(7, 1, 8, 8)}

    v1 = f"{registry.host}/models/digits-cnn:1"
    publish(env, tmp_path, key, v1, ["--onnx", str(tmp_path / "cnn.onnx"), "--name", "digits-cnn", "--version", "1"])
    deploy(env, agent, v1)
    got, reply = infer(agent, "digits-cnn", feed)
    assert reply["model_version"] == "1"
    assert_like_onnxruntime(model, got, feed)

    v2 = f"{registry.host}/models/digits-cnn:2"
    publish(
        env, tmp_path, key, v2, ["--onnx", str(tmp_path / "cnn-int8.onnx"), "--name", "digits-cnn", "--version", "2"]
    )
    deploy(env, agent, v2)
    got, reply = infer(agent, "digits-cnn", feed)
    assert reply["model_version"] == "2"
    assert_like_onnxruntime(int8, got, feed, row_by_row=True)
    # The int8 model is a different model: it still classifies the digits as the float one does.
    assert (got["logits"].argmax(1) == ort_run(model, feed)["logits"].argmax(1)).mean() >= 0.8


@pytest.mark.parametrize(
    ("name", "factory", "inputs"),
    [
        ("sk-logreg", sklearn_scaler_logreg, "scaler_logreg"),
        ("sk-forest", sklearn_random_forest_classifier, "random_forest_classifier"),
    ],
)
def test_scikit_learn_models_through_skl2onnx(
    env: ImageEnv,
    agent: Any,
    registry: Registry,
    key: KeyPair,
    tmp_path: Path,
    name: str,
    factory: Any,
    inputs: str,
) -> None:
    model = factory()
    onnx.save(model, tmp_path / f"{name}.onnx")
    ref = f"{registry.host}/models/{name}:1"
    publish(env, tmp_path, key, ref, ["--onnx", str(tmp_path / f"{name}.onnx"), "--name", name, "--version", "1"])
    deploy(env, agent, ref)
    feed = {"X": sklearn_inputs(inputs, 6, seed=5)}
    got, _ = infer(agent, name, feed)
    assert_like_onnxruntime(model, got, feed)


def test_mlflow_model_directory_written_by_mlflow(
    env: ImageEnv, agent: Any, registry: Registry, key: KeyPair, tmp_path: Path
) -> None:
    from agent.convert.sources import from_mlflow_dir

    directory = mlflow_sklearn_dir(tmp_path / "mlflow-model")
    ref = f"{registry.host}/models/sk-mlflow:3"
    publish(env, tmp_path, key, ref, [str(directory), "--name", "sk-mlflow", "--version", "3"])
    deploy(env, agent, ref)
    feed = {"X": sklearn_inputs("scaler_logreg", 4, seed=6)}
    got, reply = infer(agent, "sk-mlflow", feed)
    assert reply["model_version"] == "3"
    # The reference: what skl2onnx makes of the same directory, run by onnxruntime.
    assert_like_onnxruntime(from_mlflow_dir(directory).model, got, feed)


def test_resnet50_shaped_network_at_224(
    env: ImageEnv, agent: Any, registry: Registry, key: KeyPair, tmp_path: Path
) -> None:
    model = resnet50_shaped()
    onnx.save(model, tmp_path / "resnet.onnx")
    ref = f"{registry.host}/models/resnet50:1"
    publish(
        env,
        tmp_path,
        key,
        ref,
        ["--onnx", str(tmp_path / "resnet.onnx"), "--name", "resnet50", "--version", "1", "--max-batch", "2"],
    )
    deploy(env, agent, ref)
    feed = {next(i.name for i in model.graph.input): image_inputs(1, seed=8)}
    got, _ = infer(agent, "resnet50", feed)
    assert_like_onnxruntime(model, got, feed)

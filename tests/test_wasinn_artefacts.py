"""WASI-NN models as artefacts: import, the format sniffs, the stored weights path, and model images.

A WASI-NN model's weights are the backend's own model file (ONNX, GGUF,
TorchScript), stored as the usual weights blob: judged by a cheap sniff of its
format against ``wasi_nn.encoding``, streamed (never held whole in memory) on
import, image build, push and pull, and handed to the runtime as a path. The
module here only has to pass the artefact rules, so it imports
``wasi_ephemeral_nn.load_by_name`` and exports the Model ABI without doing
anything.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tracemalloc
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import safetensors.numpy
import wasmtime
from images_fixtures import (
    ImageEnv,
    KeyPair,
    Registry,
    make_keypair,
    needs_registry,
    publish,
    registry,  # noqa: F401 - the fixture
)
from modelkit import make_scale_model
from onnx import TensorProto, helper, numpy_helper

from agent import artefacts
from agent.artefacts import read_model_dir, read_stored, read_stored_nn, validate
from agent.cas import BlobStore
from agent.errors import CorruptBlob, InvalidModel
from agent.images import mediatypes as mt
from agent.images.errors import ImageRefused
from agent.images.layout import OciLayout, build_from_dir, build_image
from agent.images.push import push_layout, sign_image
from agent.repository import ModelRepository
from agent.state import StateDB

REPO = Path(__file__).resolve().parent.parent

NN_WAT = """
(module
  (import "wasi_ephemeral_nn" "load_by_name" (func $load (param i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (func (export "ea_abi_version") (result i32) (i32.const 1))
  (func (export "ea_max_batch") (result i32) (i32.const 4))
  (func (export "ea_alloc") (param i32) (result i32) (i32.const 1024))
  (func (export "ea_init") (param i32 i32) (result i32)
    (call $load (i32.const 16) (i32.const 7) (i32.const 8)))
  (func (export "ea_input") (param i32) (result i32) (i32.const 256))
  (func (export "ea_output") (param i32) (result i32) (i32.const 512))
  (func (export "ea_run") (param i32) (result i32) (i32.const 0))
  (data (i32.const 16) "default")
)
"""


def nn_wasm() -> bytes:
    return wasmtime.wat2wasm(NN_WAT)


def add_onnx() -> bytes:
    """y = x + 1 over FP32 rows of 4: a real ONNX model (onnx.checker passes it)."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 4])
    one = numpy_helper.from_array(np.ones(4, np.float32), "one")
    graph = helper.make_graph([helper.make_node("Add", ["x", "one"], ["y"])], "add", [x], [y], [one])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model.SerializeToString()


def write_gguf(path: Path, size: int) -> Path:
    """A GGUF v3 file of about ``size`` bytes, written by gguf-py (llama.cpp's own writer), tensor by tensor."""
    import gguf

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("test")
    rows = max(1, size // (4 * 1024 * 1024))
    for i in range(rows):
        writer.add_tensor(f"t{i}", np.random.default_rng(i).random(1024 * 1024, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def nn_model_dir(
    directory: Path,
    weights: bytes | None = None,
    *,
    encoding: str = "onnx",
    weights_name: str = "model.onnx",
    name: str = "nn",
    version: str = "1",
    params: list[dict[str, Any]] | None = None,
    wasm: bytes | None = None,
) -> Path:
    """A WASI-NN model directory: model.json with a wasi_nn section, the module and the weights file
    (``weights`` None: the file is already there)."""
    directory.mkdir(parents=True, exist_ok=True)
    meta = {
        "schema": "edge-agent.model/v1",
        "name": name,
        "version": version,
        "abi_version": 1,
        "max_batch": 4,
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}],
        "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 4]}],
        "params": params or [],
        "warmup": {"inputs": {"x": {"shape": [1, 4], "data": [1, 2, 3, 4]}}},
        "files": {"module": "model.wasm", "weights": weights_name},
        "wasi_nn": {"encoding": encoding, "target": "cpu"},
    }
    (directory / "model.json").write_text(json.dumps(meta, indent=1))
    (directory / "model.wasm").write_bytes(wasm if wasm is not None else nn_wasm())
    if weights is not None:
        (directory / weights_name).write_bytes(weights)
    return directory


def edge_agent(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        env={k: v for k, v in os.environ.items() if not k.startswith("EDGE_AGENT_")},
    )


def repo_at(root: Path) -> ModelRepository:
    return ModelRepository(BlobStore(root), StateDB(root / "agent.db"))


# -- import ------------------------------------------------------------------------------------------
def test_an_onnx_wasi_nn_model_imports_and_its_weights_come_back_as_a_path(tmp_path: Path) -> None:
    onnx_bytes = add_onnx()
    model = nn_model_dir(tmp_path / "m", onnx_bytes)
    art = read_model_dir(model)
    # The weights stay on disk, hashed as they streamed past.
    assert art.weights == b"" and art.weights_file is not None and art.weights_file.size == len(onnx_bytes)
    spec = validate(art)
    assert spec.wasi_nn is not None and spec.wasi_nn.encoding == "onnx" and spec.params == ()

    repo = repo_at(tmp_path / "state")
    rec = repo.import_dir(model)
    blobs = repo.blobs
    assert blobs.read_bytes(rec.weights_digest) == onnx_bytes
    assert blobs.read_bytes(rec.module_digest) == (model / "model.wasm").read_bytes()
    stored_spec, wasm, path = read_stored_nn(blobs, rec)
    assert stored_spec.raw == spec.raw and wasm == nn_wasm() and path.read_bytes() == onnx_bytes
    assert path == blobs.path(rec.weights_digest)
    assert read_stored_nn(blobs, rec, module=False)[1] == b""
    # The backend's file is never parsed as safetensors.
    with pytest.raises(InvalidModel, match=r"^nn:1 is a WASI-NN model; its weights are not parameters to map$"):
        read_stored(blobs, rec)


def test_stored_weights_are_rehashed_and_sniffed_before_use(tmp_path: Path) -> None:
    repo = repo_at(tmp_path / "state")
    rec = repo.import_dir(nn_model_dir(tmp_path / "m", add_onnx()))
    weights = repo.blobs.path(rec.weights_digest)
    os.chmod(weights, 0o600)
    weights.write_bytes(weights.read_bytes()[:-1] + b"\0")
    with pytest.raises(CorruptBlob, match=f"blob {rec.weights_digest} is corrupt"):
        read_stored_nn(repo.blobs, rec)
    # A safetensors version is not a WASI-NN one.
    plain = repo.import_dir(make_scale_model(tmp_path / "scale"))
    with pytest.raises(InvalidModel, match=r"^scale:1 is not a WASI-NN model"):
        read_stored_nn(repo.blobs, plain)


def test_edge_agent_import_takes_a_directory_of_wasi_nn_models(tmp_path: Path) -> None:
    models = tmp_path / "models"
    nn_model_dir(models / "a", add_onnx(), name="nn-a")
    gguf_dir = nn_model_dir(models / "b", None, name="nn-b", encoding="ggml", weights_name="model.gguf")
    write_gguf(gguf_dir / "model.gguf", 4 * 1024 * 1024)
    make_scale_model(models / "c")
    state = tmp_path / "state"
    proc = edge_agent("import", "--state-dir", str(state), str(models))
    assert proc.returncode == 0, proc.stderr + proc.stdout
    repo = repo_at(state)
    names = sorted((r.model, r.version) for r in repo.db.versions())
    assert names == [("nn-a", "1"), ("nn-b", "1"), ("scale", "1")]
    rec = repo.db.get_version("nn-b", "1")
    assert rec is not None
    assert read_stored_nn(repo.blobs, rec)[2].read_bytes() == (gguf_dir / "model.gguf").read_bytes()


def torchscript_bytes(tmp_path: Path, scripted: bool = True) -> bytes:
    torch = pytest.importorskip("torch", reason="torch makes the TorchScript archive")

    class AddOne(torch.nn.Module):
        def forward(self, x: Any) -> Any:
            return x + 1

    path = tmp_path / ("m.pt" if scripted else "ckpt.pt")
    if scripted:
        torch.jit.save(torch.jit.trace(AddOne(), torch.ones(1, 4)), str(path))
    else:
        torch.save({"w": torch.ones(4)}, str(path))
    return path.read_bytes()


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit's deprecation notice; what it saves is the point
def test_a_torchscript_archive_passes_and_a_torch_save_checkpoint_does_not(tmp_path: Path) -> None:
    repo = repo_at(tmp_path / "state")
    ts = nn_model_dir(tmp_path / "ts", torchscript_bytes(tmp_path), encoding="pytorch", weights_name="model.pt")
    assert repo.import_dir(ts).model == "nn"
    ckpt = nn_model_dir(
        tmp_path / "ckpt", torchscript_bytes(tmp_path, scripted=False), encoding="pytorch", weights_name="model.pt"
    )
    with pytest.raises(InvalidModel, match=r"a torch\.save checkpoint, not a TorchScript module"):
        repo.import_dir(ckpt)


def _refusal(tmp_path: Path, case: str) -> str:
    onnx_bytes = add_onnx()
    safet = safetensors.numpy.save({"w": np.ones(4, np.float32)})
    directory = tmp_path / case
    if case == "params":
        nn_model_dir(directory, onnx_bytes, params=[{"name": "w", "datatype": "FP32", "shape": [4]}])
    elif case == "onnx-garbage":
        nn_model_dir(directory, b"\x08\x07" + os.urandom(200))
    elif case == "onnx-safetensors":
        nn_model_dir(directory, safet)
    elif case == "ggml-onnx":
        nn_model_dir(directory, onnx_bytes, encoding="ggml", weights_name="model.gguf")
    elif case == "ggml-old-version":
        nn_model_dir(directory, b"GGUF" + (1).to_bytes(4, "little") + bytes(16), encoding="ggml")
    elif case == "pytorch-not-zip":
        nn_model_dir(directory, onnx_bytes, encoding="pytorch", weights_name="model.pt")
    elif case == "pytorch-zip-without-pickle":
        zpath = tmp_path / "z.zip"
        with zipfile.ZipFile(zpath, "w") as z:
            z.writestr("archive/readme.txt", "hello")
        nn_model_dir(directory, zpath.read_bytes(), encoding="pytorch", weights_name="model.pt")
    elif case == "unknown-encoding":
        nn_model_dir(directory, onnx_bytes)
        meta = json.loads((directory / "model.json").read_text())
        meta["wasi_nn"]["encoding"] = "tensorflowlite"
        (directory / "model.json").write_text(json.dumps(meta))
    elif case == "nn-import-without-wasi-nn":
        make_scale_model(directory, wasm=nn_wasm())
    else:  # pragma: no cover
        raise AssertionError(case)
    with pytest.raises(InvalidModel) as info:
        repo_at(tmp_path / "state").import_dir(directory)
    return str(info.value)


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("params", r"^nn:1: a WASI-NN model declares no params \(its weights file is the onnx backend's own "),
        ("onnx-garbage", r"^nn:1: weights model\.onnx are not an ONNX model \(protobuf ModelProto\), as wasi_nn"),
        ("onnx-safetensors", r"are not an ONNX model .*\(it is a safetensors file\); a WASI-NN model's weights are"),
        ("ggml-onnx", r"^nn:1: weights model\.gguf are not a GGUF file, .*\(it is an ONNX model"),
        ("ggml-old-version", r"are not a GGUF file, .*\(GGUF version 1; llama\.cpp reads versions \[2, 3\]\)"),
        ("pytorch-not-zip", r"are not a TorchScript archive .*\(it is an ONNX model"),
        ("pytorch-zip-without-pickle", r"are not a TorchScript archive .*\(a zip archive without data\.pkl\)"),
        ("unknown-encoding", r"^wasi_nn\.encoding must be one of \('onnx', 'ggml', 'pytorch'\), got 'tensorflowlite'$"),
        (
            "nn-import-without-wasi-nn",
            r"^scale:1: module imports wasi_ephemeral_nn\.load_by_name; ABI v1 modules may import only "
            r"wasi_snapshot_preview1 \(a WASI-NN app needs a wasi_nn section in model\.json\)$",
        ),
    ],
)
def test_refusals_say_which_rule(tmp_path: Path, case: str, message: str) -> None:
    import re

    text = _refusal(tmp_path, case)
    assert re.search(message, text), text
    assert not list((tmp_path / "state" / "blobs" / "sha256").iterdir())  # nothing stored


def test_a_weights_file_changed_after_it_was_judged_is_not_stored(tmp_path: Path) -> None:
    model = nn_model_dir(tmp_path / "m", add_onnx())
    art = read_model_dir(model)
    validate(art)
    # Another valid ONNX model of the same size, written after the read: the copy no longer hashes to the digest.
    data = bytearray(add_onnx())
    data[-1] ^= 1
    (model / "model.onnx").write_bytes(bytes(data))
    repo = repo_at(tmp_path / "state")
    with pytest.raises(InvalidModel, match=r"model\.onnx changed while it was being imported; refused"):
        repo.add_artefacts(art, source="test")
    assert not repo.blobs.has(art.digests[2]) and repo.db.versions() == []


def test_the_weights_size_bound_is_the_wasi_nn_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    onnx_bytes = add_onnx()
    model = nn_model_dir(tmp_path / "m", onnx_bytes)
    # The safetensors bound does not apply to the backend's file...
    monkeypatch.setattr(artefacts, "MAX_WEIGHTS_BYTES", 10)
    assert read_model_dir(model).weights_file is not None
    # ...its own does, from the size alone.
    monkeypatch.setattr(artefacts, "MAX_NN_WEIGHTS_BYTES", len(onnx_bytes) - 1)
    with pytest.raises(InvalidModel, match=rf"model\.onnx is {len(onnx_bytes)} bytes, over the limit of"):
        read_model_dir(model)


def test_a_link_as_the_weights_file_is_refused(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere.onnx"
    elsewhere.write_bytes(add_onnx())
    model = nn_model_dir(tmp_path / "m", None)
    (model / "model.onnx").symlink_to(elsewhere)
    with pytest.raises(InvalidModel, match=r"model\.onnx is a symbolic link"):
        read_model_dir(model)


# -- images ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, KeyPair]:
    root = tmp_path_factory.mktemp("keys")
    return {"release": make_keypair(root, "release")}


def env_for(root: Path, reg: Registry, keys: dict[str, KeyPair]) -> ImageEnv:
    return ImageEnv(
        root,
        hosts={reg.host: {"plain_http": True}},
        keys={"release": keys["release"].public_path},
        scopes={f"{reg.host}/models": ["release"]},
    )


def test_image_build_names_the_weights_format(tmp_path: Path) -> None:
    for encoding, fname, media_type in (
        ("onnx", "model.onnx", mt.WEIGHTS_ONNX),
        ("ggml", "model.gguf", mt.WEIGHTS_GGUF),
    ):
        model = nn_model_dir(tmp_path / encoding, None, encoding=encoding, weights_name=fname)
        if encoding == "onnx":
            (model / fname).write_bytes(add_onnx())
        else:
            write_gguf(model / fname, 4 * 1024 * 1024)
        built = build_from_dir(model, tmp_path / f"layout-{encoding}")
        manifest = OciLayout(built.layout).manifest()
        assert manifest.weights.media_type == media_type
        assert manifest.weights.annotations == {mt.TITLE: fname}
        assert manifest.weights.size == (model / fname).stat().st_size
        assert manifest.module.media_type == mt.WASM_MODULE
        assert OciLayout(built.layout).blob_path(manifest.weights.digest).read_bytes() == (model / fname).read_bytes()


@needs_registry
def test_push_sign_pull_of_a_wasi_nn_image_gives_the_same_blobs(
    tmp_path: Path,
    registry: Registry,  # noqa: F811
    keys: dict[str, KeyPair],
) -> None:
    env = env_for(tmp_path, registry, keys)
    model = nn_model_dir(tmp_path / "m", add_onnx(), name="nn-onnx")
    ref = f"{registry.host}/models/nn-onnx:1"
    digest = publish(tmp_path, env.registry_settings(), model, ref, keys["release"])
    result = env.puller().pull(ref)
    rec = result.record
    assert (rec.model, rec.version, rec.manifest_digest) == ("nn-onnx", "1", digest)
    assert result.signed_by is not None and "release" in result.signed_by
    blobs = env.repository.blobs
    assert blobs.read_bytes(rec.config_digest) == (model / "model.json").read_bytes()
    assert blobs.read_bytes(rec.module_digest) == (model / "model.wasm").read_bytes()
    assert blobs.read_bytes(rec.weights_digest) == (model / "model.onnx").read_bytes()
    # What a direct import records is the same three blobs.
    imported = repo_at(tmp_path / "other").import_dir(model)
    assert imported.digests == rec.digests
    assert read_stored_nn(blobs, rec)[2] == blobs.path(rec.weights_digest)


@needs_registry
def test_a_weights_layer_the_config_disowns_is_refused_before_it_is_fetched(
    tmp_path: Path,
    registry: Registry,  # noqa: F811
    keys: dict[str, KeyPair],
) -> None:
    env = env_for(tmp_path, registry, keys)
    settings = env.registry_settings()
    model = nn_model_dir(tmp_path / "m", add_onnx(), name="nn-mismatch")
    spec = read_model_dir(model)
    cases = {
        # A GGUF layer under an onnx config, and an ONNX WASI-NN model's file labelled safetensors.
        "gguf": mt.WEIGHTS_GGUF,
        "safetensors": mt.WEIGHTS,
    }
    for tag, media_type in cases.items():
        layout = tmp_path / f"layout-{tag}"
        built = build_image(layout, spec.config, model / "model.wasm", model / "model.onnx", tag, None, media_type)
        ref = f"{registry.host}/models/nn-mismatch:{tag}"
        push_layout(OciLayout(layout), built.name, ref, settings)
        sign_image(ref, keys["release"].private_key, settings)
        manifest = OciLayout(layout).manifest(tag)
        # The registry loses the weights: a pull that fetched them would fail on that instead.
        registry.blob_file(manifest.weights.digest).unlink()
        with pytest.raises(ImageRefused) as info:
            env.puller().pull(ref)
        assert f"its weights layer is '{media_type}' but its model.json has wasi_nn.encoding 'onnx'" in str(info.value)
        assert f"(weights layer '{mt.WEIGHTS_ONNX}')" in str(info.value)
        blobs = env.repository.blobs
        assert not blobs.has(manifest.module.digest) and not blobs.has(manifest.weights.digest)
        assert env.versions() == []

    # A safetensors model whose image calls its weights ONNX is refused the same way.
    scale = make_scale_model(tmp_path / "scale", name="scale-mislabelled")
    layout = tmp_path / "layout-scale"
    built = build_image(
        layout,
        (scale / "model.json").read_bytes(),
        scale / "model.wasm",
        scale / "weights.safetensors",
        "1",
        None,
        mt.WEIGHTS_ONNX,
    )
    ref = f"{registry.host}/models/scale-mislabelled:1"
    push_layout(OciLayout(layout), built.name, ref, settings)
    sign_image(ref, keys["release"].private_key, settings)
    with pytest.raises(ImageRefused, match=r"has no wasi_nn section \(safetensors weights\)"):
        env.puller().pull(ref)


@needs_registry
def test_a_gguf_image_streams_through_build_push_and_pull(
    tmp_path: Path,
    registry: Registry,  # noqa: F811
    keys: dict[str, KeyPair],
) -> None:
    size = 96 * 1024 * 1024
    model = nn_model_dir(tmp_path / "m", None, name="nn-gguf", encoding="ggml", weights_name="model.gguf")
    write_gguf(model / "model.gguf", size)
    size = (model / "model.gguf").stat().st_size
    env = env_for(tmp_path, registry, keys)
    settings = env.registry_settings()
    puller = env.puller()
    ref = f"{registry.host}/models/nn-gguf:1"

    tracemalloc.start()
    try:
        digest = publish(tmp_path, settings, model, ref, keys["release"])
        result = puller.pull(ref)
        rec = result.record
        spec, _, path = read_stored_nn(env.repository.blobs, rec)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert rec.manifest_digest == digest and spec.wasi_nn is not None and spec.wasi_nn.encoding == "ggml"
    assert path.stat().st_size == size
    # Build, push, pull and the load-time re-hash each held at most a few blocks of the file at once.
    assert peak < size // 4, f"peak {peak} bytes of Python allocations for a {size}-byte weights file"
    with open(path, "rb") as got, open(model / "model.gguf", "rb") as want:
        while block := want.read(1 << 20):
            assert got.read(1 << 20) == block


def test_edge_agent_image_build_then_a_layout_import_records_the_model(tmp_path: Path) -> None:
    model = nn_model_dir(tmp_path / "m", None, name="nn-tar", encoding="ggml", weights_name="model.gguf")
    write_gguf(model / "model.gguf", 4 * 1024 * 1024)
    env = ImageEnv(tmp_path / "env", require_signature=False)
    tar = tmp_path / "nn.tar"
    proc = edge_agent("image", "build", str(model), "--tar", str(tar))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("built nn-tar:1 sha256:")
    result = env.puller().import_layout(tar)
    rec = result.record
    assert (rec.model, rec.version) == ("nn-tar", "1")
    assert env.repository.blobs.read_bytes(rec.weights_digest) == (model / "model.gguf").read_bytes()
    # The same directory imported directly records the same blobs.
    assert repo_at(tmp_path / "direct").import_dir(model).digests == rec.digests


def test_a_zip_claiming_a_huge_central_directory_is_refused_without_reading_it(tmp_path: Path) -> None:
    import struct

    model = nn_model_dir(tmp_path / "m", None, encoding="pytorch", weights_name="model.pt")
    directory_size = 64 * 1024 * 1024
    with open(model / "model.pt", "wb") as fh:
        fh.write(b"PK\x03\x04")
        fh.truncate(directory_size)  # a hole: the claim costs no disk
        fh.seek(directory_size)
        # End of central directory: one entry, a directory of 64 MiB starting at offset 0.
        fh.write(struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, 1, 1, directory_size, 0, 0))
    tracemalloc.start()
    try:
        with pytest.raises(InvalidModel, match=r"an unreadable zip archive: a zip read of 67108864 bytes"):
            repo_at(tmp_path / "state").import_dir(model)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < directory_size // 4

"""The artefact rules (agent/artefacts.py): each refusal and its message, and one verdict whichever way a model comes.

``edge-agent import``, ``image build`` and an image's admission (a pull, or an OCI layout from the drop-in
folder or ``pull oci:``) all judge a version by the same rules; a bad artefact must be refused by each with
the same message, so an operator who built an image on one machine reads on the node what the build said.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy
from images_fixtures import ImageEnv
from modelkit import make_scale_model, scale_wasm

from agent import artefacts
from agent.artefacts import (
    Artefacts,
    check_module,
    check_module_file,
    check_version_free,
    check_weights_file,
    parse_weights,
    read_model_dir,
    read_stored,
    validate,
    version_conflict,
)
from agent.cas import BlobStore, sha256_digest
from agent.errors import ImageRefused, InvalidModel
from agent.images.layout import build_from_dir, build_image
from agent.spec import ModelSpec

HEADER = b"\0asm\x01\0\0\0"


def section(kind: int, body: bytes) -> bytes:
    assert len(body) < 128  # one-byte LEB128 size is enough here
    return bytes([kind, len(body)]) + body


def name(text: str) -> bytes:
    return bytes([len(text)]) + text.encode()


# Modules built by hand from their section headers: the rules read nothing else, so none needs to compile.
TWO_MEMORIES = HEADER + section(5, b"\x02\x00\x01\x00\x01")
FOREIGN_IMPORT = HEADER + section(2, b"\x01" + name("env") + name("steal") + b"\x00\x00")
COMPONENT = b"\0asm\x0d\0\x01\0"
NOT_WASM = b"\x7fELF" + bytes(60)


def spec_of(directory: Path) -> ModelSpec:
    return ModelSpec.from_bytes((directory / "model.json").read_bytes())


def save_weights(directory: Path, tensors: dict[str, np.ndarray]) -> None:
    safetensors.numpy.save_file(tensors, str(directory / "weights.safetensors"))


# -- reading a model directory ------------------------------------------------------------------
def test_model_directory_is_read_whole(tmp_path: Path) -> None:
    model = make_scale_model(tmp_path / "m")
    art = read_model_dir(model)
    assert art == Artefacts.from_dir(model)
    assert art.config == (model / "model.json").read_bytes()
    assert art.module == (model / "model.wasm").read_bytes()
    assert art.weights == (model / "weights.safetensors").read_bytes()
    assert art.digests == tuple(sha256_digest(b) for b in (art.config, art.module, art.weights))
    assert validate(art).raw == spec_of(model).raw


def test_model_directory_without_its_files_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidModel, match=r"has no model\.json"):
        read_model_dir(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InvalidModel, match=r"empty has no model\.json"):
        read_model_dir(tmp_path / "empty")
    model = make_scale_model(tmp_path / "m")
    (model / "weights.safetensors").unlink()
    with pytest.raises(InvalidModel, match=r"lacks weights\.safetensors \(the model's weights\)"):
        read_model_dir(model)
    (model / "model.wasm").unlink()
    with pytest.raises(InvalidModel, match=r"lacks model\.wasm \(the model's module\)"):
        read_model_dir(model)


def test_files_model_json_names_are_the_ones_read(tmp_path: Path) -> None:
    model = make_scale_model(tmp_path / "m")
    meta = json.loads((model / "model.json").read_text())
    meta["files"] = {"module": "scale.wasm", "weights": "scale.safetensors"}
    (model / "model.json").write_text(json.dumps(meta))
    (model / "model.wasm").rename(model / "scale.wasm")
    (model / "weights.safetensors").rename(model / "scale.safetensors")
    assert read_model_dir(model).module == (model / "scale.wasm").read_bytes()


def test_links_inside_a_model_directory_are_never_followed(tmp_path: Path) -> None:
    secret = tmp_path / "secret.safetensors"
    secret.write_bytes(b"host file")
    model = make_scale_model(tmp_path / "m")
    (model / "weights.safetensors").unlink()
    (model / "weights.safetensors").symlink_to(secret)
    with pytest.raises(InvalidModel, match="symbolic link") as info:
        read_model_dir(model)
    assert str(secret) not in str(info.value)
    (model / "model.wasm").unlink()
    (model / "model.wasm").symlink_to("/dev/zero")  # would never end if it were read
    with pytest.raises(InvalidModel, match=r"model\.wasm is a symbolic link"):
        read_model_dir(model)


def test_a_model_directory_holding_a_link_to_itself_is_still_read(tmp_path: Path) -> None:
    # The directory named by its caller may be a link (the caller chose it); only what is inside is not followed.
    model = make_scale_model(tmp_path / "m")
    (tmp_path / "link").symlink_to(model)
    assert read_model_dir(tmp_path / "link") == read_model_dir(model)


def test_special_files_are_refused_without_blocking(tmp_path: Path) -> None:
    model = make_scale_model(tmp_path / "m")
    (model / "model.wasm").unlink()
    os.mkfifo(model / "model.wasm")  # an open that waited for a writer would hang here
    with pytest.raises(InvalidModel, match=r"model\.wasm is a FIFO, not a regular file"):
        read_model_dir(model)
    (model / "model.wasm").unlink()
    (model / "model.wasm").mkdir()
    with pytest.raises(InvalidModel, match=r"model\.wasm is a directory, not a regular file"):
        read_model_dir(model)


def test_files_over_their_bound_are_refused_from_their_size(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = make_scale_model(tmp_path / "m")
    size = (model / "weights.safetensors").stat().st_size
    monkeypatch.setattr(artefacts, "MAX_WEIGHTS_BYTES", size - 1)
    with pytest.raises(InvalidModel, match=rf"weights\.safetensors is {size} bytes, over the limit of {size - 1}"):
        read_model_dir(model)
    monkeypatch.setattr(artefacts, "MAX_CONFIG_BYTES", 100)
    with pytest.raises(InvalidModel, match=r"model\.json is \d+ bytes, over the limit of 100"):
        read_model_dir(model)


# -- the module ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("module", "message"),
    [
        (NOT_WASM, r"^scale:1: module is not a WebAssembly binary$"),
        (b"\0as", r"^scale:1: module is not a WebAssembly binary$"),
        (COMPONENT, r"^scale:1: module is not a core WebAssembly module version 1 \(a component\?\)$"),
        (TWO_MEMORIES, r"^scale:1: module declares 2 memories; ABI v1 allows 1$"),
        (FOREIGN_IMPORT, r"^scale:1: module imports env\.steal; ABI v1 modules may import only wasi_snapshot_preview1"),
        (HEADER + b"\x05\x7f", r"^scale:1: module is truncated"),
    ],
)
def test_module_rule(tmp_path: Path, module: bytes, message: str) -> None:
    spec = spec_of(make_scale_model(tmp_path / "m"))
    with pytest.raises(InvalidModel, match=message):
        check_module(spec, module)
    (tmp_path / "blob").write_bytes(module)
    with pytest.raises(InvalidModel, match=message):
        check_module_file(spec, tmp_path / "blob")


def test_a_module_within_abi_v1_passes(tmp_path: Path) -> None:
    spec = spec_of(make_scale_model(tmp_path / "m"))
    check_module(spec, scale_wasm())
    check_module(spec, HEADER)


# -- the weights --------------------------------------------------------------------------------
F32_4 = np.ones(4, np.float32)

WEIGHTS_CASES: dict[str, tuple[dict[str, np.ndarray], str]] = {
    "wrong shape": (
        {"scale": np.ones(5, np.float32)},
        r"^scale:1: parameter scale is F32\[5\], model.json declares F32\[4\]$",
    ),
    "wrong dtype": (
        {"scale": np.ones(4, np.float64)},
        r"^scale:1: parameter scale is F64\[4\], model.json declares F32\[4\]$",
    ),
    "undeclared tensor": (
        {"scale": F32_4, "extra": F32_4},
        r"^scale:1: weights hold undeclared tensor\(s\) \['extra'\]$",
    ),
    "missing parameter": ({}, r"^scale:1: weights lack parameter scale$"),
}


@pytest.mark.parametrize("case", list(WEIGHTS_CASES))
def test_weights_rule_from_the_bytes_and_from_the_header_alike(tmp_path: Path, case: str) -> None:
    tensors, message = WEIGHTS_CASES[case]
    model = make_scale_model(tmp_path / "m")
    save_weights(model, tensors)
    spec = spec_of(model)
    with pytest.raises(InvalidModel, match=message):
        parse_weights(spec, (model / "weights.safetensors").read_bytes())
    with pytest.raises(InvalidModel, match=message):
        check_weights_file(spec, model / "weights.safetensors")


@pytest.mark.parametrize("data", [b"not safetensors", struct.pack("<Q", 10) + b"{}", b""])
def test_weights_that_are_not_safetensors_are_refused(tmp_path: Path, data: bytes) -> None:
    spec = spec_of(make_scale_model(tmp_path / "m"))
    with pytest.raises(InvalidModel, match=r"^scale:1: weights are not valid safetensors: "):
        parse_weights(spec, data)
    (tmp_path / "w").write_bytes(data)
    with pytest.raises(InvalidModel, match=r"^scale:1: weights are not valid safetensors: "):
        check_weights_file(spec, tmp_path / "w")


def test_weights_matching_the_params_are_returned(tmp_path: Path) -> None:
    model = make_scale_model(tmp_path / "m", scale=(1.0, 2.0, 3.0, 4.0))
    params = parse_weights(spec_of(model), (model / "weights.safetensors").read_bytes())
    np.testing.assert_array_equal(params["scale"], [1, 2, 3, 4])
    check_weights_file(spec_of(model), model / "weights.safetensors")


# -- same version, other content ----------------------------------------------------------------
@dataclass(frozen=True)
class Stored:
    """A recorded version as the rules see it (agent.state.VersionRecord in the agent)."""

    model: str = "scale"
    version: str = "1"
    config_digest: str = "sha256:" + "a" * 64
    module_digest: str = "sha256:" + "b" * 64
    weights_digest: str = "sha256:" + "c" * 64
    source: str = "import:/models/scale"
    status: str = "ready"

    @property
    def digests(self) -> tuple[str, str, str]:
        return self.config_digest, self.module_digest, self.weights_digest


def test_same_version_with_other_content_is_refused(tmp_path: Path) -> None:
    spec = spec_of(make_scale_model(tmp_path / "m"))
    stored = Stored()
    other = (stored.config_digest, stored.module_digest, "sha256:" + "d" * 64)
    message = (
        "scale:1 is already stored with different content (from import:/models/scale); a new build needs a new version"
    )
    assert version_conflict(spec, other, stored) == message
    with pytest.raises(InvalidModel) as info:
        check_version_free(spec, other, stored)
    assert str(info.value) == message
    # A new version, the same content again, or a broken record to be replaced: all free.
    assert version_conflict(spec, other, None) is None
    assert version_conflict(spec, stored.digests, stored) is None
    assert version_conflict(spec, other, Stored(status="broken")) is None
    check_version_free(spec, stored.digests, stored)


# -- a stored version ---------------------------------------------------------------------------
def test_stored_version_is_read_and_judged(tmp_path: Path) -> None:
    model = make_scale_model(tmp_path / "m")
    art = read_model_dir(model)
    blobs = BlobStore(tmp_path / "state")
    for data in (art.config, art.module, art.weights):
        blobs.put_bytes(data)
    c, m, w = art.digests
    spec, module, params = read_stored(blobs, Stored(config_digest=c, module_digest=m, weights_digest=w))
    assert spec.raw == spec_of(model).raw and module == art.module and list(params) == ["scale"]
    with pytest.raises(InvalidModel, match=r"^model.json names scale:1 but the store records scale:9$"):
        read_stored(blobs, Stored(version="9", config_digest=c, module_digest=m, weights_digest=w))
    bad = blobs.put_bytes(safetensors.numpy.save({"scale": np.ones(5, np.float32)}))
    with pytest.raises(InvalidModel, match=r"parameter scale is F32\[5\]"):
        read_stored(blobs, Stored(config_digest=c, module_digest=m, weights_digest=bad))


# -- one verdict: import, build, admission of a layout ------------------------------------------
def bad_weights(model: Path) -> None:
    save_weights(model, {"scale": np.ones(5, np.float32)})


def undeclared_weights(model: Path) -> None:
    save_weights(model, {"scale": F32_4, "extra": F32_4})


def not_wasm(model: Path) -> None:
    (model / "model.wasm").write_bytes(NOT_WASM)


def two_memories(model: Path) -> None:
    (model / "model.wasm").write_bytes(TWO_MEMORIES)


def foreign_import(model: Path) -> None:
    (model / "model.wasm").write_bytes(FOREIGN_IMPORT)


@pytest.mark.parametrize("spoil", [bad_weights, undeclared_weights, not_wasm, two_memories, foreign_import])
def test_a_bad_artefact_is_refused_alike_by_import_build_and_admission(
    tmp_path: Path, spoil: Callable[[Path], None]
) -> None:
    model = make_scale_model(tmp_path / "m")
    spoil(model)
    env = ImageEnv(tmp_path / "node", require_signature=False)

    with pytest.raises(InvalidModel) as imported:
        env.repository.import_dir(model)
    message = str(imported.value)
    assert message.startswith("scale:1: ")

    with pytest.raises(InvalidModel) as built:
        build_from_dir(model, tmp_path / "judged")
    assert str(built.value) == message
    assert not (tmp_path / "judged").exists()  # nothing is written for a refused build

    # The same files in a layout written without judging them, as another tool (or an older agent) might.
    meta = (model / "model.json").read_bytes()
    build_image(tmp_path / "layout", meta, model / "model.wasm", model / "weights.safetensors", "1")
    with pytest.raises(ImageRefused) as admitted:
        env.puller().import_layout(tmp_path / "layout")
    assert str(admitted.value).endswith(f": {message}"), str(admitted.value)
    assert env.versions() == []


def test_other_content_under_a_stored_version_is_refused_alike_by_import_and_admission(tmp_path: Path) -> None:
    env = ImageEnv(tmp_path / "node", require_signature=False)
    env.repository.import_dir(make_scale_model(tmp_path / "v1", scale=(1.0, 1.0, 1.0, 1.0)))
    rebuilt = make_scale_model(tmp_path / "rebuilt", scale=(2.0, 2.0, 2.0, 2.0))  # same name:version

    with pytest.raises(InvalidModel) as imported:
        env.repository.import_dir(rebuilt)
    message = str(imported.value)
    assert message == (
        f"scale:1 is already stored with different content (from import:{(tmp_path / 'v1').resolve()}); "
        "a new build needs a new version"
    )
    build_from_dir(rebuilt, tmp_path / "layout")  # building is not storing: no conflict there
    with pytest.raises(ImageRefused) as admitted:
        env.puller().import_layout(tmp_path / "layout")
    assert str(admitted.value).endswith(f": {message}"), str(admitted.value)
    # The same content again is no conflict: importing it twice is harmless.
    assert env.repository.import_dir(tmp_path / "v1").version == "1"

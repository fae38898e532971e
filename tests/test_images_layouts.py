"""Importing images from OCI layouts (directory or tar), the drop-in folder's path: same trust checks as a pull.

A layout's signature is the ``sha256-<hex>.sig`` manifest stored in the layout
beside the image, as ``skopeo copy`` of the signature tag stores it; its
``docker-reference`` claim picks the trust scope whose keys must have signed.
"""

from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import http
from images_fixtures import (
    REPO,
    SKOPEO,
    ImageEnv,
    KeyPair,
    Registry,
    make_keypair,
    needs_registry,
    needs_skopeo,
    publish,
    registry,  # noqa: F401 - the fixture
    signed_layout,
)
from modelkit import make_scale_model

from agent.events import EventBus
from agent.images import mediatypes as mt
from agent.images.errors import ImageRefused, LayoutError, SignatureError
from agent.images.layout import OciLayout, build_from_dir, build_image, open_layout
from agent.images.push import push_layout, sign_layout
from agent.images.reference import signature_tag
from agent.wiring import attach_images

SCOPE = "reg.example/models"
IDENTITY = f"{SCOPE}/scale"


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, KeyPair]:
    root = tmp_path_factory.mktemp("keys")
    return {name: make_keypair(root, name) for name in ("release", "rogue")}


def node_env(root: Path, keys: dict[str, KeyPair], **extra: object) -> ImageEnv:
    return ImageEnv(root, keys={"release": keys["release"].public_path}, scopes={SCOPE: ["release"]}, **extra)  # type: ignore[arg-type]


def test_signed_layout_imports_from_a_directory_and_from_a_tar(tmp_path: Path, keys: dict[str, KeyPair]) -> None:
    env = node_env(tmp_path / "node", keys)
    v1 = make_scale_model(tmp_path / "v1", version="1")
    path, digest = signed_layout(tmp_path, v1, keys["release"], IDENTITY)
    events = EventBus()
    result = env.puller(events).import_layout(path)
    rec = result.record
    assert (rec.model, rec.version, rec.manifest_digest, result.digest) == ("scale", "1", digest, digest)
    assert rec.source == f"layout:{path.name}@{digest}"
    assert result.signed_by is not None and "release" in result.signed_by
    blobs = env.repository.blobs
    assert blobs.read_bytes(rec.weights_digest) == (v1 / "weights.safetensors").read_bytes()
    assert blobs.has(digest)
    (imported,) = events.recent("image.imported")
    assert imported.fields["digest"] == digest and imported.fields["model"] == "scale"
    assert env.repository.db.get_model("scale").active_version is None  # importing is not deploying

    # Version 2 in a tar, sharing module and weights: only its model.json is new.
    v2 = make_scale_model(tmp_path / "v2", version="2")
    tar, digest2 = signed_layout(tmp_path, v2, keys["release"], IDENTITY, tar=True)
    result2 = env.puller().import_layout(tar)
    assert result2.record.version == "2" and result2.digest == digest2
    assert [b.cached for b in result2.blobs[1:]] == [True, True] and result2.fetched_bytes == 0
    assert sorted(env.versions()) == [("scale", "1"), ("scale", "2")]


class Refusal:
    def __init__(self, tmp: Path, keys: dict[str, KeyPair]):
        self.env = node_env(tmp / "node", keys)
        self.env.repository.import_dir(make_scale_model(tmp / "guard", name="guard", version="1"))
        self.blobs_before = set(self.env.repository.blobs.digests())
        self.events = EventBus()
        self.tmp = tmp
        self.keys = keys

    def model(self, **kwargs: object) -> Path:
        kwargs.setdefault("scale", (5.0, 6.0, 7.0, 8.0))
        return make_scale_model(self.tmp / "model", name="guard", version="2", **kwargs)  # type: ignore[arg-type]

    def refuse(self, path: Path, digest: str, *fragments: str) -> ImageRefused:
        with pytest.raises(ImageRefused) as info:
            self.env.puller(self.events).import_layout(path)
        message = str(info.value)
        for fragment in (digest, str(path), *fragments):
            assert fragment in message, message
        assert info.value.digest == digest
        assert self.env.versions() == [("guard", "1")]
        assert set(self.env.repository.blobs.digests()) == self.blobs_before
        assert not any(self.env.repository.blobs.tmp_dir.iterdir())
        (event,) = self.events.recent("image.refused")
        assert event.fields["digest"] == digest and event.fields["reason"] == message
        return info.value


def test_unsigned_layout_is_refused_naming_the_keys(tmp_path: Path, keys: dict[str, KeyPair]) -> None:
    case = Refusal(tmp_path, keys)
    path, digest = signed_layout(tmp_path, case.model(), None, IDENTITY, tar=True)
    error = case.refuse(path, digest, "unsigned", signature_tag(digest), str(keys["release"].public_path))
    assert isinstance(error, SignatureError)


def test_layout_signed_by_an_untrusted_key_is_refused(tmp_path: Path, keys: dict[str, KeyPair]) -> None:
    case = Refusal(tmp_path, keys)
    path, digest = signed_layout(tmp_path, case.model(), keys["rogue"], IDENTITY)
    error = case.refuse(path, digest, "not by a key of scope", "keys tried", str(keys["release"].public_path))
    assert isinstance(error, SignatureError)
    assert error.keys_tried == (f"release ({keys['release'].public_path})",)


def test_layout_signature_claiming_an_unscoped_name_is_refused(tmp_path: Path, keys: dict[str, KeyPair]) -> None:
    # The trusted key signed, but for a repository it is not trusted for: the claim is what is checked.
    case = Refusal(tmp_path, keys)
    path, digest = signed_layout(tmp_path, case.model(), keys["release"], "other.example/models/guard")
    case.refuse(path, digest, "other.example/models/guard", "no trust scope covers")


def test_layout_signature_for_another_image_is_refused(tmp_path: Path, keys: dict[str, KeyPair]) -> None:
    case = Refusal(tmp_path, keys)
    other, other_digest = signed_layout(tmp_path, case.model(scale=(1.0, 1.0, 1.0, 1.0)), keys["release"], IDENTITY)
    target = tmp_path / "target"
    built = build_from_dir(make_scale_model(tmp_path / "m2", name="guard", version="2"), target)
    # The other image's signature manifest and blobs, copied in under this image's signature name.
    source = OciLayout(other)
    raw = source.signature_manifest(other_digest, 1 << 20)
    assert raw is not None
    layout = OciLayout(target)
    doc = json.loads(raw)
    for entry in [doc["config"], *doc["layers"]]:
        layout.put_bytes(source.read_blob(entry["digest"]), entry["mediaType"])
    layout.add_manifest(raw, signature_tag(built.manifest.digest))
    case.refuse(target, built.manifest.digest, f"is for {other_digest}")


def test_tampered_blob_in_a_layout_is_refused(tmp_path: Path, keys: dict[str, KeyPair]) -> None:
    case = Refusal(tmp_path, keys)
    path, digest = signed_layout(tmp_path, case.model(), keys["release"], IDENTITY)
    weights = OciLayout(path).manifest().weights
    blob = OciLayout(path).blob_path(weights.digest)
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0xFF
    blob.write_bytes(bytes(data))
    case.refuse(path, digest, "corrupt or tampered", weights.digest)


def test_tampered_manifest_in_a_layout_is_refused(tmp_path: Path, keys: dict[str, KeyPair]) -> None:
    case = Refusal(tmp_path, keys)
    path, digest = signed_layout(tmp_path, case.model(), keys["release"], IDENTITY)
    blob = OciLayout(path).blob_path(digest)
    blob.write_bytes(blob.read_bytes().replace(b'"guard"', b'"gu4rd"'))
    case.refuse(path, digest, "corrupt")


def test_layout_manifest_naming_a_missing_blob_is_refused(tmp_path: Path, keys: dict[str, KeyPair]) -> None:
    case = Refusal(tmp_path, keys)
    path, digest = signed_layout(tmp_path, case.model(), keys["release"], IDENTITY)
    weights = OciLayout(path).manifest().weights
    OciLayout(path).blob_path(weights.digest).unlink()
    case.refuse(path, digest, "does not have", weights.digest)


def test_layout_with_an_unknown_abi_version_is_refused(tmp_path: Path, keys: dict[str, KeyPair]) -> None:
    case = Refusal(tmp_path, keys)
    model = case.model()
    meta = json.loads((model / "model.json").read_text())
    meta["abi_version"] = 3
    built = build_image(
        tmp_path / "abi2", json.dumps(meta).encode(), model / "model.wasm", model / "weights.safetensors", "2"
    )
    sign_layout(tmp_path / "abi2", None, keys["release"].private_key, IDENTITY)
    case.refuse(tmp_path / "abi2", built.manifest.digest, "ABI version 3")


def test_layout_with_wrong_weights_for_its_model_json_is_refused(tmp_path: Path, keys: dict[str, KeyPair]) -> None:
    # Signed and intact, but the weights do not match the declared parameters: caught from the header.
    case = Refusal(tmp_path, keys)
    model = case.model()
    import numpy as np
    import safetensors.numpy

    safetensors.numpy.save_file({"scale": np.zeros(5, np.float32)}, str(model / "weights.safetensors"))
    meta = (model / "model.json").read_bytes()
    build_image(tmp_path / "bad", meta, model / "model.wasm", model / "weights.safetensors", "2")
    sign_layout(tmp_path / "bad", None, keys["release"].private_key, IDENTITY)
    with pytest.raises(ImageRefused, match=r"parameter scale is F32\[5\], model.json declares F32\[4\]"):
        case.env.puller().import_layout(tmp_path / "bad")
    assert case.env.versions() == [("guard", "1")]
    # The blobs were fetched before the check: gc (past the grace period) takes them, nothing records them.
    assert not case.env.repository.db.referenced_digests() - case.blobs_before


def test_not_a_layout(tmp_path: Path, keys: dict[str, KeyPair]) -> None:
    env = node_env(tmp_path / "node", keys)
    (tmp_path / "junk.tar").write_bytes(b"not a tar at all")
    with pytest.raises(LayoutError, match="neither an OCI layout"):
        env.puller().import_layout(tmp_path / "junk.tar")
    (tmp_path / "empty").mkdir()
    with pytest.raises(LayoutError, match="no oci-layout file"):
        env.puller().import_layout(tmp_path / "empty")


def test_signing_a_layout_keeps_other_signatures_and_replaces_its_own(tmp_path: Path, keys: dict[str, KeyPair]) -> None:
    path, digest = signed_layout(tmp_path, make_scale_model(tmp_path / "m"), keys["release"], IDENTITY)
    sign_layout(path, None, keys["rogue"].private_key, IDENTITY)
    sign_layout(path, None, keys["release"].private_key, IDENTITY)  # re-signing replaces, never piles up
    layout = OciLayout(path)
    assert layout.names() == ["1"]  # the signature entry is not an image
    raw = layout.signature_manifest(digest, 1 << 20)
    assert raw is not None
    doc = json.loads(raw)
    assert [layer["mediaType"] for layer in doc["layers"]] == [mt.SIMPLE_SIGNING] * 2
    payload = layout.read_blob(doc["layers"][0]["digest"])
    assert json.loads(payload)["critical"]["identity"]["docker-reference"] == IDENTITY
    assert json.loads(payload)["critical"]["image"]["docker-manifest-digest"] == digest


# -- the CLI ------------------------------------------------------------------------------------
def edge(*args: str, env: dict[str, str] | None = None, **kw: object) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if not k.startswith(("EDGE_AGENT_", "COSIGN_"))}
    full.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "agent", *args], capture_output=True, text=True, timeout=60, env=full, cwd=REPO, **kw
    )  # type: ignore[call-overload]


def test_cli_sign_verify_and_pull_a_layout_tar(tmp_path: Path, keys: dict[str, KeyPair]) -> None:
    env = node_env(tmp_path / "node", keys)
    model = make_scale_model(tmp_path / "m", version="3")
    tar = tmp_path / "scale-3.tar"
    assert edge("image", "build", str(model), "--tar", str(tar)).returncode == 0
    key = str(keys["release"].private_path)
    no_identity = edge("image", "sign", f"oci-archive:{tar}", "--key", key)
    assert no_identity.returncode == 2 and "--identity" in no_identity.stderr
    unsigned = env.cli("pull", f"oci-archive:{tar}")
    assert unsigned.returncode == 65 and "unsigned" in unsigned.stderr, unsigned.stderr
    signed = edge("image", "sign", f"oci-archive:{tar}", "--key", key, "--identity", IDENTITY)
    assert signed.returncode == 0, signed.stderr
    assert "signature stored in the layout as sha256-" in signed.stdout
    verified = env.cli("image", "verify", str(tar))
    assert verified.returncode == 0 and f"signed by release ({keys['release'].public_path}) for {IDENTITY}" in (
        verified.stdout
    ), verified.stdout + verified.stderr
    pulled = env.cli("pull", f"oci-archive:{tar}", "--json")
    assert pulled.returncode == 0, pulled.stderr
    doc = json.loads(pulled.stdout)
    assert (doc["model"], doc["version"]) == ("scale", "3") and "release" in doc["signed_by"]


def test_progress_bar_on_a_terminal(tmp_path: Path, keys: dict[str, KeyPair]) -> None:
    env = node_env(tmp_path / "node", keys)
    path, _ = signed_layout(tmp_path, make_scale_model(tmp_path / "m"), keys["release"], IDENTITY)
    master, slave = pty.openpty()
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "agent", "pull", f"oci:{path}", "--config", str(env.config_path)],
            stdout=subprocess.PIPE,
            stderr=slave,
            cwd=REPO,
            env={k: v for k, v in os.environ.items() if not k.startswith("EDGE_AGENT_")},
        )
        os.close(slave)
        slave = -1
        out = b""
        while True:
            ready, _, _ = select.select([master], [], [], 60)  # a hang guard
            if not ready:
                break
            try:
                chunk = os.read(master, 4096)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            out += chunk
        assert proc.wait(60) == 0
    finally:
        os.close(master)
        if slave >= 0:
            os.close(slave)
    text = out.decode(errors="replace")
    assert "[##############################] 100.0%" in text and "MiB/s" in text, text
    assert "pull.progress" not in text  # a person gets a bar, not log events


# -- the daemon's hooks --------------------------------------------------------------------------
def test_agent_hooks_import_layout_and_cache_control(
    make_agent: object, tmp_path: Path, keys: dict[str, KeyPair]
) -> None:
    path, digest = signed_layout(
        tmp_path, make_scale_model(tmp_path / "m", scale=(2, 2, 2, 2)), keys["release"], IDENTITY
    )
    trust = {"trust": {"keys": {"release": str(keys["release"].public_path)}, "scopes": {SCOPE: ["release"]}}}

    def setup(agent: object) -> None:
        agent.config.sections.update(trust)  # type: ignore[attr-defined]
        attach_images(agent)

    running = make_agent(setup=setup)  # type: ignore[operator]
    agent = running.agent
    record = running.call(agent.puller.import_layout(path))
    assert (record.model, record.version, record.manifest_digest) == ("scale", "1", digest)
    running.call(running.lifecycle.deploy("store:scale:1"))
    status, doc = http(
        "POST",
        running.url + "/v2/models/scale/infer",
        {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}]},
    )
    assert status == 200 and doc["outputs"][0]["data"] == [2, 4, 6, 8]
    # agent.cache answers in JSON, as the control surface sends it over MQTT.
    verify = running.call(running.lifecycle.cache_verify())
    assert verify["ok"] and verify["quarantined"] == [] and verify["checked"] >= 4
    gc = running.call(running.lifecycle.cache_gc())
    assert json.loads(json.dumps(gc))["evicted"] == [] and "scale" not in json.dumps(gc["removed_blobs"])
    assert agent.cache.used_bytes() >= sum(b.stat().st_size for b in (agent.blobs.blob_dir).iterdir()) > 0
    # A refused layout raises the pull's error classes through the same hook.
    bad, _ = signed_layout(tmp_path, make_scale_model(tmp_path / "m2", version="2"), keys["rogue"], IDENTITY)
    with pytest.raises(SignatureError):
        running.call(agent.puller.import_layout(bad))


# -- interoperability ----------------------------------------------------------------------------
@needs_registry
@needs_skopeo
def test_skopeo_copied_image_and_signature_import_from_its_layout(
    tmp_path: Path,
    registry: Registry,  # noqa: F811
    keys: dict[str, KeyPair],
) -> None:
    """What skopeo copies out of a registry (image tag + signature tag) imports here, signature checked."""
    publisher = ImageEnv(tmp_path / "pub", hosts={registry.host: {"plain_http": True}})
    ref = f"{registry.host}/models/skopeo-out:1"
    digest = publish(tmp_path, publisher.registry_settings(), make_scale_model(tmp_path / "m"), ref, keys["release"])
    out = tmp_path / "copied"
    sig = signature_tag(digest)
    for tag in ("1", sig):
        subprocess.run(
            [
                SKOPEO,
                "copy",
                "-q",
                "--src-tls-verify=false",
                f"docker://{registry.host}/models/skopeo-out:{tag}",
                f"oci:{out}:{tag}",
            ],
            check=True,
            capture_output=True,
        )
    env = ImageEnv(
        tmp_path / "node",
        keys={"release": keys["release"].public_path},
        scopes={f"{registry.host}/models": ["release"]},
    )
    result = env.puller().import_layout(out)
    assert result.digest == digest and "release" in (result.signed_by or "")


@needs_registry
def test_a_layout_signed_offline_pushes_with_its_signature(
    tmp_path: Path,
    registry: Registry,  # noqa: F811
    keys: dict[str, KeyPair],
) -> None:
    identity = f"{registry.host}/models/offline-signed"
    path, digest = signed_layout(
        tmp_path, make_scale_model(tmp_path / "m", name="offsig"), keys["release"], identity, tar=True
    )
    publisher = ImageEnv(tmp_path / "pub", hosts={registry.host: {"plain_http": True}})
    with open_layout(path) as layout:
        pushed = push_layout(layout, None, f"{identity}:1", publisher.registry_settings())
    assert pushed.signature == signature_tag(digest)
    node = ImageEnv(
        tmp_path / "node",
        hosts={registry.host: {"plain_http": True}},
        keys={"release": keys["release"].public_path},
        scopes={f"{registry.host}/models": ["release"]},
    )
    assert node.puller().pull(f"{identity}:1").digest == digest

"""Bad images are refused with an error naming the image, its digest and the keys tried; nothing is admitted.

Every case starts from a node that serves ``guard:1`` and tries to pull a
``guard:2`` that is wrong in one way. Afterwards there is no ``guard:2``
version, no blob of it in the store, ``guard:1`` is still the active
version, and an ``image.refused`` event says what happened.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import pytest
from conftest import AgentThread, http
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

from agent.cas import sha256_digest
from agent.config import Config
from agent.events import EventBus
from agent.images import mediatypes as mt
from agent.images.errors import ImageRefused, SignatureError
from agent.images.layout import OciLayout, build_image
from agent.images.manifest import Descriptor, build_manifest
from agent.images.push import push_layout, sign_image
from agent.images.reference import signature_tag
from agent.images.registry import RegistryClient
from agent.wiring import attach_images

pytestmark = needs_registry


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, KeyPair]:
    root = tmp_path_factory.mktemp("keys")
    return {name: make_keypair(root, name) for name in ("release", "rogue")}


class Node:
    """An agent's store that serves guard:1, configured to trust ``release`` for ``<registry>/models``."""

    def __init__(self, root: Path, reg: Registry, keys: dict[str, KeyPair], **registry_settings: object):
        self.env = ImageEnv(
            root / "node",
            hosts={reg.host: {"plain_http": True}},
            keys={"release": keys["release"].public_path},
            scopes={f"{reg.host}/models": ["release"]},
            registry=dict(registry_settings),
        )
        self.publisher = ImageEnv(root / "publisher", hosts={reg.host: {"plain_http": True}})
        self.root = root
        self.reg = reg
        self.keys = keys
        repo = self.env.repository
        repo.import_dir(make_scale_model(root / "guard-1", name="guard", version="1"))
        repo.db.set_active("guard", "1")
        self.blobs_before = set(repo.blobs.digests())
        self.events = EventBus()

    def publish(self, repo: str, key: str | None = "release", **model: object) -> tuple[str, str]:
        ref = f"{self.reg.host}/{repo}"
        # Weights of its own: nothing of it is in the store from guard:1, and no other test's
        # image shares a blob with it in the registry (whose blob store is global).
        seed = float(zlib.crc32(repo.encode()) % 1000)
        model.setdefault("scale", (5.0, 6.0, 7.0, seed))
        model_dir = make_scale_model(self.root / f"model-{repo.replace('/', '-')}", name="guard", version="2", **model)  # type: ignore[arg-type]
        digest = publish(self.root, self.publisher.registry_settings(), model_dir, ref, self.keys[key] if key else None)
        return ref, digest

    def pull(self, ref: str) -> ImageRefused:
        with pytest.raises(ImageRefused) as info:
            self.env.puller(self.events).pull(ref)
        return info.value

    def assert_nothing_admitted(self, error: ImageRefused, digest: str, *fragments: str) -> None:
        message = str(error)
        assert digest in message, message
        assert "guard" in message or self.reg.host in message, message
        for fragment in fragments:
            assert fragment in message, message
        db = self.env.repository.db
        assert [(r.model, r.version) for r in db.versions()] == [("guard", "1")]
        assert db.get_model("guard").active_version == "1"
        assert set(self.env.repository.blobs.digests()) == self.blobs_before
        assert not any(self.env.repository.blobs.tmp_dir.glob("partial-*"))
        (event,) = self.events.recent("image.refused")
        assert event.fields["digest"] == digest and event.fields["reason"] == message


@pytest.fixture
def node(tmp_path: Path, registry: Registry, keys: dict[str, KeyPair]) -> Node:  # noqa: F811
    return Node(tmp_path, registry, keys)


def push_custom(
    reg: Registry,
    repo: str,
    config: bytes,
    layers: list[tuple[bytes, str]],
    config_type: str = mt.MODEL_CONFIG,
    annotations: dict[str, str] | None = None,
    key: KeyPair | None = None,
) -> str:
    """Push a hand-made manifest (and sign it): for images our builder would never write."""
    env = ImageEnv(reg.root / "custom-pusher", hosts={reg.host: {"plain_http": True}})
    settings = env.registry_settings()
    config_desc = Descriptor(config_type, sha256_digest(config), len(config))
    layer_descs = [Descriptor(t, sha256_digest(data), len(data)) for data, t in layers]
    raw = build_manifest(config_desc, layer_descs, annotations)
    repository, _, tag = repo.partition(":")
    with RegistryClient(reg.host, settings) as client:
        client.push_blob(repository, config_desc, config)
        for desc, (data, _) in zip(layer_descs, layers, strict=True):
            client.push_blob(repository, desc, data)
        client.put_manifest(repository, tag, raw, mt.OCI_MANIFEST)
    if key is not None:
        sign_image(f"{reg.host}/{repo}", key.private_key, settings)
    return sha256_digest(raw)


def model_parts(root: Path, **kwargs: object) -> tuple[bytes, bytes, bytes]:
    kwargs.setdefault("scale", (5.0, 6.0, 7.0, 8.0))
    model = make_scale_model(root, name="guard", version="2", **kwargs)  # type: ignore[arg-type]
    return (
        (model / "model.json").read_bytes(),
        (model / "model.wasm").read_bytes(),
        (model / "weights.safetensors").read_bytes(),
    )


# -- signatures ------------------------------------------------------------------------------------
def test_unsigned_image_is_refused(node: Node) -> None:
    ref, digest = node.publish("models/unsigned:2", key=None)
    error = node.pull(ref)
    assert isinstance(error, SignatureError)
    node.assert_nothing_admitted(error, digest, "unsigned", str(node.keys["release"].public_path))


def test_signature_by_an_untrusted_key_is_refused(node: Node) -> None:
    ref, digest = node.publish("models/rogue:2", key="rogue")
    error = node.pull(ref)
    assert isinstance(error, SignatureError)
    node.assert_nothing_admitted(error, digest, "not by any trusted key", "keys tried", "release")
    assert error.keys_tried == (f"release ({node.keys['release'].public_path})",)


def test_signature_for_another_digest_is_refused(node: Node) -> None:
    _ref_a, digest_a = node.publish("models/swap:2", scale=(1.0, 1.0, 1.0, 1.0))
    # Image B, unsigned; then A's signature manifest copied to B's signature tag.
    ref_b = f"{node.reg.host}/models/swap:b"
    model_b = make_scale_model(node.root / "model-b", name="guard", version="2", scale=(9.0, 9.0, 9.0, 9.0))
    digest_b = publish(node.root, node.publisher.registry_settings(), model_b, ref_b)
    with RegistryClient(node.reg.host, node.publisher.registry_settings()) as client:
        sig = client.get_manifest("models/swap", signature_tag(digest_a), 1 << 20, "sig")
        client.put_manifest("models/swap", signature_tag(digest_b), sig.raw, mt.OCI_MANIFEST)
    error = node.pull(ref_b)
    node.assert_nothing_admitted(error, digest_b, f"is for {digest_a}")


def test_image_outside_every_scope_is_refused(node: Node) -> None:
    ref, digest = node.publish("elsewhere/guard:2")  # signed by release, but release signs only models/
    error = node.pull(ref)
    node.assert_nothing_admitted(error, digest, "no trusted keys are configured")


# -- content ---------------------------------------------------------------------------------------
def test_tampered_blob_is_refused(node: Node) -> None:
    ref, digest = node.publish("models/tamperblob:2")
    with RegistryClient(node.reg.host, node.publisher.registry_settings()) as client:
        raw = client.get_manifest("models/tamperblob", "2", 1 << 20, "m").raw
    weights = json.loads(raw)["layers"][1]["digest"]
    data_file = node.reg.blob_file(weights)
    data = bytearray(data_file.read_bytes())
    data[-1] ^= 0xFF  # same size, different content
    data_file.write_bytes(bytes(data))
    error = node.pull(ref)
    node.assert_nothing_admitted(error, digest, "corrupt or tampered", weights)


def test_tampered_manifest_is_refused(node: Node) -> None:
    ref, digest = node.publish("models/tampermanifest:2")
    data_file = node.reg.blob_file(digest)
    data_file.write_bytes(data_file.read_bytes().replace(b'"guard"', b'"gu4rd"'))
    by_tag = node.pull(ref)
    node.assert_nothing_admitted(by_tag, digest, "tampered")
    node.events = EventBus()
    by_digest = node.pull(f"{node.reg.host}/models/tampermanifest@{digest}")
    node.assert_nothing_admitted(by_digest, digest, "not the digest asked for")


def test_wrong_media_type_is_refused(node: Node, tmp_path: Path) -> None:
    _, module, weights = model_parts(tmp_path / "parts")
    container_config = json.dumps({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers"}}).encode()
    digest = push_custom(
        node.reg,
        "models/container:2",
        container_config,
        [(module, "application/vnd.oci.image.layer.v1.tar+gzip"), (weights, mt.WEIGHTS)],
        config_type=mt.OCI_CONFIG,
        key=node.keys["release"],
    )
    error = node.pull(f"{node.reg.host}/models/container:2")
    node.assert_nothing_admitted(error, digest, "not an edge-agent model image", mt.OCI_CONFIG)


def test_manifest_naming_a_missing_blob_is_refused(node: Node) -> None:
    ref, digest = node.publish("models/missing:2")
    with RegistryClient(node.reg.host, node.publisher.registry_settings()) as client:
        raw = client.get_manifest("models/missing", "2", 1 << 20, "m").raw
    weights = json.loads(raw)["layers"][1]["digest"]
    node.reg.blob_file(weights).unlink()
    error = node.pull(ref)
    node.assert_nothing_admitted(error, digest, "does not have", weights)


def test_oversized_manifest_is_refused(tmp_path: Path, registry: Registry, keys: dict[str, KeyPair]) -> None:  # noqa: F811
    node = Node(tmp_path, registry, keys, max_manifest_bytes=4096)
    _, module, weights = model_parts(tmp_path / "parts")
    config = (make_scale_model(tmp_path / "cfg", name="guard", version="2") / "model.json").read_bytes()
    digest = push_custom(
        registry,
        "models/huge:2",
        config,
        [(module, mt.WASM_MODULE), (weights, mt.WEIGHTS)],
        annotations={"padding": "x" * 8192},
        key=keys["release"],
    )
    with pytest.raises(ImageRefused) as info:
        node.env.puller(node.events).pull(f"{registry.host}/models/huge@{digest}")
    node.assert_nothing_admitted(info.value, digest, "over the limit of 4096 bytes", "max_manifest_bytes")


def test_unknown_abi_version_is_refused_before_any_large_blob(node: Node, tmp_path: Path) -> None:
    model = make_scale_model(tmp_path / "abi2", name="guard", version="2")
    meta = json.loads((model / "model.json").read_text())
    meta["abi_version"] = 3  # 1 and 2 exist; 3 is a future version
    layout = tmp_path / "abi2-layout"
    built = build_image(layout, json.dumps(meta).encode(), model / "model.wasm", model / "weights.safetensors", "2")
    ref = f"{node.reg.host}/models/abi2:2"
    push_layout(OciLayout(layout), "2", ref, node.publisher.registry_settings())
    sign_image(ref, node.keys["release"].private_key, node.publisher.registry_settings())
    error = node.pull(ref)
    node.assert_nothing_admitted(error, built.manifest.digest, "ABI version 3")


# -- a serving agent ------------------------------------------------------------------------------
def test_serving_agent_keeps_serving_through_a_refused_deploy(node: Node) -> None:
    bad_ref, _ = node.publish("models/deploy-bad:2", key="rogue")
    good_ref, good_digest = node.publish("models/deploy-good:2", scale=(10.0, 10.0, 10.0, 10.0))
    config = Config.load(file=node.env.config_path, env={}, overrides={"listen": "127.0.0.1:0"})
    agent = AgentThread(config, setup=attach_images)
    try:
        body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1, 1, 1, 1]}]}

        def infer() -> list[float]:
            status, doc = http("POST", agent.url + "/v2/models/guard/infer", body)
            assert status == 200, doc
            return doc["outputs"][0]["data"]

        assert infer() == [1.0, 2.0, 3.0, 4.0]
        with pytest.raises(SignatureError):
            agent.call(agent.lifecycle.deploy(bad_ref))
        assert infer() == [1.0, 2.0, 3.0, 4.0]
        assert agent.agent.db.get_model("guard").active_version == "1"
        assert agent.agent.events.recent("image.refused")
        # The same hook pulls and swaps a good image.
        agent.call(agent.lifecycle.deploy(good_ref))
        assert infer() == [10.0, 10.0, 10.0, 10.0]
        assert agent.agent.db.get_version("guard", "2").manifest_digest == good_digest
    finally:
        agent.stop()

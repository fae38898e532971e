"""The image format's pieces on their own: references, settings, manifests, layouts, keys, signatures, trust.

cosign itself is not installable here (no Debian package), so interoperability
is checked against data cosign's side produced: a signature made with a cosign
key over a simple-signing payload (sigstore-rs, ``src/crypto/verification_key.rs``
tests) and another made by SUSE's build service with an ``optional`` claim,
which our payload builder must reproduce byte for byte for them to verify; an
encrypted private key from cosign's own test suite (``pkg/cosign/keys_test.go``,
``pemsigstorekey``, password ``hello``); and go-securesystemslib's vectors for
the scrypt + secretbox format cosign encrypts its keys with.
"""

from __future__ import annotations

import json
import subprocess
import tarfile
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from images_fixtures import SKOPEO, make_keypair, needs_skopeo
from modelkit import make_scale_model

from agent.cas import sha256_digest
from agent.errors import ConfigError, InvalidModel
from agent.images import mediatypes as mt
from agent.images.auth import parse_challenges
from agent.images.backoff import Backoff
from agent.images.errors import BadReference, ImageRefused, KeyFileError, LayoutError, SignatureError
from agent.images.layout import OciLayout, build_from_dir, build_image, open_layout, write_tar
from agent.images.manifest import Descriptor, build_manifest, parse_model_manifest
from agent.images.reference import Reference, signature_tag
from agent.images.settings import CacheSettings, RegistrySettings, TrustSettings, parse_size
from agent.images.signing import (
    build_signature_manifest,
    decrypt_cosign_key,
    generate_keypair,
    load_private_key,
    load_public_key,
    parse_payload,
    parse_signature_manifest,
    sign_payload,
    simple_signing_payload,
)
from agent.images.trust import Candidate, TrustPolicy

DIGEST_A = "sha256:" + "a" * 64
DIGEST_B = "sha256:" + "b" * 64

# A signature `cosign sign --key` made (sigstore-rs keeps it as a test vector).
COSIGN_PUB = """-----BEGIN PUBLIC KEY-----
MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAENptdY/l3nB0yqkXLBWkZWQwo6+cu
OSWS1X9vPavpiQOoTTGC0xX57OojUadxF1cdQmrsiReWg2Wn4FneJfa8xw==
-----END PUBLIC KEY-----
"""
COSIGN_DIGEST = "sha256:f3cfc9d0dbf931d3db4685ec659b7ac68e2a578219da4aae65427886e649b06b"
COSIGN_SIGNATURE = "MEUCIQD6q/COgzOyW0YH1Dk+CCYSt4uAhm3FDHUwvPI55zwnlwIgE0ZK58ZOWpZw8YVmBapJhBqCfdPekIknimuO0xH8Jh8="

# The same suite: an RSA signature from SUSE's Open Build Service, whose payload carries an "optional" claim.
SUSE_PUB = """-----BEGIN PUBLIC KEY-----
MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEAvM/dHoi6nSy7hbKHLYUr
Xy6Bv35JbdoIzny5vSFiRXApr0KS56U8PugdGmh+vd7H8YNlx2YOJxzv02Blsrcm
WDZcXjE3Xpsi/IHFfRZLOdwwR+u8MNFxwRUVzxyIzKGtbREVVfXPfb2Xc6FL5/tE
vQtUKuR6XdzSaav2RnV5IybCB09s0Np0AUbdi5EfSe4INuqgY+VFYLjvM5onbAQL
N3bFLS4Quk66Dhv93Zi6NwopwL1F07UPC5uadkyePStP3PA0OAOemj9vZADOWx5a
dsGCKISs8iphNC5mDVoLy8Ry49Ms3eQXRjVQOMco3YNf8AhsIdxDNBVN8VTDKVkE
DwIDAQAB
-----END PUBLIC KEY-----
"""
SUSE_DIGEST = "sha256:356631f7603526a0af827741f5fe005acf19b7ef7705a34241a91c2d47a6db5e"
SUSE_SIGNATURE = (
    "umasnfYJyLbYPjiq1wIy086Ns+CrgiMoQUSGqPqlUmtWsY0hbngJ73hPfJFrppviPKdBeuUiiwgKagBKIXLEXjwxQp4eE3szwqkKoAnR/lByb7"
    "ahLgVQ4MB6xDQaHD53MYtj7aOvd4O7FqJltVVjEn7nM/Du2tL5y3jf6lD7VfHZE8uRocRlyppt8SfTc5L12mVlZ0YlfKYkd334A4y/reCy3Yws0"
    "j356Wj7GLScMU5uR11Y2y41rSyYm5uXhTerwNFXsRcPMAmenMarCdCmt4Lf4wpcJBCU172xiK+rIhbMgkLjjA772+auSYf1E8CySVah5CD0Td5YC"
    "3y8vIIYaA=="
)

# cosign's own test key (pkg/cosign/keys_test.go, "pemsigstorekey"), encrypted by cosign with the password "hello".
COSIGN_ENCRYPTED_KEY = """-----BEGIN ENCRYPTED SIGSTORE PRIVATE KEY-----
eyJrZGYiOnsibmFtZSI6InNjcnlwdCIsInBhcmFtcyI6eyJOIjozMjc2OCwiciI6
OCwicCI6MX0sInNhbHQiOiI3T3VGd2VsbWZZNXVId2NoaURSc210anNwZ2ZlZjFG
Mk5lOGFDTjVLYVpZPSJ9LCJjaXBoZXIiOnsibmFtZSI6Im5hY2wvc2VjcmV0Ym94
Iiwibm9uY2UiOiJQNHk4OGhCb3ZTa09MbXN0bFVBaGJwdDJ0K2xTNUxQSCJ9LCJj
aXBoZXJ0ZXh0IjoiMnB1QzdyZldJOWh3bnJlQ2s4aUZDRlVwQlRrSzRJNlIvbFBF
cnBDekpXUGpJWXl4eGVIL1A2VW52cFJHdVhla1NNb3JMdGhLamdoQ1JlNy82NDVH
QWtoVm1LRC92eEF0S2EvbE1abENSQ3FlekJGUFd1dzNpeFRtZ2xhb2J1ZFVSbUVs
bmNGOGlZbzBTMVl6Y1ZOMVFwY2J2c0dNcUlYRzVlbmdteGp5dCtBcXlyZTF0Q0Y0
V01tU1BlaEljNlBqd2h1Q2xHaVpJUWRvTGc9PSJ9
-----END ENCRYPTED SIGSTORE PRIVATE KEY-----
"""

# go-securesystemslib's vectors for the scrypt + nacl/secretbox format (passphrase "supersecret").
SSL_VECTORS = [
    b'{"kdf":{"name":"scrypt","params":{"N":32768,"r":8,"p":1},"salt":"N9a7x5JFGbrtB2uBR81jPwp0eiLR4A7FV3mjVAQrg1g="},'
    b'"cipher":{"name":"nacl/secretbox","nonce":"2h8HxMmgRfuYdpswZBQaU3xJ1nkA/5Ik"},'
    b'"ciphertext":"SEW6sUh0jf2wfdjJGPNS9+bkk2uB+Cxamf32zR8XkQ=="}',
]


# -- references -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "registry", "repository", "tag", "digest"),
    [
        ("127.0.0.1:5000/models/digits:1", "127.0.0.1:5000", "models/digits", "1", None),
        ("registry.example.com/a/b/c", "registry.example.com", "a/b/c", "latest", None),
        (f"localhost/x@{DIGEST_A}", "localhost", "x", None, DIGEST_A),
        (f"reg.io:443/x:v1.2-rc@{DIGEST_B}", "reg.io:443", "x", "v1.2-rc", DIGEST_B),
        ("[::1]:5000/x:t", "[::1]:5000", "x", "t", None),
    ],
)
def test_reference_parses(text: str, registry: str, repository: str, tag: str | None, digest: str | None) -> None:
    ref = Reference.parse(text)
    assert (ref.registry, ref.repository, ref.tag, ref.digest) == (registry, repository, tag, digest)
    assert Reference.parse(str(ref)) == ref


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("digits:1", "must start with the registry host"),
        ("reg.io/Models/x", "lower-case"),
        ("reg.io/x@sha256:abc", "64 lower-case hex"),
        ("reg.io/x:-bad", "tag"),
        ("", "empty"),
    ],
)
def test_reference_refuses(text: str, fragment: str) -> None:
    with pytest.raises(BadReference, match=fragment):
        Reference.parse(text)


def test_signature_tag_is_cosigns() -> None:
    assert signature_tag(DIGEST_A) == "sha256-" + "a" * 64 + ".sig"


# -- settings -------------------------------------------------------------------------------------
def test_settings_parse_and_refuse() -> None:
    reg = RegistrySettings.from_table(
        {"stall_timeout_s": "7", "hosts": {"r.example:5000": {"plain_http": "true", "username": "u"}}}
    )
    assert reg.stall_timeout_s == 7.0
    assert reg.host("r.example:5000").plain_http is True
    assert reg.host("elsewhere").plain_http is False  # HTTPS unless named
    with pytest.raises(ConfigError, match=r"unknown registry setting.*stall_timeout"):
        RegistrySettings.from_table({"stall_timeout": 3})
    with pytest.raises(ConfigError, match="unknown key"):
        TrustSettings.from_table({"keys": {"a": "/a.pub"}, "scopes": {"r.example": ["b"]}})
    assert TrustSettings.from_table({}).require_signature is True
    assert CacheSettings.from_table({"max_size": "2GiB"}).max_bytes == 2 * 1024**3
    assert parse_size("1.5GB") == 1_500_000_000
    with pytest.raises(ConfigError):
        parse_size("lots")


def test_challenge_parsing() -> None:
    (bearer,) = parse_challenges('Bearer realm="https://auth.example/token",service="reg",scope="repository:a/b:pull"')
    assert bearer.scheme == "bearer"
    assert bearer.params == {"realm": "https://auth.example/token", "service": "reg", "scope": "repository:a/b:pull"}
    (basic,) = parse_challenges('Basic realm="x"')
    assert basic.scheme == "basic"


class _EdgeRng:
    """Jitter pinned to one end of its range, so the bounds themselves are visible."""

    def __init__(self, end: str):
        self.end = end

    def uniform(self, low: float, high: float) -> float:
        return high if self.end == "high" else low


def test_backoff_grows_with_jitter_and_honours_retry_after() -> None:
    # The delay bound doubles from initial_s up to max_s, attempt after attempt ...
    for end, expected in (("high", [1.0, 2.0, 4.0, 4.0, 4.0]), ("low", [0.5, 1.0, 2.0, 2.0, 2.0])):
        slept: list[float] = []
        backoff = Backoff(attempts=6, initial_s=1.0, max_s=4.0, sleep=slept.append, rng=_EdgeRng(end))  # type: ignore[arg-type]
        for _ in range(5):
            backoff.wait()
        assert slept == expected, (end, slept)
    # ... with real jitter each delay lies in [bound/2, bound], and retries end after `attempts`.
    slept = []
    backoff = Backoff(attempts=5, initial_s=1.0, max_s=4.0, sleep=slept.append)
    for _ in range(4):
        assert not backoff.exhausted
        backoff.wait()
    assert backoff.exhausted
    for n, delay in enumerate(slept):
        cap = min(4.0, 2**n)
        assert cap / 2 <= delay <= cap
    # Retry-After is honoured, but never beyond the ceiling.
    assert Backoff(3, 0.1, 10.0).next_delay(retry_after=5) >= 5
    assert Backoff(3, 0.1, 10.0).next_delay(retry_after=3600) <= 10.0


# -- manifests and layouts ------------------------------------------------------------------------
def _manifest(config_type: str = mt.MODEL_CONFIG, layers: list[str] | None = None, **extra: object) -> bytes:
    layer_types = layers if layers is not None else [mt.WASM_MODULE, mt.WEIGHTS]
    doc = json.loads(
        build_manifest(Descriptor(config_type, DIGEST_A, 10), [Descriptor(t, DIGEST_B, 20) for t in layer_types])
    )
    doc.update(extra)
    return json.dumps(doc).encode()


def test_manifest_checks() -> None:
    ok = parse_model_manifest(_manifest(), mt.OCI_MANIFEST, "img")
    assert ok.module.media_type == mt.WASM_MODULE and ok.weights.media_type == mt.WEIGHTS
    cases = {
        "container image": _manifest(config_type=mt.OCI_CONFIG),
        "newer format": _manifest(config_type="application/vnd.edge-agent.model.config.v2+json"),
        "unknown layer": _manifest(layers=[mt.WASM_MODULE, mt.WEIGHTS, "application/x-tar"]),
        "no module": _manifest(layers=[mt.WEIGHTS]),
        "index": json.dumps({"schemaVersion": 2, "mediaType": mt.OCI_INDEX, "manifests": []}).encode(),
        "schema 1": _manifest(schemaVersion=1),
        "not json": b"{nope",
        "foreign urls": json.dumps(
            {
                **json.loads(_manifest()),
                "layers": [{"mediaType": mt.WASM_MODULE, "digest": DIGEST_B, "size": 1, "urls": ["http://x"]}],
            }
        ).encode(),
    }
    for label, raw in cases.items():
        with pytest.raises(ImageRefused) as info:
            parse_model_manifest(raw, mt.OCI_MANIFEST, "reg.io/x:1")
        assert "reg.io/x:1" in str(info.value), label
        assert info.value.digest == sha256_digest(raw)
    with pytest.raises(ImageRefused, match="served it as"):
        parse_model_manifest(_manifest(), mt.DOCKER_MANIFEST, "img")


def test_build_is_reproducible_and_readable(tmp_path: Path) -> None:
    model = make_scale_model(tmp_path / "m", name="repro", version="3")
    first = build_from_dir(model, tmp_path / "l1")
    second = build_from_dir(model, tmp_path / "l2", name="other-name")
    assert first.manifest.digest == second.manifest.digest
    layout = OciLayout(tmp_path / "l1")
    manifest = layout.manifest("3")
    assert layout.read_blob(manifest.config.digest) == (model / "model.json").read_bytes()
    assert layout.read_blob(manifest.module.digest) == (model / "model.wasm").read_bytes()
    assert manifest.annotations[mt.TITLE] == "repro"
    # A second image in the same layout: resolving needs a name now.
    build_from_dir(make_scale_model(tmp_path / "m2", name="repro", version="4"), tmp_path / "l1")
    assert sorted(layout.names()) == ["3", "4"]
    with pytest.raises(Exception, match="holds 2 images"):
        layout.resolve()
    # The tar is byte-for-byte reproducible and opens to the same image.
    write_tar(tmp_path / "l2", tmp_path / "a.tar")
    write_tar(tmp_path / "l2", tmp_path / "b.tar")
    assert (tmp_path / "a.tar").read_bytes() == (tmp_path / "b.tar").read_bytes()
    with open_layout(tmp_path / "a.tar") as from_tar:
        assert from_tar.manifest("other-name").digest == first.manifest.digest


def test_build_refuses_a_bad_model(tmp_path: Path) -> None:
    model = make_scale_model(tmp_path / "m")
    meta = json.loads((model / "model.json").read_text())
    meta["abi_version"] = 3
    (model / "model.json").write_text(json.dumps(meta))
    with pytest.raises(InvalidModel, match="ABI version"):
        build_from_dir(model, tmp_path / "layout")
    assert not (tmp_path / "layout" / "index.json").exists()


def test_layout_tar_with_escaping_member_is_refused(tmp_path: Path) -> None:
    evil = tmp_path / "evil.tar"
    with tarfile.open(evil, "w") as tar:
        info = tarfile.TarInfo("../escape")
        info.size = 0
        tar.addfile(info)
    with pytest.raises(LayoutError, match=r"unsafe member '\.\./escape'"), open_layout(evil):
        pass
    assert not (tmp_path.parent / "escape").exists()
    # A link inside the tree is refused too: a blob must be the bytes in the tar, nothing it points at.
    linked = tmp_path / "linked.tar"
    with tarfile.open(linked, "w") as tar:
        info = tarfile.TarInfo("blobs/sha256/" + "a" * 64)
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(info)
    with pytest.raises(LayoutError, match="is a link or device"), open_layout(linked):
        pass


@needs_skopeo
def test_skopeo_reads_our_layout(tmp_path: Path) -> None:
    model = make_scale_model(tmp_path / "m", name="skopeo-read", version="1")
    built = build_from_dir(model, tmp_path / "layout")
    raw = subprocess.run(
        [SKOPEO, "inspect", "--raw", f"oci:{tmp_path / 'layout'}:1"], check=True, capture_output=True
    ).stdout
    assert sha256_digest(raw) == built.manifest.digest
    config = subprocess.run(
        [SKOPEO, "inspect", "--config", "--raw", f"oci:{tmp_path / 'layout'}:1"], check=True, capture_output=True
    ).stdout
    assert config == (model / "model.json").read_bytes()
    # skopeo copies it as an opaque artifact, blob for blob, digest unchanged.
    write_tar(tmp_path / "layout", tmp_path / "layout.tar")
    subprocess.run(
        [SKOPEO, "copy", "-q", f"oci-archive:{tmp_path / 'layout.tar'}:1", f"oci:{tmp_path / 'copy'}:again"],
        check=True,
        capture_output=True,
    )
    assert OciLayout(tmp_path / "copy").manifest("again").digest == built.manifest.digest


# -- keys and signatures --------------------------------------------------------------------------
def test_a_cosign_signature_verifies_here() -> None:
    key = load_public_key("cosign", COSIGN_PUB)
    payload = simple_signing_payload("registry-testing.svc.lan/busybox", COSIGN_DIGEST)
    assert key.verify(COSIGN_SIGNATURE, payload)
    assert not key.verify(COSIGN_SIGNATURE, payload.replace(b"busybox", b"busyb0x"))
    claims = parse_payload(payload)
    assert claims.digest == COSIGN_DIGEST and claims.docker_reference == "registry-testing.svc.lan/busybox"


def test_a_signature_with_an_optional_claim_verifies_here() -> None:
    # Go's encoding/json sorts map keys and writes no spaces: {"creator":"OBS"} must come out exactly so.
    payload = simple_signing_payload(
        "registry.suse.com/suse/sle-micro/5.0/toolbox", SUSE_DIGEST, optional={"creator": "OBS"}
    )
    assert payload.endswith(b'"optional":{"creator":"OBS"}}')
    assert load_public_key("suse", SUSE_PUB).verify(SUSE_SIGNATURE, payload)


def test_a_key_cosign_encrypted_signs_here(tmp_path: Path) -> None:
    (tmp_path / "cosign.key").write_text(COSIGN_ENCRYPTED_KEY)
    key = load_private_key(tmp_path / "cosign.key", lambda _confirm: b"hello")
    payload = simple_signing_payload("r.example/m", DIGEST_A)
    public = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    assert load_public_key("cosign", public.decode()).verify(sign_payload(key, payload), payload)
    with pytest.raises(KeyFileError, match="wrong password"):
        load_private_key(tmp_path / "cosign.key", lambda _confirm: b"hell0")


def test_cosign_encrypted_key_format(tmp_path: Path) -> None:
    for vector in SSL_VECTORS:
        assert decrypt_cosign_key(vector, b"supersecret") == b"reallyimportant"
    with pytest.raises(KeyFileError, match="wrong password"):
        decrypt_cosign_key(SSL_VECTORS[0], b"wrong")
    hostile = SSL_VECTORS[0].replace(b'"N":32768', b'"N":1073741824')
    with pytest.raises(KeyFileError, match="unsupported scrypt parameters"):
        decrypt_cosign_key(hostile, b"supersecret")
    # Our keygen writes that format; the key signs and the .pub verifies.
    key_path, pub_path = generate_keypair(tmp_path / "cosign", password=b"pw")
    assert key_path.read_text().startswith("-----BEGIN ENCRYPTED SIGSTORE PRIVATE KEY-----")
    assert oct(key_path.stat().st_mode & 0o777) == "0o600"
    assert pub_path.read_text().startswith("-----BEGIN PUBLIC KEY-----")
    key = load_private_key(key_path, lambda _confirm: b"pw")
    payload = simple_signing_payload("r.example/m", DIGEST_A)
    assert load_public_key("k", str(pub_path)).verify(sign_payload(key, payload), payload)
    with pytest.raises(KeyFileError):
        load_private_key(key_path, lambda _confirm: b"not-it")
    with pytest.raises(KeyFileError, match="exists"):
        generate_keypair(tmp_path / "cosign", password=b"pw")


def test_payload_is_byte_identical_to_cosigns() -> None:
    assert simple_signing_payload("r.example/m", DIGEST_A) == (
        b'{"critical":{"identity":{"docker-reference":"r.example/m"},"image":{"docker-manifest-digest":"'
        + DIGEST_A.encode()
        + b'"},"type":"cosign container image signature"},"optional":null}'
    )


def test_signature_manifest_round_trip() -> None:
    raw, config = build_signature_manifest([(b"payload-1", "c2ln"), (b"payload-2", "c2lnMg==")])
    doc = json.loads(raw)
    assert doc["mediaType"] == mt.OCI_MANIFEST
    assert [layer["mediaType"] for layer in doc["layers"]] == [mt.SIMPLE_SIGNING] * 2
    assert json.loads(config)["rootfs"]["diff_ids"] == [sha256_digest(b"payload-1"), sha256_digest(b"payload-2")]
    layers = parse_signature_manifest(raw)
    assert [layer.signature for layer in layers] == ["c2ln", "c2lnMg=="]


# -- trust ----------------------------------------------------------------------------------------
def test_trust_policy_scopes_and_refusals(tmp_path: Path) -> None:
    old, new, other = (make_keypair(tmp_path, n) for n in ("old", "new", "other"))
    policy = TrustPolicy(
        TrustSettings.from_table(
            {
                "keys": {"old": str(old.public_path), "new": str(new.public_path), "other": str(other.public_path)},
                "scopes": {"reg.io": ["other"], "reg.io/models": ["old", "new"]},
            }
        )
    )
    ref = Reference.parse("reg.io/models/digits:1")
    assert policy.scope_for(ref) == "reg.io/models"
    assert policy.scope_for(Reference.parse("reg.io/elsewhere:1")) == "reg.io"
    assert policy.scope_for(Reference.parse("reg.io/modelsx:1")) == "reg.io"  # whole path components only
    assert policy.scope_for(Reference.parse("other.io/models:1")) is None

    def cand(key_pair: object, digest: str) -> Candidate:
        payload = simple_signing_payload("reg.io/models/digits", digest)
        return Candidate(payload, sign_payload(key_pair.private_key, payload), sha256_digest(payload))  # type: ignore[attr-defined]

    # Rotation: either key of the scope is accepted.
    assert policy.verify(ref, DIGEST_A, [cand(old, DIGEST_A)]).key.name == "old"
    assert policy.verify(ref, DIGEST_A, [cand(other, DIGEST_A), cand(new, DIGEST_A)]).key.name == "new"
    for candidates, fragment in (
        ([], "unsigned"),
        ([cand(other, DIGEST_A)], "not by any trusted key"),
        ([cand(new, DIGEST_B)], f"is for {DIGEST_B}"),
    ):
        with pytest.raises(SignatureError, match=fragment) as info:
            policy.verify(ref, DIGEST_A, candidates)
        message = str(info.value)
        assert DIGEST_A in message and "reg.io/models/digits" in message
        assert str(old.public_path) in message and str(new.public_path) in message
        assert info.value.keys_tried == (f"old ({old.public_path})", f"new ({new.public_path})")
    with pytest.raises(SignatureError, match="no trusted keys"):
        policy.verify(Reference.parse("other.io/m:1"), DIGEST_A, [cand(old, DIGEST_A)])


def test_bad_trust_key_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "junk.pub").write_text("not a key")
    with pytest.raises(KeyFileError, match="not a PEM public key"):
        TrustPolicy(TrustSettings.from_table({"keys": {"junk": str(tmp_path / "junk.pub")}}))


def test_build_image_without_judging(tmp_path: Path) -> None:
    # The low-level builder writes what it is given, so tests can make images a build refuses.
    model = make_scale_model(tmp_path / "m")
    built = build_image(tmp_path / "l", b'{"not":"a model"}', model / "model.wasm", model / "weights.safetensors", "x")
    assert (
        OciLayout(tmp_path / "l").read_blob(OciLayout(tmp_path / "l").manifest("x").config.digest)
        == b'{"not":"a model"}'
    )
    assert built.spec is None

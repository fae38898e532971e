"""Push, sign and pull against a real distribution registry: plain, basic auth, bearer token, TLS.

skopeo is the independent client: an image it copied into the registry pulls,
and what the agent pushed copies out with skopeo digest for digest.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from images_fixtures import (
    PASSWORD,
    SKOPEO,
    USER,
    FaultProxy,
    ImageEnv,
    KeyPair,
    Registry,
    TokenServer,
    make_cert,
    make_keypair,
    needs_registry,
    needs_skopeo,
    publish,
    registry,  # noqa: F401 - the fixture
    running_registry,
)
from modelkit import make_scale_model

from agent.events import EventBus
from agent.images.errors import AuthError, RegistryError, RegistryUnreachable
from agent.images.layout import build_from_dir
from agent.images.tags import TagStore

pytestmark = needs_registry


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, KeyPair]:
    root = tmp_path_factory.mktemp("keys")
    return {name: make_keypair(root, name) for name in ("release", "rogue")}


def plain_env(root: Path, reg: Registry, keys: dict[str, KeyPair], **extra: object) -> ImageEnv:
    return ImageEnv(
        root,
        hosts={reg.host: {"plain_http": True}},
        keys={"release": keys["release"].public_path},
        scopes={f"{reg.host}/models": ["release"]},
        **extra,  # type: ignore[arg-type]
    )


def test_push_sign_pull_records_the_version(tmp_path: Path, registry: Registry, keys: dict[str, KeyPair]) -> None:  # noqa: F811
    env = plain_env(tmp_path, registry, keys)
    model = make_scale_model(tmp_path / "m", name="basic", version="1")
    ref = f"{registry.host}/models/basic:1"
    digest = publish(tmp_path, env.registry_settings(), model, ref, keys["release"])

    events = EventBus()
    result = env.puller(events).pull(ref)
    rec = result.record
    assert (rec.model, rec.version, rec.manifest_digest) == ("basic", "1", digest)
    assert rec.source == f"registry:{registry.host}/models/basic@{digest}"
    assert result.signed_by is not None and "release" in result.signed_by
    blobs = env.repository.blobs
    assert blobs.read_bytes(rec.config_digest) == (model / "model.json").read_bytes()
    assert blobs.read_bytes(rec.module_digest) == (model / "model.wasm").read_bytes()
    assert blobs.read_bytes(rec.weights_digest) == (model / "weights.safetensors").read_bytes()
    assert blobs.has(digest)  # the manifest is kept too
    assert TagStore(env.repository.db).get(f"{registry.host}/models/basic:1").digest == digest
    (pulled,) = events.recent("image.pulled")
    assert pulled.fields["digest"] == digest and pulled.fields["model"] == "basic"
    # Pulling the same digest again fetches nothing.
    again = env.puller().pull(f"{registry.host}/models/basic@{digest}")
    assert again.fetched_bytes == 0 and all(b.cached for b in again.blobs[1:])
    # A pull never changes what is served.
    assert env.repository.db.get_model("basic").active_version is None


def test_a_layer_shared_by_two_versions_is_stored_once(
    tmp_path: Path,
    registry: Registry,  # noqa: F811
    keys: dict[str, KeyPair],
) -> None:
    env = plain_env(tmp_path, registry, keys)
    settings = env.registry_settings()
    for version in ("1", "2"):  # same module and weights, different model.json
        model = make_scale_model(tmp_path / f"m{version}", name="shared", version=version)
        publish(tmp_path, settings, model, f"{registry.host}/models/shared:{version}", keys["release"])
    first = env.puller().pull(f"{registry.host}/models/shared:1")
    second = env.puller().pull(f"{registry.host}/models/shared:2")
    assert second.record.module_digest == first.record.module_digest
    assert second.record.weights_digest == first.record.weights_digest
    assert [b.cached for b in second.blobs[1:]] == [True, True]
    assert second.fetched_bytes == second.blobs[0].size  # only the new model.json came over the wire
    digests = set(env.repository.blobs.digests())
    assert len(digests) == 3 + 3  # two configs, one module, one weights, two manifests


def test_plain_http_is_used_only_when_configured(
    tmp_path: Path,
    registry: Registry,  # noqa: F811
    keys: dict[str, KeyPair],
) -> None:
    publisher = plain_env(tmp_path / "pub", registry, keys)
    model = make_scale_model(tmp_path / "m", name="tlsonly", version="1")
    ref = f"{registry.host}/models/tlsonly:1"
    publish(tmp_path, publisher.registry_settings(), model, ref, keys["release"])
    strict = ImageEnv(
        tmp_path / "strict",
        keys={"release": keys["release"].public_path},
        scopes={f"{registry.host}/models": ["release"]},
    )
    with pytest.raises(RegistryError, match="plain_http") as info:
        strict.puller().pull(ref)
    assert not isinstance(info.value, RegistryUnreachable)  # said at once, not after retries
    assert strict.versions() == []


def test_basic_auth(tmp_path: Path, keys: dict[str, KeyPair]) -> None:
    with running_registry(tmp_path / "reg", htpasswd=True) as reg:
        (tmp_path / "password").write_text(PASSWORD + "\n")
        creds = {"plain_http": True, "username": USER, "password_file": str(tmp_path / "password")}
        env = ImageEnv(
            tmp_path / "env",
            hosts={reg.host: creds},
            keys={"release": keys["release"].public_path},
            scopes={reg.host: ["release"]},
        )
        model = make_scale_model(tmp_path / "m", name="basicauth", version="1")
        ref = f"{reg.host}/models/basicauth:1"
        digest = publish(tmp_path, env.registry_settings(), model, ref, keys["release"])
        assert env.puller().pull(ref).digest == digest

        anonymous = ImageEnv(
            tmp_path / "anon",
            hosts={reg.host: {"plain_http": True}},
            keys={"release": keys["release"].public_path},
            scopes={reg.host: ["release"]},
        )
        with pytest.raises(AuthError, match="requires a login"):
            anonymous.puller().pull(ref)
        wrong = ImageEnv(
            tmp_path / "wrong",
            hosts={reg.host: {"plain_http": True, "username": USER, "password": "nope"}},
            keys={"release": keys["release"].public_path},
            scopes={reg.host: ["release"]},
        )
        with pytest.raises(AuthError, match="401"):
            wrong.puller().pull(ref)
        assert anonymous.versions() == [] and wrong.versions() == []


def test_bearer_token_auth(tmp_path: Path, keys: dict[str, KeyPair]) -> None:
    token = TokenServer(service="edge-test-registry")
    token.start()
    try:
        with running_registry(tmp_path / "reg", token=token) as reg:
            hosts = {
                reg.host: {"plain_http": True, "username": USER, "password": PASSWORD},
                f"127.0.0.1:{token.port}": {"plain_http": True},
            }
            env = ImageEnv(
                tmp_path / "env",
                hosts=hosts,
                keys={"release": keys["release"].public_path},
                scopes={reg.host: ["release"]},
            )
            model = make_scale_model(tmp_path / "m", name="bearer", version="1")
            ref = f"{reg.host}/models/bearer:1"
            digest = publish(tmp_path, env.registry_settings(), model, ref, keys["release"])
            assert env.puller().pull(ref).digest == digest
            scopes = {r["scope"] for r in token.requests}
            assert "repository:models/bearer:pull" in scopes
            assert "repository:models/bearer:pull,push" in scopes
            assert all(r["service"] == "edge-test-registry" for r in token.requests)

            anonymous = ImageEnv(
                tmp_path / "anon",
                hosts={reg.host: {"plain_http": True}, f"127.0.0.1:{token.port}": {"plain_http": True}},
                keys={"release": keys["release"].public_path},
                scopes={reg.host: ["release"]},
            )
            with pytest.raises(AuthError, match="refused anonymous access"):
                anonymous.puller().pull(ref)
            assert anonymous.versions() == []
    finally:
        token.stop()


def test_tls_with_a_custom_ca(tmp_path: Path, keys: dict[str, KeyPair]) -> None:
    ca = make_cert("edge-test-ca", ca=True)
    server = make_cert("127.0.0.1", issuer=ca, ip="127.0.0.1")
    ca_path, _ = ca.write(tmp_path, "ca")
    with running_registry(tmp_path / "reg", tls=server) as reg:
        env = ImageEnv(
            tmp_path / "env",
            hosts={reg.host: {"ca_file": str(ca_path)}},
            keys={"release": keys["release"].public_path},
            scopes={reg.host: ["release"]},
        )
        model = make_scale_model(tmp_path / "m", name="tls", version="1")
        ref = f"{reg.host}/models/tls:1"
        digest = publish(tmp_path, env.registry_settings(), model, ref, keys["release"])
        assert env.puller().pull(ref).digest == digest

        untrusting = ImageEnv(
            tmp_path / "untrusting",
            keys={"release": keys["release"].public_path},
            scopes={reg.host: ["release"]},
        )
        with pytest.raises(RegistryError, match="not trusted"):
            untrusting.puller().pull(ref)
        assert untrusting.versions() == []


@needs_skopeo
def test_skopeo_interoperates(tmp_path: Path, registry: Registry, keys: dict[str, KeyPair]) -> None:  # noqa: F811
    env = plain_env(tmp_path, registry, keys)
    model = make_scale_model(tmp_path / "m", name="viaskopeo", version="1")
    built = build_from_dir(model, tmp_path / "layout")
    ref = f"{registry.host}/models/viaskopeo:1"
    # An image the agent built, copied into the registry by skopeo, signed and pulled by the agent.
    subprocess.run(
        [SKOPEO, "copy", "-q", "--dest-tls-verify=false", f"oci:{tmp_path / 'layout'}:1", f"docker://{ref}"],
        check=True,
        capture_output=True,
    )
    from agent.images.push import sign_image

    assert sign_image(ref, keys["release"].private_key, env.registry_settings())[0] == built.manifest.digest
    assert env.puller().pull(ref).digest == built.manifest.digest
    # skopeo copies the registry image out unchanged.
    subprocess.run(
        [SKOPEO, "copy", "-q", "--src-tls-verify=false", f"docker://{ref}", f"dir:{tmp_path / 'out'}"],
        check=True,
        capture_output=True,
    )
    manifest = (tmp_path / "out" / "manifest.json").read_bytes()
    from agent.cas import sha256_digest

    assert sha256_digest(manifest) == built.manifest.digest
    # skopeo sees our signature where cosign keeps it.
    tags = json.loads(
        subprocess.run(
            [SKOPEO, "list-tags", "--tls-verify=false", f"docker://{registry.host}/models/viaskopeo"],
            check=True,
            capture_output=True,
        ).stdout
    )["Tags"]
    assert f"{built.manifest.digest.replace(':', '-')}.sig" in tags


def test_offline_pull_resolves_a_tag_to_its_last_digest(
    tmp_path: Path,
    registry: Registry,  # noqa: F811
    keys: dict[str, KeyPair],
) -> None:
    proxy = FaultProxy(registry.port)
    try:
        env = ImageEnv(
            tmp_path / "env",
            hosts={proxy.host: {"plain_http": True}},
            keys={"release": keys["release"].public_path},
            scopes={f"{proxy.host}/models": ["release"]},
        )
        model = make_scale_model(tmp_path / "m", name="offline", version="1")
        digest = publish(tmp_path, env.registry_settings(), model, f"{proxy.host}/models/offline:1", keys["release"])
        env.puller().pull(f"{proxy.host}/models/offline:1")
    finally:
        proxy.close()  # the registry is gone for this agent now
    result = env.puller().pull(f"{proxy.host}/models/offline:1")
    assert result.offline and result.digest == digest
    assert "unreachable" in result.message and "last known digest" in result.message and digest in result.message
    with pytest.raises(RegistryUnreachable, match="never pulled here"):
        env.puller().pull(f"{proxy.host}/models/offline:2")
    # The CLI says the same, on stderr, and succeeds.
    cli = env.cli("pull", f"{proxy.host}/models/offline:1")
    assert cli.returncode == 0, cli.stderr
    assert "last known digest" in cli.stderr and "offline" in cli.stdout


@pytest.fixture
def cli_env(tmp_path: Path, registry: Registry) -> Iterator[ImageEnv]:  # noqa: F811
    yield ImageEnv(
        tmp_path / "env",
        hosts={registry.host: {"plain_http": True}},
        keys={"ops": tmp_path / "ops.pub"},
        scopes={f"{registry.host}/cli": ["ops"]},
    )


def test_cli_build_push_sign_verify_pull(tmp_path: Path, registry: Registry, cli_env: ImageEnv) -> None:  # noqa: F811
    password = {"COSIGN_PASSWORD": "correct horse"}
    run = subprocess.run(
        [sys.executable, "-m", "agent", "keygen", "--output-key-prefix", str(tmp_path / "ops")],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **password},
    )
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "ops.key").read_text().startswith("-----BEGIN ENCRYPTED SIGSTORE PRIVATE KEY")
    model = make_scale_model(tmp_path / "m", name="clitool", version="7")
    ref = f"{registry.host}/cli/clitool:7"

    def edge(*args: str) -> subprocess.CompletedProcess[str]:
        # `image build` is local and takes no --config, unlike the verbs that reach a registry.
        return subprocess.run([sys.executable, "-m", "agent", *args], capture_output=True, text=True, timeout=60)

    built = edge("image", "build", str(model), "-o", str(tmp_path / "layout"), "--tar", str(tmp_path / "img.tar"))
    assert built.returncode == 0, built.stderr
    assert "clitool:7 sha256:" in built.stdout
    pushed = cli_env.cli("image", "push", str(tmp_path / "img.tar"), ref)
    assert pushed.returncode == 0, pushed.stderr
    unsigned = cli_env.cli("pull", ref)
    assert unsigned.returncode == 65 and "unsigned" in unsigned.stderr
    wrong_password = cli_env.cli("image", "sign", ref, "--key", str(tmp_path / "ops.key"), env={"COSIGN_PASSWORD": "x"})
    assert wrong_password.returncode == 65 and "wrong password" in wrong_password.stderr
    signed = cli_env.cli("image", "sign", ref, "--key", str(tmp_path / "ops.key"), env=password)
    assert signed.returncode == 0, signed.stderr
    verified = cli_env.cli("image", "verify", ref)
    assert verified.returncode == 0 and "signature OK" in verified.stdout
    pulled = cli_env.cli("pull", ref, "--json", env={"EDGE_AGENT_LOG_LEVEL": "info"})
    assert pulled.returncode == 0, pulled.stderr
    doc = json.loads(pulled.stdout)
    assert (doc["model"], doc["version"], doc["offline"]) == ("clitool", "7", False)
    # Progress went to the log as structured events (stderr is not a terminal here).
    events = [json.loads(line) for line in pulled.stderr.splitlines() if line.startswith("{")]
    assert any(e.get("event") == "pull.progress" for e in events)
    listed = cli_env.cli("models")
    assert "clitool" in listed.stdout and "registry:" in listed.stdout
    bad_ref = cli_env.cli("pull", "no-registry-host:1")
    assert bad_ref.returncode == 2 and "registry host" in bad_ref.stderr

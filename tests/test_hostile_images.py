"""Hostile layouts read by the image tooling, deterministic registry errors, and the tools' usability.

Layout probes run in a child Python under RLIMIT_AS with a timeout, so a
regression that reads /dev/zero or blocks on a FIFO fails the test instead of
hanging it or exhausting the machine; the child reports the error it got and
its own peak RSS. Registry cases use a real docker-registry (plain HTTP,
htpasswd); the CLI cases run ``python -m agent`` as an operator would.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import resource
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest
from images_fixtures import (
    REPO,
    ImageEnv,
    KeyPair,
    Registry,
    make_keypair,
    needs_registry,
    registry,  # noqa: F401 - the fixture
    running_registry,
)
from modelkit import make_scale_model

from agent.images.errors import AuthError, NotInRegistry, RegistryError, RegistryUnreachable
from agent.images.layout import OciLayout, build_from_dir
from agent.images.push import push_layout, sign_image

PROBE = """
import json, sys
from pathlib import Path
from agent.config import Config
from agent.errors import AgentError
from agent.images.service import LocalStore, build_puller
config = Config.load(file=sys.argv[2], env={})
try:
    build_puller(config, LocalStore.open(config)).import_layout(Path(sys.argv[1]))
    out = {"ok": True}
except AgentError as exc:
    out = {"error": str(exc)}
except BaseException as exc:
    out = {"crash": f"{type(exc).__name__}: {exc}"}
# The peak resident size of this process's own memory (VmHWM). Not getrusage's ru_maxrss: Linux
# carries that over from the parent across fork and exec, so it would report the test runner's size.
out["maxrss_kib"] = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps(out))
"""
AS_LIMIT = 2 << 30
HOST_SECRET = b"a file of the host that the dropper cannot read\n"


def probe(path: Path) -> dict[str, object]:
    """Import the layout at ``path`` as the drop-in folder does, in a child bounded in memory and time."""
    env = ImageEnv(path.parent / f"node-{path.name}", require_signature=False)

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (AS_LIMIT, AS_LIMIT))

    run = subprocess.run(
        [sys.executable, "-c", PROBE, str(path), str(env.config_path)],
        capture_output=True,
        text=True,
        timeout=120,  # hang guard: a blocked open() never returns by itself
        cwd=REPO,
        preexec_fn=limit,
    )
    assert run.returncode == 0, run.stderr
    result: dict[str, object] = json.loads(run.stdout.strip().splitlines()[-1])
    return result


# -- hostile layouts ---------------------------------------------------------------------------------
def layout_dir(tmp: Path) -> tuple[Path, OciLayout]:
    path = tmp / "layout"
    build_from_dir(make_scale_model(tmp / "m", name="hostile", version="1"), path)
    return path, OciLayout(path)


def index_to_dev_zero(tmp: Path) -> Path:
    path, _ = layout_dir(tmp)
    (path / "index.json").unlink()
    (path / "index.json").symlink_to("/dev/zero")
    return path


def oci_layout_fifo(tmp: Path) -> Path:
    path, _ = layout_dir(tmp)
    (path / "oci-layout").unlink()
    os.mkfifo(path / "oci-layout")
    return path


def blobs_dir_symlink(tmp: Path) -> Path:
    path, _ = layout_dir(tmp)
    shutil.move(path / "blobs", tmp / "elsewhere")
    (path / "blobs").symlink_to(tmp / "elsewhere")
    return path


def manifest_to_host_file(tmp: Path) -> Path:
    path, layout = layout_dir(tmp)
    (tmp / "secret").write_bytes(HOST_SECRET)
    blob = layout.blob_path(layout.resolve().digest)
    blob.unlink()
    blob.symlink_to(tmp / "secret")
    return path


def weights_grown_past_declared(tmp: Path) -> Path:
    path, layout = layout_dir(tmp)
    blob = layout.blob_path(layout.manifest().weights.digest)
    with open(blob, "ab") as fh:
        fh.truncate(blob.stat().st_size + (1 << 30))  # a sparse gigabyte beyond what the manifest declares
    return path


def tar_fifo(tmp: Path) -> Path:
    os.mkfifo(tmp / "image.tar")
    return tmp / "image.tar"


def _tar_with_member(tmp: Path, name: str, size: int, pax: dict[str, str] | None = None) -> Path:
    """oci-layout plus a member ``name`` whose bytes are a hole in the tar file itself (a few KB on disk)."""
    path = tmp / "image.tar"
    with open(path, "wb") as fh:
        layout = b'{"imageLayoutVersion":"1.0.0"}'
        info = tarfile.TarInfo("oci-layout")
        info.size = len(layout)
        fh.write(info.tobuf(tarfile.PAX_FORMAT) + layout.ljust(512, b"\0"))
        info = tarfile.TarInfo(name)
        info.size = size
        info.pax_headers = pax or {}
        fh.write(info.tobuf(tarfile.PAX_FORMAT))
        fh.seek(-(-size // 512) * 512, io.SEEK_CUR)
        fh.write(b"\0" * 1024)
    return path


def tar_index_300mib(tmp: Path) -> Path:
    return _tar_with_member(tmp, "index.json", 300 << 20)


def tar_index_8mib_dense(tmp: Path) -> Path:
    """An index.json twice the limit, its bytes really on disk (a mostly-hole tar is refused before this)."""
    path = _tar_with_member(tmp, "index.json", 8 << 20)
    with open(path, "r+b") as fh:
        fh.seek(1536)
        fh.write(b" " * (8 << 20))
    return path


def _tar_with_gnu_longname(tmp: Path, claimed: int, dense: bool) -> Path:
    """A GNU long-name header (type L) claiming ``claimed`` bytes of name: tarfile reads them all at once."""
    path = tmp / "image.tar"
    info = tarfile.TarInfo("././@LongLink")
    info.type = tarfile.GNUTYPE_LONGNAME
    info.size = claimed
    with open(path, "wb") as fh:
        fh.write(info.tobuf(tarfile.GNU_FORMAT))
        if dense:
            fh.write(b"a" * claimed)
        else:
            fh.truncate(512 + claimed)  # a hole: 512 bytes on disk
    return path


def tar_gnu_longname_2gib_sparse(tmp: Path) -> Path:
    return _tar_with_gnu_longname(tmp, 2 << 30, dense=False)


def tar_gnu_longname_2mib(tmp: Path) -> Path:
    return _tar_with_gnu_longname(tmp, 2 << 20, dense=True)


def tar_too_many_members(tmp: Path) -> Path:
    path = tmp / "image.tar"
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for i in range(10_001):
            tar.addfile(tarfile.TarInfo(f"d{i}"), io.BytesIO())
    return path


def tar_sparse_index_1tib(tmp: Path) -> Path:
    path = tmp / "image.tar"
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        layout = b'{"imageLayoutVersion":"1.0.0"}'
        info = tarfile.TarInfo("oci-layout")
        info.size = len(layout)
        tar.addfile(info, io.BytesIO(layout))
        realsize = 1 << 40
        sparse_map = f"1\n{realsize - 1}\n1\n".encode().ljust(512, b"\0")
        info = tarfile.TarInfo("GNUSparseFile.0/index.json")
        info.size = len(sparse_map) + 1
        info.pax_headers = {
            "GNU.sparse.major": "1",
            "GNU.sparse.minor": "0",
            "GNU.sparse.name": "index.json",
            "GNU.sparse.realsize": str(realsize),
        }
        tar.addfile(info, io.BytesIO(sparse_map + b"x"))
    return path


def tar_gzip(tmp: Path) -> Path:
    import gzip

    path, _ = layout_dir(tmp)
    from agent.images.layout import write_tar

    write_tar(path, tmp / "plain.tar")
    (tmp / "image.tar").write_bytes(gzip.compress((tmp / "plain.tar").read_bytes()))
    return tmp / "image.tar"


HOSTILE: dict[str, tuple[Callable[[Path], Path], str]] = {
    "index.json -> /dev/zero": (index_to_dev_zero, "symbolic link"),
    "oci-layout is a FIFO": (oci_layout_fifo, "not a regular file"),
    "blobs/ -> elsewhere": (blobs_dir_symlink, "symbolic link"),
    "manifest -> host file": (manifest_to_host_file, "symbolic link"),
    "weights longer than declared": (weights_grown_past_declared, "declares"),
    "the tar is a FIFO": (tar_fifo, "not a regular file"),
    "tar: 300 MiB index.json, a hole": (tar_index_300mib, "sparse"),
    "tar: 8 MiB index.json": (tar_index_8mib_dense, "over the limit"),
    "tar: GNU long name claiming 2 GiB, a hole": (tar_gnu_longname_2gib_sparse, "sparse"),
    "tar: GNU long name claiming 2 MiB": (tar_gnu_longname_2mib, "tar header"),
    "tar: 10,001 members": (tar_too_many_members, "members"),
    "tar: 1 TiB sparse index.json": (tar_sparse_index_1tib, "sparse"),
    "tar: gzip-compressed": (tar_gzip, "compressed"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_layout_is_refused_reading_nothing_unbounded(tmp_path: Path, case: str) -> None:
    make, expected = HOSTILE[case]
    result = probe(make(tmp_path))
    assert "crash" not in result, result
    assert expected in str(result.get("error")), result
    assert hashlib.sha256(HOST_SECRET).hexdigest() not in str(result)  # a host file's digest never shows
    # Only headers and metadata were read: a few tens of MB for the interpreter and the agent's modules.
    assert int(result["maxrss_kib"]) < 200 * 1024, result  # type: ignore[call-overload]


def test_the_probe_measures_its_own_memory_not_the_test_runners(tmp_path: Path) -> None:
    # The suite's runner may be large when this runs (the converter tests load big models first).
    ballast = bytearray(400 << 20)
    for offset in range(0, len(ballast), 4096):
        ballast[offset] = 1  # resident, not just reserved
    path, _ = layout_dir(tmp_path)
    result = probe(path)
    del ballast
    assert result.get("ok") is True, result
    assert int(result["maxrss_kib"]) < 200 * 1024, result  # type: ignore[call-overload]


def test_an_honest_layout_still_reads_through_the_same_checks(tmp_path: Path) -> None:
    path, _ = layout_dir(tmp_path)
    assert probe(path).get("ok") is True
    from agent.images.layout import write_tar

    write_tar(path, tmp_path / "honest.tar")
    assert probe(tmp_path / "honest.tar").get("ok") is True


# -- deterministic registry errors fail at once ----------------------------------------------------------
@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, KeyPair]:
    root = tmp_path_factory.mktemp("keys")
    return {"release": make_keypair(root, "release")}


def slow_env(root: Path, hosts: dict[str, dict[str, object]] | None = None) -> ImageEnv:
    # Production-like retries: were a deterministic error retried, the recorded sleeps would show it.
    return ImageEnv(
        root,
        hosts=hosts,
        require_signature=False,
        registry={"attempts": 6, "backoff_initial_s": 0.5, "backoff_max_s": 30.0},
    )


@needs_registry
def test_tls_to_a_plain_http_registry_fails_at_once_naming_the_setting(
    tmp_path: Path,
    registry: Registry,  # noqa: F811
) -> None:
    path = tmp_path / "layout"
    build_from_dir(make_scale_model(tmp_path / "m", name="plainpush", version="1"), path)
    ref = f"{registry.host}/models/plainpush:1"
    strict = slow_env(tmp_path / "strict")
    sleeps: list[float] = []
    with pytest.raises(RegistryError) as info:
        push_layout(OciLayout(path), None, ref, strict.registry_settings(), sleep=sleeps.append)
    assert sleeps == [], f"retried {len(sleeps)} time(s)"
    assert not isinstance(info.value, RegistryUnreachable)
    message = str(info.value)
    # What to set, ready to paste, and the one-off flag.
    assert f'[registry.hosts."{registry.host}"]' in message and "plain_http = true" in message, message
    assert "--plain-http" in message, message

    puller = strict.puller()
    puller.sleep = sleeps.append
    with pytest.raises(RegistryError, match="plain_http = true") as info:
        puller.pull(ref)
    assert sleeps == [] and not isinstance(info.value, RegistryUnreachable)


@needs_registry
def test_missing_credentials_and_missing_manifests_fail_at_once(
    tmp_path: Path,
    registry: Registry,  # noqa: F811
    keys: dict[str, KeyPair],
) -> None:
    path = tmp_path / "layout"
    build_from_dir(make_scale_model(tmp_path / "m", name="fast", version="1"), path)
    sleeps: list[float] = []
    with running_registry(tmp_path / "authreg", htpasswd=True) as reg:
        anonymous = slow_env(tmp_path / "anon", hosts={reg.host: {"plain_http": True}})
        with pytest.raises(AuthError, match="requires a login"):
            push_layout(
                OciLayout(path), None, f"{reg.host}/models/fast:1", anonymous.registry_settings(), sleeps.append
            )
        assert sleeps == []
    env = slow_env(tmp_path / "plain", hosts={registry.host: {"plain_http": True}})
    missing = f"{registry.host}/models/never-pushed:1"
    puller = env.puller()
    puller.sleep = sleeps.append
    with pytest.raises(NotInRegistry):
        puller.pull(missing)
    with pytest.raises(NotInRegistry):
        sign_image(missing, keys["release"].private_key, env.registry_settings(), sleep=sleeps.append)
    assert sleeps == []


# -- the command line ----------------------------------------------------------------------------------
def edge(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``edge-agent`` with no terminal on stdin and no COSIGN_/EDGE_AGENT_ settings inherited."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("EDGE_AGENT_", "COSIGN_"))}
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "agent", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=full_env,
        cwd=REPO,
        stdin=subprocess.DEVNULL,
    )


@needs_registry
def test_plain_http_flag_on_the_image_verbs(
    tmp_path: Path,
    registry: Registry,  # noqa: F811
    keys: dict[str, KeyPair],
) -> None:
    # The config names no plain-HTTP host: the flag alone allows it, for the REF's registry only.
    env = ImageEnv(
        tmp_path / "env",
        keys={"release": keys["release"].public_path},
        scopes={f"{registry.host}/flag": ["release"]},
    )
    config = ["--config", str(env.config_path)]
    model = make_scale_model(tmp_path / "m", name="flagged", version="1")
    built = edge("image", "build", str(model), "-o", str(tmp_path / "layout"))
    assert built.returncode == 0, built.stderr
    ref = f"{registry.host}/flag/flagged:1"
    key = str(keys["release"].private_path)

    refused = edge("image", "push", str(tmp_path / "layout"), ref, *config)
    assert refused.returncode == 69, refused.stderr
    assert f'[registry.hosts."{registry.host}"]' in refused.stderr and "plain_http = true" in refused.stderr
    assert "--plain-http" in refused.stderr and "registry.retry" not in refused.stderr, refused.stderr

    for args in (
        ("image", "push", "--plain-http", str(tmp_path / "layout"), ref),
        ("image", "sign", "--plain-http", ref, "--key", key),
        ("image", "verify", "--plain-http", ref),
        ("pull", "--plain-http", ref),
    ):
        run = edge(*args, *config)
        assert run.returncode == 0, (args, run.stderr)
    assert env.versions() == [("flagged", "1")]
    again = edge("pull", ref, *config)
    assert again.returncode == 69 and "plain_http = true" in again.stderr, again.stderr


def test_keygen_without_a_terminal_or_password_refuses(tmp_path: Path) -> None:
    run = edge("keygen", "--output-key-prefix", str(tmp_path / "k"))
    assert run.returncode == 78, (run.returncode, run.stderr)  # EX_CONFIG
    assert "COSIGN_PASSWORD" in run.stderr and "--no-password" in run.stderr, run.stderr
    assert not (tmp_path / "k.key").exists() and not (tmp_path / "k.pub").exists()

    plain = edge("keygen", "--output-key-prefix", str(tmp_path / "plain"), "--no-password")
    assert plain.returncode == 0, plain.stderr
    assert (tmp_path / "plain.key").read_text().startswith("-----BEGIN PRIVATE KEY")
    encrypted = edge("keygen", "--output-key-prefix", str(tmp_path / "enc"), env={"COSIGN_PASSWORD": "pw"})
    assert encrypted.returncode == 0, encrypted.stderr
    assert (tmp_path / "enc.key").read_text().startswith("-----BEGIN ENCRYPTED SIGSTORE PRIVATE KEY")


def test_signing_with_an_encrypted_key_and_no_password_says_what_to_set(tmp_path: Path) -> None:
    made = edge("keygen", "--output-key-prefix", str(tmp_path / "enc"), env={"COSIGN_PASSWORD": "pw"})
    assert made.returncode == 0, made.stderr
    env = ImageEnv(tmp_path / "env")
    build_from_dir(make_scale_model(tmp_path / "m", name="signme", version="1"), tmp_path / "layout")
    sign = ("image", "sign", f"oci:{tmp_path / 'layout'}", "--key", str(tmp_path / "enc.key"))
    sign += ("--identity", "reg.example/models/signme", "--config", str(env.config_path))

    run = edge(*sign)
    assert run.returncode == 78, (run.returncode, run.stderr)
    assert "COSIGN_PASSWORD" in run.stderr and "wrong password" not in run.stderr, run.stderr
    wrong = edge(*sign, env={"COSIGN_PASSWORD": "not it"})
    assert wrong.returncode == 65 and "wrong password" in wrong.stderr, wrong.stderr
    right = edge(*sign, env={"COSIGN_PASSWORD": "pw"})
    assert right.returncode == 0, right.stderr

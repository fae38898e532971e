"""The container image, built and run: `make image` on a locally made Debian base, then the agent in it.

Base images cannot be pulled here, so the image is built on a debootstrap base (tests/containerkit.py)
passed as BASE, from the wheels `make image` downloads on the host (no network in the build). One
image per session; podman's storage and the base persist under containerkit.CACHE_ROOT, so a second
run reuses both (and the build's layer cache while the sources are unchanged).

The image size and build time are printed (run with -s to see them) and recorded as test
properties: measured, not asserted.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import containerkit as kit
import pytest
from conftest import http
from ports import free_port

ROOT = Path(__file__).resolve().parents[1]
IMAGE = "localhost/edge-agent:test"
UID = 10001
HANG_GUARD_S = 180.0  # generous: only stops a broken container from hanging the suite

pytestmark = [pytest.mark.container, pytest.mark.timeout(1800)]

if reason := kit.unavailable():
    pytest.skip(reason, allow_module_level=True)


def make(*targets: str, archive: Path | None = None) -> subprocess.CompletedProcess[str]:
    """`make TARGETS` with this kit's podman as the engine and the local base as BASE."""
    args = [
        "make",
        "--no-print-directory",
        *targets,
        f"CONTAINER_ENGINE={kit.engine_for_make()}",
        f"BASE={kit.shared_base()}",
        f"IMAGE={IMAGE}",
        "IMAGE_BUILD_FLAGS=" + " ".join(kit.BUILD_ARGS),
    ]
    if archive is not None:
        args.append(f"IMAGE_ARCHIVE={archive}")
    proc = subprocess.run(args, cwd=ROOT, env=kit.podman_env(), capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, f"make {' '.join(targets)} failed:\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}"
    return proc


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """`make image image-archive` once per module: the build's output, wall time and the archive."""
    archive = tmp_path_factory.mktemp("archive") / "edge-agent-image.tar"
    kit.shared_base()  # outside the timing: debootstrap is the base, not the build
    # One build at a time: make writes build/image-wheels, podman the shared storage.
    with kit.locked("image-build"):
        start = time.monotonic()
        proc = make("image", "image-archive", archive=archive)
        seconds = time.monotonic() - start
        kit.prune_previous_build("edge-agent-image", keep=kit.build_image_ids(proc.stdout))
    size = kit.image_size(IMAGE)
    print(f"\nimage {IMAGE}: {size / 1e6:.1f} MB uncompressed, make image image-archive {seconds:.0f} s")
    return {"output": proc.stdout, "seconds": seconds, "size": size, "archive": archive}


@pytest.fixture
def containers(built: dict[str, Any]) -> Iterator[Any]:
    """Starts the agent's container on a host state directory with free ports; removes them after."""
    names: list[str] = []

    def start(state: Path) -> dict[str, Any]:
        port, grpc_port = free_port(), free_port()
        name = f"edge-agent-test-{port}"
        names.append(name)
        kit.podman(
            "run",
            "--detach",
            "--name",
            name,
            *kit.RUN_ARGS,
            # As the DaemonSet runs it: readOnlyRootFilesystem (podman adds a tmpfs /tmp).
            "--read-only",
            "--volume",
            f"{state}:/var/lib/edge-agent",
            "--env",
            f"EDGE_AGENT_LISTEN=127.0.0.1:{port}",
            "--env",
            f"EDGE_AGENT_GRPC_LISTEN=127.0.0.1:{grpc_port}",
            IMAGE,
        )
        return {"name": name, "url": f"http://127.0.0.1:{port}", "state": state}

    try:
        yield start
    finally:
        for name in names:
            kit.remove_container(name)


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    state = tmp_path / "state"
    state.mkdir()
    # What the DaemonSet's init container does for its hostPath: hand the directory to the agent's user.
    os.chown(state, UID, UID)
    state.chmod(0o700)
    return state


def inspect(name: str, template: str) -> str:
    return kit.podman("inspect", "--format", template, name).stdout.strip()


def logs_of(name: str) -> str:
    logs = kit.podman("logs", name)
    return logs.stdout + logs.stderr


def wait_healthy(name: str) -> None:
    """Run the image's HEALTHCHECK until it passes (no systemd timers here to run it on its schedule)."""
    deadline = time.monotonic() + HANG_GUARD_S
    while True:
        if kit.podman("healthcheck", "run", name, check=False).returncode == 0:
            return
        if inspect(name, "{{.State.Running}}") != "true":
            logs = kit.podman("logs", name, check=False)
            raise AssertionError(f"the container exited:\n{logs.stdout}\n{logs.stderr}")
        assert time.monotonic() < deadline, "the HEALTHCHECK never passed"
        time.sleep(1)


def infer_digits(url: str) -> None:
    """The bundled reference model answers from the host, as its own warm-up golden says it must."""
    meta = json.loads((ROOT / "agent" / "bundled" / "digits" / "model.json").read_text())
    pixels = meta["warmup"]["inputs"]["pixels"]
    request = {"inputs": [{"name": "pixels", "datatype": "FP32", "shape": pixels["shape"], "data": pixels["data"]}]}
    status, body = http("POST", url + "/v2/models/digits/infer", request)
    assert status == 200, body
    label = next(o for o in body["outputs"] if o["name"] == "label")
    assert label["data"] == meta["warmup"]["outputs"]["label"]["data"]


def test_the_image_serves_as_an_unprivileged_user_and_stops_cleanly(
    built: dict[str, Any], containers: Any, state_dir: Path, record_property: Any
) -> None:
    record_property("image_size_bytes", built["size"])
    record_property("image_build_seconds", round(built["seconds"], 1))
    container = containers(state_dir)
    name = container["name"]
    config = json.loads(inspect(name, "{{json .Config}}"))
    assert config["Healthcheck"]["Test"][0] in ("CMD", "CMD-SHELL"), "the image carries its HEALTHCHECK"
    assert str(config["StopSignal"]) in ("SIGTERM", "15")

    wait_healthy(name)
    assert inspect(name, "{{.State.Health.Status}}") == "healthy"

    infer_digits(container["url"])

    # The agent is PID 1 of the container; from the host it runs as the image's user, not root.
    pid = int(inspect(name, "{{.State.Pid}}"))
    status_lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    uids = next(line for line in status_lines if line.startswith("Uid:")).split()[1:]
    assert uids == [str(UID)] * 4
    assert {p.stat().st_uid for p in container["state"].iterdir()} == {UID}, "the state is the agent's"

    kit.podman("stop", "--time", "60", name)  # SIGTERM (the image's STOPSIGNAL), then the drain
    assert inspect(name, "{{.State.ExitCode}}") == "0"
    assert "agent stopped" in logs_of(name)


def test_a_new_container_carries_on_with_the_state_directory(containers: Any, state_dir: Path) -> None:
    """An upgrade replaces the container and keeps the state directory: the next one starts from it."""
    first = containers(state_dir)
    wait_healthy(first["name"])
    kit.podman("stop", "--time", "60", first["name"])
    assert "seeded bundled model" in logs_of(first["name"]), "the first start fills the empty store"
    token = (state_dir / "api-token").read_bytes()

    second = containers(state_dir)
    wait_healthy(second["name"])
    infer_digits(second["url"])
    assert (state_dir / "api-token").read_bytes() == token, "the control API token survives"
    # The store the first container left is used as it is: nothing is seeded into it again.
    assert "seeded bundled model" not in logs_of(second["name"])


def test_the_image_archive_loads_into_a_fresh_store(built: dict[str, Any], tmp_path: Path) -> None:
    archive: Path = built["archive"]
    print(f"\n{archive.name}: {archive.stat().st_size / 1e6:.1f} MB")
    skopeo = subprocess.run(
        ["skopeo", "inspect", "--config", "--raw", f"docker-archive:{archive}"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert skopeo.returncode == 0, skopeo.stderr
    image_config = json.loads(skopeo.stdout)
    assert image_config["config"]["User"] == f"{UID}:{UID}"
    assert image_config["config"]["Healthcheck"]["Test"]
    # A store of its own: the archive must carry everything, and its name, by itself.
    # (podman refuses a runroot path longer than 50 characters: tmp_path is too long for it.)
    runroot = Path(tempfile.mkdtemp(prefix="edge-agent-load-", dir="/run"))
    try:
        store = ["podman", "--root", str(tmp_path / "root"), "--runroot", str(runroot), "--storage-driver", "vfs"]
        loaded = subprocess.run(
            [*store, "load", "--input", str(archive)], env=kit.podman_env(), capture_output=True, text=True, timeout=600
        )
        assert loaded.returncode == 0, loaded.stderr
        assert IMAGE in loaded.stdout
        ids = subprocess.run(
            [*store, "image", "inspect", "--format", "{{.Id}}", IMAGE],
            env=kit.podman_env(),
            capture_output=True,
            text=True,
        )
        assert ids.returncode == 0, ids.stderr
        assert ids.stdout.strip() == kit.podman("image", "inspect", "--format", "{{.Id}}", IMAGE).stdout.strip()
    finally:
        shutil.rmtree(runroot, ignore_errors=True)
        shutil.rmtree(tmp_path / "root", ignore_errors=True)  # vfs: a full copy of the image

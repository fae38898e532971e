"""Podman for the tests: the flags that work on these machines, and locally made base images.

Base images cannot be pulled here (no container registry is reachable), so `local_base` makes one
from Debian packages: `debootstrap --variant=minbase` from the apt mirror this machine already uses,
then `podman import`. Bases are cached under CACHE_ROOT (the podman storage lives there too), keyed
by everything that goes into them, so a second run, or a second test session, reuses them.

Podman runs rootful with its own storage (`--root`/`--runroot`), never the machine's default one:
- `--storage-driver vfs`: overlay is not available on these machines' file systems;
- `--runtime runc`: crun fails on this cgroup set-up;
- `--cgroup-manager cgroupfs`: there is no systemd managing the machine's cgroups;
- `--events-backend file`: no journald to log podman's events to;
- `CONTAINERS_CONF` naming a file with `[containers]` `default_ulimits = []`: podman's default
  nofile ulimit is above what this kernel lets runc set;
- `--network host` for `run` and `build` (RUN_ARGS, BUILD_ARGS): no netavark/CNI networking here.

Usage:

    reason = unavailable()
    if reason: pytest.skip(reason)
    base = local_base(python=True)                   # "localhost/edge-agent-test-base:<key>"
    podman("build", *BUILD_ARGS, "--build-arg", f"BASE={base}", "-t", "x", ".")
    podman("run", "-d", *RUN_ARGS, "x")
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import shlex
import shutil
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

# Survives between test sessions (/var/tmp is not cleared at boot); override for a CI cache.
CACHE_ROOT = Path(os.environ.get("EDGE_AGENT_TEST_CACHE", "/var/tmp/edge-agent-test-cache"))
PODMAN_ROOT = CACHE_ROOT / "podman" / "storage"
# Podman's run state must not outlive a reboot (it keys its "was the machine restarted" check on
# it), so it goes on /run, a tmpfs; one per storage root (podman records it with the storage and
# refuses another), and short (podman allows 50 characters).
_DEFAULT_CACHE_ROOT = Path("/var/tmp/edge-agent-test-cache")
PODMAN_RUNROOT = Path(
    "/run/edge-agent-test-podman"
    if CACHE_ROOT == _DEFAULT_CACHE_ROOT
    else "/run/edge-agent-test-podman-" + hashlib.sha256(str(CACHE_ROOT).encode()).hexdigest()[:8]
)
CONTAINERS_CONF = CACHE_ROOT / "podman" / "containers.conf"

SUITE = "bookworm"
# Part of every base's cache key: bump it when local_base's recipe changes.
RECIPE_VERSION = "1"

RUN_ARGS: tuple[str, ...] = ("--network", "host")
BUILD_ARGS: tuple[str, ...] = ("--network", "host")

_CONTAINERS_CONF_TEXT = """\
# Written by tests/containerkit.py.
[containers]
default_ulimits = []

[engine]
cgroup_manager = "cgroupfs"
events_logger = "file"
runtime = "runc"
"""


def unavailable() -> str | None:
    """Why containers cannot be used here (a pytest skip reason), or None when they can."""
    for tool in ("podman", "runc", "debootstrap"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (Makefile APT_PACKAGES: podman buildah runc debootstrap)"
    if os.geteuid() != 0:
        return "container tests run rootful podman and debootstrap: they need root"
    return None


def podman_command(*args: str) -> list[str]:
    """The podman command line for `args`, with this kit's storage and runtime flags."""
    return [
        "podman",
        "--root",
        str(PODMAN_ROOT),
        "--runroot",
        str(PODMAN_RUNROOT),
        "--storage-driver",
        "vfs",
        "--runtime",
        "runc",
        "--cgroup-manager",
        "cgroupfs",
        "--events-backend",
        "file",
        *args,
    ]


def podman_env() -> dict[str, str]:
    """The environment podman runs with: this process's, plus CONTAINERS_CONF."""
    CONTAINERS_CONF.parent.mkdir(parents=True, exist_ok=True)
    if not CONTAINERS_CONF.exists() or CONTAINERS_CONF.read_text() != _CONTAINERS_CONF_TEXT:
        CONTAINERS_CONF.write_text(_CONTAINERS_CONF_TEXT)
    return {**os.environ, "CONTAINERS_CONF": str(CONTAINERS_CONF)}


def podman(
    *args: str,
    check: bool = True,
    timeout: float = 600,
    input: bytes | None = None,
    capture: bool = True,
) -> subprocess.CompletedProcess[str]:
    """Run podman with this kit's flags; output is captured as text.

    check=True raises AssertionError carrying podman's stderr, which says more in a test report
    than CalledProcessError's exit status does.
    """
    proc = subprocess.run(
        podman_command(*args),
        env=podman_env(),
        input=input.decode() if input is not None else None,
        capture_output=capture,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


def image_exists(name: str) -> bool:
    """Whether the image `name` is in this kit's storage."""
    return podman("image", "exists", name, check=False).returncode == 0


def image_size(name: str) -> int:
    """The image's uncompressed size in bytes, as `podman image inspect` reports it."""
    return int(podman("image", "inspect", "--format", "{{.Size}}", name).stdout.strip())


def debian_mirror() -> str:
    """The Debian mirror this machine's apt uses (the first `URIs:` of debian.sources)."""
    deb822 = Path("/etc/apt/sources.list.d/debian.sources")
    if deb822.exists():
        for line in deb822.read_text().splitlines():
            if line.startswith("URIs:"):
                uri = line.split(":", 1)[1].split()[0]
                if "debian-security" not in uri:
                    return uri
    legacy = Path("/etc/apt/sources.list")
    if legacy.exists():
        for line in legacy.read_text().splitlines():
            parts = line.split()
            if len(parts) >= 3 and parts[0] == "deb" and "security" not in parts[1]:
                return parts[1]
    return "http://deb.debian.org/debian"


@contextmanager
def locked(name: str) -> Iterator[None]:
    """An exclusive lock across processes (two test sessions must not debootstrap one base twice)."""
    CACHE_ROOT.mkdir(parents=True, exist_ok=True)
    with open(CACHE_ROOT / f"{name}.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def base_packages(*, python: bool = True, systemd: bool = False, packages: Sequence[str] = ()) -> list[str]:
    """The Debian packages local_base adds to minbase (sorted, so the cache key is stable)."""
    wanted = set(packages)
    if python:
        wanted.add("python3")
    if systemd:
        wanted.update(("systemd", "systemd-sysv", "dbus"))
    return sorted(wanted)


def local_base(*, python: bool = True, systemd: bool = False, packages: Sequence[str] = ()) -> str:
    """A Debian bookworm minbase image made here, with python3 and/or systemd; returns its name.

    python: add Debian's python3 (3.11; /usr/bin/python3, without pip or ensurepip — add
        "python3-venv" to `packages` for `python3 -m venv` with pip);
    systemd: add systemd, systemd-sysv and dbus, so `podman run --systemd=always IMAGE
        /lib/systemd/systemd` boots systemd as PID 1;
    packages: more Debian packages.

    The name is "localhost/edge-agent-test-base:<key>", the key a hash of suite, mirror, package
    list and RECIPE_VERSION: an image already in storage under that name is reused, anything else
    is built (debootstrap, about a minute, then `podman import`). apt's downloaded .debs and package
    lists are removed from the rootfs, as official base images do; nothing else is trimmed.
    """
    wanted = base_packages(python=python, systemd=systemd, packages=packages)
    mirror = debian_mirror()
    key = hashlib.sha256("\n".join([RECIPE_VERSION, SUITE, mirror, *wanted]).encode()).hexdigest()[:16]
    name = f"localhost/edge-agent-test-base:{key}"
    with locked("local-base"):
        if image_exists(name):
            return name
        work = Path(tempfile.mkdtemp(prefix="debootstrap-", dir=CACHE_ROOT))
        try:
            rootfs = work / "rootfs"
            cmd = ["debootstrap", "--variant=minbase"]
            if wanted:
                cmd.append("--include=" + ",".join(wanted))
            cmd += [SUITE, str(rootfs), mirror]
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
            if proc.returncode != 0:
                raise AssertionError(f"debootstrap failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr}")
            for leftover in ("var/cache/apt/archives", "var/lib/apt/lists"):
                for item in (rootfs / leftover).glob("*"):
                    if item.is_file():
                        item.unlink()
            tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
            assert tar.stdout is not None
            imported = subprocess.run(
                podman_command(
                    "import",
                    "--change",
                    "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                    "--change",
                    'CMD ["/bin/bash"]',
                    "-",
                    name,
                ),
                stdin=tar.stdout,
                env=podman_env(),
                capture_output=True,
                text=True,
                timeout=600,
            )
            tar.stdout.close()
            tar.wait()
            if imported.returncode != 0 or tar.returncode != 0:
                raise AssertionError(f"podman import failed: {imported.stderr}")
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return name


def remove_container(name: str) -> None:
    """Remove a container, running or not, ignoring one that does not exist."""
    podman("rm", "--force", "--time", "0", name, check=False)


def engine_for_make() -> str:
    """This kit's podman command as one string, for the Makefile's CONTAINER_ENGINE."""
    return shlex.join(podman_command())


def build_image_ids(build_output: str) -> list[str]:
    """The image IDs a `podman build` printed (`--> ID`, `--> Using cache ID`), in build order."""
    ids = re.findall(r"^--> (?:Using cache )?([0-9a-f]{11,64})\s*$", build_output, re.M)
    return list(dict.fromkeys(ids))


def prune_previous_build(record: str, *, keep: list[str]) -> None:
    """Remove the images the build recorded under `record` made, except those in `keep`.

    With the vfs driver every layer is a full copy of the file system, so each build of changed
    sources would leave gigabytes behind. `keep` (this build's images, build_image_ids) is recorded
    in its place, so only the latest build's images, its layer cache, stay. Images other builds made
    (other tests share this storage) are never touched; `podman image prune` would remove those,
    and this build's cache too, as a final image FROM scratch does not descend from it. An image
    that another one still builds on is refused by `podman rmi` and stays.
    """
    path = CACHE_ROOT / f"{record}.image-ids"
    earlier = path.read_text().split() if path.exists() else []
    for image_id in reversed(earlier):  # children before their parents
        if not any(image_id.startswith(k) or k.startswith(image_id) for k in keep):
            podman("rmi", image_id, check=False)
    path.write_text("\n".join(keep) + "\n")


def shared_base() -> str:
    """The one base every container test builds on: python3, systemd (the bundle runs under it as PID 1) and
    venv. The image build uses it too (its final stage starts from scratch, so the base's extra packages do not
    reach the image): one debootstrap per cache instead of two on a fresh CI machine."""
    return local_base(python=True, systemd=True, packages=("python3-venv",))

#!/usr/bin/env python3
"""Build the offline install bundle for bare edge nodes (``make bundle``).

Writes ``dist/edge-agent-bundle-<version>-<python tag>-<arch>.tar.gz`` holding:

- ``wheels/``: the project's wheel and a wheel of every runtime dependency for the
  target Python and architecture (``pip download --only-binary=:all:`` with explicit
  platform tags, so the bundle can be built on any machine for any target); runtime
  dependencies only, the ``[project.dependencies]`` of pyproject.toml, plus the extras
  asked for (``--extra llm``);
- ``systemd/``: the unit, the sysusers and tmpfiles snippets;
- ``config.toml.sample``: every setting with its default, commented out;
- ``install.sh`` / ``uninstall.sh`` (packaging/), a README and ``SHA256SUMS``.

Nothing in the bundle is fetched at install time: ``install.sh`` runs pip with
``--no-index --find-links wheels/``.

``--wheel-cache DIR`` keeps the downloaded dependency wheels under DIR, keyed by the
dependency list and the target tags, so a rebuild (the tests build a bundle on every
run) does not go to the index again. The project's own wheel is always rebuilt.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# The oldest glibc a manylinux wheel may name (manylinux2014 = manylinux_2_17).
OLDEST_GLIBC_MINOR = 17
# Extras whose packages publish no wheel for Linux on PyPI: built here with `pip wheel`,
# which can only target the Python and architecture running this script.
SOURCE_ONLY = {"llama-cpp-python"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--python-version", default="3.11", help="target Python, MAJOR.MINOR (default 3.11)")
    parser.add_argument(
        "--platform",
        default=f"manylinux_2_36_{platform.machine()}",
        help="target platform as manylinux_2_<glibc minor>_<arch>: wheels for that glibc or older are taken "
        "(default manylinux_2_36_<this machine's arch>, Debian 12's glibc)",
    )
    parser.add_argument("--extra", action="append", default=[], help="an optional extra to include (e.g. llm)")
    parser.add_argument("--out", type=Path, default=REPO / "dist", help="output directory (default dist/)")
    parser.add_argument("--wheel-cache", type=Path, help="reuse dependency wheels kept here (keyed by their inputs)")
    parser.add_argument("--pip", default=f"{sys.executable} -m pip", help="the pip command used to build and fetch")
    args = parser.parse_args(argv)

    match = re.fullmatch(r"manylinux_2_(\d+)_(\w+)", args.platform)
    if not match:
        parser.error(f"--platform must look like manylinux_2_36_x86_64, got {args.platform!r}")
    glibc_minor, arch = int(match.group(1)), match.group(2)
    if not re.fullmatch(r"3\.\d+", args.python_version):
        parser.error(f"--python-version must be 3.N, got {args.python_version!r}")
    py_tag = "cp" + args.python_version.replace(".", "")
    pip = args.pip.split()

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    version = project["version"]
    requirements = list(project["dependencies"])
    optional = project.get("optional-dependencies", {})
    for extra in args.extra:
        if extra not in optional:
            parser.error(f"unknown extra {extra!r} (pyproject.toml has: {', '.join(sorted(optional))})")
        if extra in ("dev", "bench", "convert"):
            parser.error(f"{extra!r} is a build or test extra, not a runtime one; the bundle carries runtime only")
        requirements += optional[extra]

    name = f"edge-agent-bundle-{version}-{py_tag}-{arch}"
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="edge-agent-bundle-") as tmp:
        root = Path(tmp) / name
        wheels = root / "wheels"
        wheels.mkdir(parents=True)
        print(f"make-bundle: {name}: building the edge-agent {version} wheel", flush=True)
        # Built from a copy: setuptools writes build/ and *.egg-info into the tree it builds, and
        # two builds at once (two test sessions) must not share them.
        source = Path(tmp) / "source"
        source.mkdir()
        for top in ("pyproject.toml", "README.md"):
            shutil.copy2(REPO / top, source / top)
        shutil.copytree(REPO / "agent", source / "agent", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        _run([*pip, "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(source)])
        own = sorted(wheels.glob("edge_agent-*.whl"))
        if len(own) != 1:
            raise SystemExit(f"make-bundle: expected one edge_agent wheel, found {[p.name for p in own]}")

        tags = _platform_tags(glibc_minor, arch)
        key = hashlib.sha256(
            "\n".join([*sorted(requirements), py_tag, *tags, _pip_config_fingerprint()]).encode()
        ).hexdigest()[:16]
        cached = args.wheel_cache / f"deps-{py_tag}-{arch}-{key}" if args.wheel_cache else None
        if cached is not None and (cached / ".complete").exists():
            print(f"make-bundle: dependency wheels from the cache {cached}", flush=True)
            for whl in cached.glob("*.whl"):
                shutil.copy2(whl, wheels / whl.name)
        else:
            deps = Path(tmp) / "deps"
            deps.mkdir()
            _fetch(pip, requirements, deps, py_tag, args.python_version, tags, arch)
            if cached is not None:
                staging = cached.with_name(cached.name + f".tmp{os.getpid()}")
                shutil.rmtree(staging, ignore_errors=True)
                shutil.copytree(deps, staging)
                (staging / ".complete").write_text(" ".join(sorted(requirements)) + "\n")
                shutil.rmtree(cached, ignore_errors=True)
                staging.rename(cached)  # atomic: a concurrent build sees all of it or none
            for whl in deps.glob("*.whl"):
                shutil.copy2(whl, wheels / whl.name)
        _check_wheels(wheels, py_tag, arch)

        count = sum(1 for _ in wheels.glob("*.whl"))
        _assemble(root, version, py_tag, arch, args.extra)
        target = args.out / f"{name}.tar.gz"
        partial = target.with_name(target.name + ".part")
        with tarfile.open(partial, "w:gz") as tar:
            tar.add(root, arcname=name, filter=_normalise)
        partial.replace(target)
    print(f"make-bundle: wrote {target} ({target.stat().st_size / 1e6:.1f} MB, {count} wheels)")
    return 0


def _platform_tags(glibc_minor: int, arch: str) -> list[str]:
    """Every manylinux tag a glibc-2.<minor> system accepts: pip does not expand them for --platform."""
    if glibc_minor < OLDEST_GLIBC_MINOR:
        raise SystemExit(f"make-bundle: glibc 2.{glibc_minor} is older than manylinux2014 (2.17)")
    tags = [f"manylinux_2_{minor}_{arch}" for minor in range(glibc_minor, OLDEST_GLIBC_MINOR - 1, -1)]
    tags.append(f"manylinux2014_{arch}")
    if arch in ("x86_64", "i686"):
        tags += [f"manylinux2010_{arch}", f"manylinux1_{arch}"]
    return tags


def _fetch(
    pip: list[str], requirements: list[str], dest: Path, py_tag: str, python_version: str, tags: list[str], arch: str
) -> None:
    source_only = [r for r in requirements if _req_name(r) in SOURCE_ONLY]
    if source_only:
        # No wheel on the index: build one, which only works for this interpreter and machine.
        here = f"cp{sys.version_info.major}{sys.version_info.minor}"
        if (here, platform.machine()) != (py_tag, arch):
            raise SystemExit(
                f"make-bundle: {', '.join(source_only)} publish(es) no wheel; build the bundle on a {arch} "
                f"machine with Python {python_version} to include it"
            )
        print(f"make-bundle: building wheels for {', '.join(source_only)} (from source, may take minutes)", flush=True)
        _run([*pip, "wheel", "-q", "--no-deps", "-w", str(dest), *source_only])
        tags = [*tags, f"linux_{arch}"]  # what a local build is tagged with
    print(f"make-bundle: downloading {len(requirements)} requirement(s) and their dependencies", flush=True)
    platform_args = [arg for tag in tags for arg in ("--platform", tag)]
    _run(
        [
            *pip,
            "download",
            "-q",
            "--dest",
            str(dest),
            "--find-links",
            str(dest),
            "--only-binary=:all:",
            *platform_args,
            "--python-version",
            python_version,
            "--implementation",
            "cp",
            "--abi",
            py_tag,
            "--abi",
            "abi3",
            "--abi",
            "none",
            *requirements,
        ]
    )


def _check_wheels(wheels: Path, py_tag: str, arch: str) -> None:
    """Every binary wheel is for the target: a stray host wheel would only fail on the node."""
    for whl in wheels.glob("*.whl"):
        parts = whl.name[:-4].split("-")
        python, plat = parts[-3], parts[-1]
        if plat == "any":
            continue
        if not any(p.endswith(arch) for p in plat.split(".")):
            raise SystemExit(f"make-bundle: {whl.name} is not for {arch}")
        if not any(t in (py_tag, "cp3", "py3") or t.startswith("cp3") for t in python.split(".")):
            raise SystemExit(f"make-bundle: {whl.name} is not for {py_tag}")


def _assemble(root: Path, version: str, py_tag: str, arch: str, extras: list[str]) -> None:
    packaging = REPO / "packaging"
    systemd = root / "systemd"
    systemd.mkdir()
    for name in ("edge-agent.service", "edge-agent.sysusers", "edge-agent.tmpfiles"):
        shutil.copy2(REPO / "systemd" / name, systemd / name)
    shutil.copy2(REPO / "systemd" / "config.toml.sample", root / "config.toml.sample")
    for script in ("install.sh", "uninstall.sh"):
        shutil.copy2(packaging / script, root / script)
        (root / script).chmod(0o755)
    shutil.copy2(packaging / "BUNDLE-README.md", root / "README.md")
    # What install.sh reads about the bundle it came in (plain KEY=VALUE, sourced by bash).
    (root / "bundle.env").write_text(
        f"BUNDLE_VERSION={version}\nBUNDLE_PYTHON_TAG={py_tag}\nBUNDLE_ARCH={arch}\nBUNDLE_EXTRAS={','.join(extras)}\n"
    )
    sums = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        sums.append(f"{hashlib.sha256(path.read_bytes()).hexdigest()}  {path.relative_to(root)}")
    (root / "SHA256SUMS").write_text("\n".join(sums) + "\n")


def _normalise(info: tarfile.TarInfo) -> tarfile.TarInfo:
    # Root-owned in the archive, whoever built it: extracted as root the files are root's.
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    return info


def _req_name(requirement: str) -> str:
    return re.split(r"[\s<>=!~;\[]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def _pip_config_fingerprint() -> str:
    # Another index (or none) can resolve other versions: part of the cache key.
    return " ".join(f"{k}={v}" for k, v in sorted(os.environ.items()) if k.startswith("PIP_INDEX"))


def _run(cmd: list[str]) -> None:
    result = subprocess.run(cmd, check=False)
    if result.returncode != 0:
        raise SystemExit(f"make-bundle: failed ({result.returncode}): {' '.join(cmd)}")


if __name__ == "__main__":
    sys.exit(main())

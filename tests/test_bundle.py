"""The offline bundle for bare nodes (`make bundle`, scripts/make-bundle.py, packaging/).

- The sample config: every setting it shows is one the agent knows, at the default the agent
  itself uses (parsed by the agent's own loaders) and the one docs/CONFIG.md documents.
- Always: build the bundle (dependency wheels cached under EDGE_AGENT_TEST_CACHE, keyed by the
  dependency list), install it with pip's index disabled into a fresh directory (install.sh
  --destdir), run the installed `edge-agent run`, infer, stop it; install again (an upgrade keeps
  the config); uninstall removes what install made, --purge the rest.
- Marked `container` (skipped without podman): the same bundle installed into a Debian
  container running systemd as PID 1 (Debian's own /usr/bin/python3, 3.11): the unit started,
  Type=notify readiness, inference from the host, the watchdog restarting a SIGSTOPped agent,
  `journalctl -p err` showing an error the agent logged, an upgrade keeping state, uninstall.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import http
from ports import free_port

from agent.config import Config, GpuSettings
from agent.images.settings import CacheSettings, RegistrySettings, TrustSettings
from agent.inbox import InboxSettings
from agent.k8s.settings import KubeSettings
from agent.lifecycle_settings import LifecycleSettings
from agent.mqtt.settings import MqttSettings
from agent.telemetry.settings import TelemetrySettings

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "systemd" / "config.toml.sample"
CACHE_ROOT = Path(os.environ.get("EDGE_AGENT_TEST_CACHE", "/var/tmp/edge-agent-test-cache"))
HANG_S = 120.0  # waits are for conditions; this only guards against a hang on a loaded machine
# The digits model's own warm-up input (agent/bundled/digits/model.json), whose label is 2.
DIGIT_TWO = [0, 0, 7, 16, 14, 3, 0, 0, 0, 0, 9, 14, 11, 15, 0, 0, 0, 0, 1, 5, 0, 15, 5, 0, 0, 0, 0, 0, 0, 16, 5, 0]
DIGIT_TWO += [0, 0, 0, 0, 3, 16, 4, 0, 0, 0, 0, 1, 12, 14, 1, 0, 0, 0, 5, 12, 16, 16, 14, 1, 0, 0, 8, 16, 14, 10, 13, 3]
# pip must not reach any index: install.sh passes --no-index, and should anything still try,
# it finds this address, where nothing listens.
OFFLINE_PIP = {"PIP_NO_INDEX": "1", "PIP_INDEX_URL": "http://127.0.0.1:9/", "PIP_EXTRA_INDEX_URL": ""}


# --- The sample config ----------------------------------------------------------------------
SETTING_LINE = re.compile(r"^#(\[[^\]]+\]|[A-Za-z_][\w]* = .*)$")
# Core settings whose default depends on the host (no fixed value to show): named in prose.
HOST_DEFAULTS = {"node_id"}
# The environment the unit gives the agent: the defaults of state_dir and compile_cache_dir.
UNIT_ENV = {"STATE_DIRECTORY": "/var/lib/edge-agent", "CACHE_DIRECTORY": "/var/cache/edge-agent"}


def sample_uncommented() -> str:
    """The sample with every setting line ("#key = value", "#[section]") switched on."""
    out = []
    for line in SAMPLE.read_text().splitlines():
        out.append(line[1:] if SETTING_LINE.match(line) else line)
    return "\n".join(out) + "\n"


@pytest.fixture
def unit_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """The unit's environment (the defaults of state_dir and compile_cache_dir); an empty config file."""
    for name, value in UNIT_ENV.items():
        monkeypatch.setenv(name, value)
    empty = tmp_path / "empty.toml"
    empty.write_text("")
    return empty


def test_the_sample_config_runs_on_defaults_as_it_is(tmp_path: Path, unit_env: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text(SAMPLE.read_text())
    assert tomllib.loads(SAMPLE.read_text()) == {}, "every setting in the sample is commented out"
    assert Config.load(path, env={}) == Config.load(unit_env, env={})


def test_every_setting_in_the_sample_is_known_and_at_its_default(tmp_path: Path, unit_env: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text(sample_uncommented())
    table = tomllib.loads(path.read_text())
    # The agent's own loader: an unknown core key fails here (ConfigError), and so does an
    # unknown key of a section below (section_values refuses it).
    config = Config.load(path, env={})
    default = Config.load(unit_env, env={})
    core = {f.name for f in dataclasses.fields(Config)} - {"sections"}
    shown = {key for key, value in table.items() if not isinstance(value, dict)}
    assert shown <= core
    assert shown == core - HOST_DEFAULTS, (
        f"core settings missing from the sample: {sorted(core - HOST_DEFAULTS - shown)}"
    )
    for name in HOST_DEFAULTS:
        assert f"{name}" in SAMPLE.read_text(), f"the sample says what {name} defaults to"
    for key in shown:
        assert getattr(config, key) == getattr(default, key), f"{key}: the sample shows {table[key]!r}"

    # Each section, parsed by its subsystem's own settings class, equals that class's defaults.
    parsers: dict[str, Any] = {
        "lifecycle": LifecycleSettings.from_mapping,
        "inbox": lambda raw: InboxSettings.from_config(Config(sections={"inbox": raw})),
        "gpu": GpuSettings.from_mapping,
        "registry": RegistrySettings.from_table,
        "trust": TrustSettings.from_table,
        "cache": CacheSettings.from_table,
        "mqtt": MqttSettings.from_mapping,
        "telemetry": TelemetrySettings.from_mapping,
        "k8s": lambda raw: KubeSettings.from_table(raw, default_node="edge-1"),
    }
    sections = {key for key, value in table.items() if isinstance(value, dict)}
    assert sections == set(parsers), "the sample shows every section that has defaults, and only those"
    for name, parse in parsers.items():
        raw = config.section(name)
        assert raw, f"[{name}] is empty in the sample"
        assert parse(raw) == parse({}), f"[{name}] in the sample differs from the defaults"
        # And every key of the settings class is shown (its nested tables aside).
        settings_fields = {f.name for f in dataclasses.fields(type(parse({})))}
        nested = {"hosts", "keys", "scopes"}
        aliases = {"max_bytes": "max_size"}  # [cache] documents max_size
        expected = {aliases.get(n, n) for n in settings_fields - nested}
        assert set(raw) == expected, f"[{name}]: missing {sorted(expected - set(raw))}"


def documented_core_defaults() -> dict[str, str]:
    """`key` -> `default` from the core table of docs/CONFIG.md, where the default is a literal."""
    found = {}
    text = (REPO / "docs" / "CONFIG.md").read_text()
    core = text.split("## Core settings", 1)[1].split("\n## ", 1)[0]
    for line in core.splitlines():
        match = re.match(r"^\| `(\w+)` \| `([^`]*)` \|", line)
        if match:
            found[match.group(1)] = match.group(2)
    return found


def test_the_sample_shows_the_defaults_docs_config_md_documents() -> None:
    table = tomllib.loads(sample_uncommented())
    documented = documented_core_defaults()
    assert len(documented) > 20, "the core table of docs/CONFIG.md was not found"
    for key, text in documented.items():
        assert key in table, f"{key} is documented but not in the sample"
        value = table[key]
        shown = str(value).lower() if isinstance(value, bool) else str(value)
        assert shown == text or (isinstance(value, float) and float(text) == value), (
            f"{key}: docs/CONFIG.md says {text}, the sample {value!r}"
        )


# --- Building the bundle ----------------------------------------------------------------------
def node_python() -> Path:
    """The interpreter install.sh makes the venv with: Debian's /usr/bin/python3, as on a node."""
    for candidate in (Path("/usr/bin/python3"), Path(sys.base_prefix) / "bin" / "python3"):
        if candidate.exists():
            probe = subprocess.run(
                [str(candidate), "-c", "import ensurepip, venv, sys; print(sys.version_info[0], sys.version_info[1])"],
                capture_output=True,
                text=True,
            )
            if probe.returncode == 0:
                return candidate
    pytest.skip("no python3 with the venv and ensurepip modules to install the bundle with")


def python_version(python: Path) -> str:
    out = subprocess.run([str(python), "-c", "import sys; print(*sys.version_info[:2], sep='.')"], capture_output=True)
    return out.stdout.decode().strip()


def build_bundle(out: Path, version: str) -> Path:
    """`make bundle` as the Makefile runs it, into `out`, the dependency wheels cached."""
    cmd = [
        sys.executable,
        str(REPO / "scripts" / "make-bundle.py"),
        "--python-version",
        version,
        "--platform",
        f"manylinux_2_36_{platform.machine()}",
        "--out",
        str(out),
        "--wheel-cache",
        str(CACHE_ROOT / "bundle-wheels"),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, f"make-bundle failed:\n{proc.stdout}\n{proc.stderr[-6000:]}"
    tarballs = list(out.glob("edge-agent-bundle-*.tar.gz"))
    assert len(tarballs) == 1, tarballs
    return tarballs[0]


_bundles: dict[str, Path] = {}


@pytest.fixture(scope="module")
def bundle_factory(tmp_path_factory: pytest.TempPathFactory) -> Any:
    def make(version: str) -> Path:
        if version not in _bundles:
            _bundles[version] = build_bundle(tmp_path_factory.mktemp(f"bundle-{version}"), version)
        return _bundles[version]

    yield make
    _bundles.clear()


def unpack(tarball: Path, dest: Path) -> Path:
    with tarfile.open(tarball) as tar:
        tar.extractall(dest, filter="data")
    (root,) = dest.iterdir()
    return root


def run_script(script: Path, *args: str, env: dict[str, str] | None = None, timeout: float = 600) -> Any:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("EDGE_AGENT_", "PIP_"))}
    full_env.update(env or {})
    return subprocess.run(["bash", str(script), *args], capture_output=True, text=True, env=full_env, timeout=timeout)


@pytest.mark.timeout(600)  # builds the bundle when the first to need it: a hang guard
def test_the_bundle_holds_runtime_wheels_for_its_target_and_the_files_to_install(bundle_factory: Any) -> None:
    version = python_version(node_python())
    tarball = bundle_factory(version)
    tag = "cp" + version.replace(".", "")
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert tarball.name == f"edge-agent-bundle-{project['version']}-{tag}-{platform.machine()}.tar.gz"
    with tarfile.open(tarball) as tar:
        names = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    for wanted in (
        "install.sh",
        "uninstall.sh",
        "config.toml.sample",
        "README.md",
        "SHA256SUMS",
        "bundle.env",
        "systemd/edge-agent.service",
        "systemd/edge-agent.sysusers",
        "systemd/edge-agent.tmpfiles",
    ):
        assert wanted in names, f"{wanted} missing from the bundle"
    wheels = sorted(n.removeprefix("wheels/") for n in names if n.startswith("wheels/") and n.endswith(".whl"))
    assert any(w.startswith(f"edge_agent-{project['version']}-") for w in wheels)
    dists = {re.sub(r"[-_.]+", "-", w.split("-")[0]).lower() for w in wheels}
    for requirement in project["dependencies"]:
        name = re.split(r"[\s<>=!~;\[]", requirement, maxsplit=1)[0].lower().replace("_", "-")
        assert name in dists, f"runtime dependency {name} has no wheel in the bundle"
    # Runtime only: nothing of the dev, bench or convert extras that the runtime does not need.
    for build_only in ("pytest", "torch", "onnx", "onnxruntime", "skl2onnx", "mypy", "ruff", "llama-cpp-python"):
        assert build_only not in dists, f"{build_only} is not a runtime dependency"
    for wheel in wheels:
        python_tags, plat = wheel[:-4].split("-")[-3], wheel[:-4].split("-")[-1]
        assert plat == "any" or platform.machine() in plat, wheel
        assert plat == "any" or any(t == tag or t.startswith(("cp3", "py3")) for t in python_tags.split(".")), wheel


@pytest.mark.timeout(600)  # builds the bundle when the first to need it: a hang guard
def test_the_bundle_installs_offline_serves_upgrades_and_uninstalls(bundle_factory: Any, tmp_path: Path) -> None:
    python = node_python()
    bundle = unpack(bundle_factory(python_version(python)), tmp_path / "unpacked")
    dest = tmp_path / "node"
    env = {**OFFLINE_PIP, "PYTHON": str(python)}

    assert run_script(bundle / "install.sh", "--help").returncode == 0
    assert run_script(bundle / "install.sh", "--frobnicate").returncode == 64

    first = run_script(bundle / "install.sh", "--destdir", str(dest), env=env)
    assert first.returncode == 0, first.stdout + first.stderr
    prefix = dest / "opt" / "edge-agent"
    unit = dest / "etc" / "systemd" / "system" / "edge-agent.service"
    config = dest / "etc" / "edge-agent" / "config.toml"
    snippets = [dest / "usr/lib/sysusers.d/edge-agent.conf", dest / "usr/lib/tmpfiles.d/edge-agent.conf"]
    for path in (prefix / "bin" / "edge-agent", prefix / "uninstall.sh", unit, config, *snippets):
        assert path.exists(), f"{path} not installed"
    assert config.read_text() == SAMPLE.read_text()
    assert "ExecStart=/opt/edge-agent/bin/edge-agent run" in unit.read_text()
    # The installed agent is the venv's own copy, not this checkout.
    where = subprocess.run([str(prefix / "bin" / "python"), "-c", "import agent; print(agent.__file__)"], cwd=tmp_path,
                           capture_output=True, text=True)  # fmt: skip
    assert where.stdout.strip().startswith(str(prefix)), where

    serve_and_infer(prefix / "bin" / "edge-agent", config, tmp_path)

    # Again over the installed tree: an upgrade. The operator's config stays as it is.
    config.write_text(config.read_text() + '\nlisten = "127.0.0.1:18080"  # this node\'s\n')
    edited = config.read_text()
    again = run_script(bundle / "install.sh", "--destdir", str(dest), env=env)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "kept the existing" in again.stdout
    assert config.read_text() == edited

    # Uninstall: the agent, the unit and the snippets go; the config stays without --purge.
    uninstall = run_script(prefix / "uninstall.sh", "--destdir", str(dest))
    assert uninstall.returncode == 0, uninstall.stdout + uninstall.stderr
    assert not prefix.exists() and not unit.exists()
    assert not any(s.exists() for s in snippets)
    assert config.read_text() == edited
    nothing = run_script(bundle / "uninstall.sh", "--destdir", str(dest))
    assert nothing.returncode == 0 and "nothing to do" in nothing.stdout, nothing.stdout + nothing.stderr
    purge = run_script(bundle / "uninstall.sh", "--destdir", str(dest), "--purge")
    assert purge.returncode == 0 and not config.parent.exists(), purge.stdout + purge.stderr

    # A prefix install.sh did not make is never removed.
    foreign = dest / "opt" / "edge-agent"
    foreign.mkdir(parents=True)
    (foreign / "precious").write_text("not ours")
    refused = run_script(bundle / "uninstall.sh", "--destdir", str(dest))
    assert refused.returncode == 73 and (foreign / "precious").exists(), refused.stdout + refused.stderr
    assert run_script(bundle / "install.sh", "--destdir", str(dest), env=env).returncode == 73


def serve_and_infer(exe: Path, config: Path, tmp_path: Path) -> None:
    port = free_port()
    log_path = tmp_path / "agent.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_AGENT_")}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [str(exe), "run", "--config", str(config), "--state-dir", str(tmp_path / "state"),
             "--listen", f"127.0.0.1:{port}", "--grpc-listen", "off", "--log-format", "json"],
            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp_path,
        )  # fmt: skip
        try:
            url = f"http://127.0.0.1:{port}"
            wait_for(lambda: proc.poll() is not None or ready(url), "the installed agent to be ready", log_path)
            assert proc.poll() is None, log_path.read_text()
            assert infer_label(url) == 2
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(HANG_S) == 0, log_path.read_text()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)


def ready(url: str) -> bool:
    try:
        return http("GET", url + "/v2/health/ready", timeout=2)[0] == 200
    except OSError:
        return False


def infer_label(url: str) -> int:
    body = {"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 64], "data": DIGIT_TWO}]}
    status, reply = http("POST", url + "/v2/models/digits/infer", body)
    assert status == 200, reply
    (label,) = [o for o in reply["outputs"] if o["name"] == "label"]
    return int(label["data"][0])


def wait_for(condition: Any, what: str, log: Path | None = None, timeout: float = HANG_S) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}" + (f":\n{log.read_text()}" if log else ""))
        time.sleep(0.1)


# --- The bundle under a real systemd -----------------------------------------------------------
@pytest.fixture(scope="module")
def systemd_container(bundle_factory: Any) -> Iterator[Any]:
    from containerkit import RUN_ARGS, podman, remove_container, shared_base, unavailable

    reason = unavailable()
    if reason:
        pytest.skip(reason)
    if platform.machine() != "x86_64":
        pytest.skip("the container test's Debian base and bundle are for x86_64")
    # The container's python3 is Debian bookworm's 3.11: the bundle's wheels must be cp311.
    tarball = bundle_factory("3.11")
    base = shared_base()
    name = f"edge-agent-bundle-test-{os.getpid()}"
    remove_container(name)
    podman("run", "-d", "--name", name, *RUN_ARGS, "--systemd=always",
           "-v", f"{tarball.parent}:/bundle:ro", base, "/lib/systemd/systemd")  # fmt: skip
    box = Container(name, podman, tarball.name)
    try:
        # "degraded" is fine: a minimal image has units that fail without a real machine under them.
        box.wait(lambda: box.sh("systemctl is-system-running", check=False).stdout.strip() in ("running", "degraded"),
                 "systemd to boot in the container")  # fmt: skip
        yield box
    finally:
        if os.environ.get("EDGE_AGENT_KEEP_CONTAINER") != "1":
            remove_container(name)


class Container:
    def __init__(self, name: str, podman: Any, tarball: str):
        self.name = name
        self.podman = podman
        self.tarball = tarball

    def sh(self, script: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        proc = self.podman("exec", self.name, "bash", "-c", script, check=False, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(
                f"in the container, `{script}` exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
            )
        return proc

    def show(self, *props: str) -> dict[str, str]:
        out = self.sh(f"systemctl show edge-agent -p {','.join(props)}").stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def wait(self, condition: Any, what: str, timeout: float = HANG_S) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                journal = self.sh("journalctl -u edge-agent --no-pager -n 80", check=False).stdout
                raise AssertionError(f"timed out waiting for {what}; journal:\n{journal}")
            time.sleep(0.2)


@pytest.mark.container
# A cold cache debootstraps the base image (minutes); a hang guard, not a speed check.
@pytest.mark.timeout(1200)
def test_the_bundle_under_systemd_in_a_container(systemd_container: Container) -> None:
    box = systemd_container
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    offline = " ".join(f"{k}={v}" for k, v in OFFLINE_PIP.items())
    unpack_cmd = f"mkdir -p /root/b && tar -xzf /bundle/{box.tarball} -C /root/b && cd /root/b/edge-agent-bundle-*/"

    install = box.sh(f"{unpack_cmd} && {offline} ./install.sh --no-start")
    assert "not started (--no-start)" in install.stdout, install.stdout
    assert box.sh("id -u edge-agent && stat -c '%U %a' /var/lib/edge-agent").stdout.split()[1:] == ["edge-agent", "700"]
    # The site's settings: its port (the container shares the host's network), and a shorter
    # watchdog in a drop-in, so a frozen agent is caught within seconds, not the unit's 30 s.
    box.sh(
        f"""printf 'listen = "127.0.0.1:{port}"\\ngrpc_listen = "off"\\n' >> /etc/edge-agent/config.toml
        mkdir -p /etc/systemd/system/edge-agent.service.d
        printf '[Service]\\nWatchdogSec=10s\\n' > /etc/systemd/system/edge-agent.service.d/test-watchdog.conf
        systemctl daemon-reload"""
    )

    # Type=notify: the unit is "activating" until the agent says READY=1, which it does once its
    # models are warm; from then on it is active/running and the node answers ready at once.
    # The first look in the same command as the start: no exec round trip in between.
    first = box.sh("systemctl start --no-block edge-agent && systemctl show edge-agent -p ActiveState,SubState")
    seen = dict(line.split("=", 1) for line in first.stdout.split())
    states = [(seen["ActiveState"], seen["SubState"])]
    while states[-1] != ("active", "running"):
        if states[-1][0] not in ("activating", "inactive"):
            raise AssertionError(f"{states}\n{box.sh('journalctl -u edge-agent -n 50', check=False).stdout}")
        assert len(states) < HANG_S / 0.1, states
        time.sleep(0.1)
        state = box.show("ActiveState", "SubState")
        states.append((state["ActiveState"], state["SubState"]))
    assert ("activating", "start") in states, f"never seen waiting for READY=1: {states}"
    assert ready(url), "active/running before the agent was ready"
    status = box.show("StatusText", "MainPID", "NRestarts", "User")
    assert status["StatusText"].startswith("serving 1 model(s): digits"), status
    assert status["User"] == "edge-agent"
    assert infer_label(url) == 2

    # journald priorities: a drop-in the agent refuses is logged at error level, and only the
    # errors show with -p err (an info line of the same run does not).
    box.sh(
        "printf 'not an image' > /var/lib/edge-agent/junk.tar && chown edge-agent: /var/lib/edge-agent/junk.tar"
        " && mv /var/lib/edge-agent/junk.tar /var/lib/edge-agent/inbox/junk.tar"
    )
    box.wait(lambda: "drop-in image refused" in box.sh("journalctl -u edge-agent -p err --no-pager -o cat").stdout,
             "the refused drop-in in journalctl -p err")  # fmt: skip
    errors_only = box.sh("journalctl -u edge-agent -p err --no-pager -o cat").stdout
    assert "systemd watchdog pings started" not in errors_only
    assert "systemd watchdog pings started" in box.sh("journalctl -u edge-agent --no-pager -o cat").stdout

    # The watchdog: a frozen agent (SIGSTOP: its event loop no longer pings) is killed and
    # restarted by systemd, and the new one is ready again.
    frozen = status["MainPID"]
    box.sh(f"kill -STOP {frozen}")
    box.wait(lambda: int(box.show("NRestarts")["NRestarts"]) > int(status["NRestarts"]), "the watchdog's restart", 240)
    box.wait(lambda: box.show("ActiveState", "SubState") == {"ActiveState": "active", "SubState": "running"},
             "the restarted agent")  # fmt: skip
    assert box.show("MainPID")["MainPID"] != frozen
    assert "watchdog timeout" in box.sh("journalctl -u edge-agent --no-pager -o cat").stdout.lower()
    assert infer_label(url) == 2

    # Upgrade: installing again restarts the running agent and keeps the config and the state.
    token = box.sh("cat /var/lib/edge-agent/api-token").stdout
    upgrade = box.sh(f"cd /root/b/edge-agent-bundle-*/ && {offline} ./install.sh")
    assert "kept the existing /etc/edge-agent/config.toml" in upgrade.stdout, upgrade.stdout
    assert "restarting the running agent" in upgrade.stdout, upgrade.stdout
    assert box.sh("cat /var/lib/edge-agent/api-token").stdout == token
    assert ready(url) and infer_label(url) == 2

    # Uninstall: the service stops, the unit and /opt/edge-agent go; config, state and user stay.
    gone = box.sh("/opt/edge-agent/uninstall.sh")
    assert "removed /etc/systemd/system/edge-agent.service" in gone.stdout, gone.stdout
    assert box.sh("test -e /opt/edge-agent || test -e /etc/systemd/system/edge-agent.service", check=False).returncode
    assert box.sh("systemctl cat edge-agent", check=False).returncode != 0
    assert not ready(url)
    assert box.sh("test -f /etc/edge-agent/config.toml && test -d /var/lib/edge-agent && id edge-agent").returncode == 0
    purge = box.sh("cd /root/b/edge-agent-bundle-*/ && ./uninstall.sh --purge")
    assert box.sh("test -e /etc/edge-agent || test -e /var/lib/edge-agent || id edge-agent", check=False).returncode
    assert "removed the user edge-agent" in purge.stdout, purge.stdout


@pytest.mark.timeout(600)  # builds the bundle when the first to need it: a hang guard
def test_generated_sums_cover_every_file(bundle_factory: Any, tmp_path: Path) -> None:
    bundle = unpack(bundle_factory(python_version(node_python())), tmp_path)
    listed = {line.split("  ", 1)[1] for line in (bundle / "SHA256SUMS").read_text().splitlines()}
    present = {str(p.relative_to(bundle)) for p in bundle.rglob("*") if p.is_file()} - {"SHA256SUMS"}
    assert listed == present
    # A damaged bundle is refused before anything is installed.
    wheel = next((bundle / "wheels").glob("edge_agent-*.whl"))
    wheel.write_bytes(wheel.read_bytes() + b"x")
    damaged = run_script(bundle / "install.sh", "--destdir", str(tmp_path / "node"), env=OFFLINE_PIP)
    assert damaged.returncode == 65, damaged.stdout + damaged.stderr
    assert not (tmp_path / "node" / "opt").exists()


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed (Debian package shellcheck)")
def test_the_scripts_pass_shellcheck() -> None:
    scripts = [REPO / "packaging" / "install.sh", REPO / "packaging" / "uninstall.sh"]
    proc = subprocess.run(["shellcheck", *map(str, scripts)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout

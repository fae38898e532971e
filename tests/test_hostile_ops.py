"""Operations hardening: private state files, one error line, journal priorities, a scrape-able /metrics.

Everything here runs the real thing: `edge-agent` subprocesses (with the umask a shell
gives them, and with JOURNAL_STREAM as systemd sets it), in-process agents serving real
HTTP, real drop-in folder imports; /metrics is parsed with prometheus-client's own parser.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from conftest import REPO, ROLLBACK_GRACE_S, http

DIGITS = REPO / "agent" / "bundled" / "digits"
GUARD_S = 60.0  # hang guard only: every wait below ends as soon as its condition holds


def wait_for(predicate: Callable[[], Any], timeout: float = GUARD_S, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@contextlib.contextmanager
def shell_umask() -> Iterator[None]:
    """The umask an interactive shell or a container entrypoint usually has (022), whatever pytest runs under."""
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def loose_entries(root: Path) -> list[str]:
    """Everything under ``root`` (``root`` included) that group or others may read, write or search."""
    found = []
    for path in [root, *root.rglob("*")]:
        st = path.lstat()
        if stat.S_ISLNK(st.st_mode):
            continue
        if st.st_mode & 0o077:
            found.append(f"{path.relative_to(root.parent)} {oct(stat.S_IMODE(st.st_mode))}")
    return found


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def cli_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EDGE_AGENT_", "JOURNAL_STREAM", "COSIGN_"))}
    env.update(extra or {})
    return env


def unsigned_layout(tmp_path: Path) -> Path:
    from agent.images.layout import build_from_dir

    layout = tmp_path / "unsigned-layout"
    build_from_dir(DIGITS, layout)
    return layout


# -- 1. state files are private, with or without systemd's UMask=0077 -----------------------------------
def test_cli_agent_creates_a_private_state_dir_under_a_shell_umask(agent_process: Any, tmp_path: Path) -> None:
    state = tmp_path / "state"
    with shell_umask():
        agent = agent_process(state)
    agent.wait_ready(GUARD_S)
    # The databases are open (WAL and shm exist), the bundled model is in the blob store.
    assert (state / "agent.db-wal").exists() and any((state / "blobs" / "sha256").iterdir())
    assert loose_entries(state) == [], loose_entries(state)
    assert mode(state) == 0o700 and mode(state / "agent.db") == 0o600
    assert agent.terminate() == 0, agent.log()
    assert loose_entries(state) == []


def test_in_process_agent_store_files_are_private(make_agent: Any) -> None:
    from agent.mqtt.commandlog import CommandLog
    from agent.mqtt.outbox import Outbox

    with shell_umask():
        running = make_agent()
        agent = running.agent
        state = agent.config.state_dir
        # A resumable partial download, a quarantined blob, the MQTT channel's two databases.
        digest = "sha256:" + "ab" * 32
        writer = agent.blobs.writer(expected=digest)
        writer.write(b"partial")
        writer.abort(keep_partial=True)
        extra = agent.blobs.put_bytes(b"to be quarantined")
        agent.blobs.quarantine(extra)
        Outbox(state / "mqtt-outbox.db", max_bytes=1 << 20, max_age_s=60).close()
        CommandLog(state / "mqtt-commands.db").close()
    owned = [
        state,
        state / "agent.db",
        state / "agent.db-wal",
        state / "agent.db-shm",
        state / "blobs",
        state / "blobs" / "sha256",
        state / "tmp",
        agent.blobs.partial_path(digest),
        state / "quarantine",
        state / "mqtt-outbox.db",
        state / "mqtt-commands.db",
        *(state / "blobs" / "sha256").iterdir(),
    ]
    loose = [f"{p.relative_to(state.parent)} {oct(mode(p))}" for p in owned if mode(p) & 0o077]
    assert loose == []


def test_loose_state_dir_is_tightened_at_start_and_logged(agent_process: Any, tmp_path: Path) -> None:
    from agent.state import StateDB

    state = tmp_path / "state"
    state.mkdir(mode=0o755)
    state.chmod(0o755)
    StateDB(state / "agent.db").close()
    (state / "agent.db").chmod(0o644)
    (state / "notes").mkdir()
    (state / "notes" / "left-by-hand.txt").write_text("x")
    (state / "notes").chmod(0o755)
    (state / "notes" / "left-by-hand.txt").chmod(0o644)
    agent = agent_process(state)
    agent.wait_ready(GUARD_S)
    assert mode(state) == 0o700
    assert loose_entries(state) == [], loose_entries(state)
    lines = [json.loads(line) for line in agent.log().splitlines() if line.startswith("{")]
    tightened = [line for line in lines if line["event"] == "state directory permissions tightened"]
    assert len(tightened) == 1 and tightened[0]["was"] == "0o755" and tightened[0]["level"] == "warning", lines
    assert agent.terminate() == 0, agent.log()


# -- 2. a failing CLI verb reports its error once ------------------------------------------------------
def test_cli_error_is_printed_once_when_stderr_is_a_pipe(tmp_path: Path) -> None:
    layout = unsigned_layout(tmp_path)
    proc = subprocess.run(
        [sys.executable, "-m", "agent", "pull", "--state-dir", str(tmp_path / "state"), str(layout)],
        capture_output=True,
        text=True,
        timeout=GUARD_S,
        env=cli_env(),
        cwd=REPO,
    )
    assert proc.returncode != 0
    assert proc.stderr.count("it is unsigned") == 1, proc.stderr


# -- 3. under journald, each line carries its syslog priority ------------------------------------------
LEVELS_SCRIPT = """
import structlog
from agent import logs
logs.configure("debug", "auto")
log = structlog.get_logger("t")
log.debug("a-debug")
log.info("an-info")
log.warning("a-warning")
log.error("an-error", detail="x\\ny")
"""


def run_with_stderr_file(
    argv: list[str], stderr_path: Path, journal: str | None, timeout: float = GUARD_S
) -> subprocess.CompletedProcess[str]:
    """Run with stderr on a file; ``journal="match"`` sets JOURNAL_STREAM to its dev:inode, as systemd does."""
    with open(stderr_path, "wb") as err:
        st = os.fstat(err.fileno())
        env = cli_env()
        if journal == "match":
            env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
        elif journal == "other":
            env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino + 1}"  # a journal stream, but not this stderr
        return subprocess.run(argv, stderr=err, stdout=subprocess.PIPE, text=True, timeout=timeout, env=env, cwd=REPO)


def test_journal_stream_lines_carry_sd_daemon_priorities(tmp_path: Path) -> None:
    err = tmp_path / "stderr"
    proc = run_with_stderr_file([sys.executable, "-c", LEVELS_SCRIPT], err, journal="match")
    assert proc.returncode == 0, err.read_text()
    lines = err.read_text().splitlines()
    assert [line[:3] for line in lines] == ["<7>", "<6>", "<4>", "<3>"], lines
    events = [json.loads(line[3:]) for line in lines]  # still one JSON document per line after the prefix
    assert [e["event"] for e in events] == ["a-debug", "an-info", "a-warning", "an-error"]
    assert events[3]["detail"] == "x\ny"


def test_journal_priority_only_when_stderr_is_the_journal(tmp_path: Path) -> None:
    err = tmp_path / "stderr"
    proc = run_with_stderr_file([sys.executable, "-c", LEVELS_SCRIPT], err, journal="other")
    assert proc.returncode == 0, err.read_text()
    lines = err.read_text().splitlines()
    assert len(lines) == 4 and all(line.startswith("{") for line in lines), lines


def test_cli_error_line_has_err_priority_under_the_journal(tmp_path: Path) -> None:
    layout = unsigned_layout(tmp_path)
    err = tmp_path / "stderr"
    argv = [sys.executable, "-m", "agent", "pull", "--state-dir", str(tmp_path / "state"), str(layout)]
    proc = run_with_stderr_file(argv, err, journal="match")
    assert proc.returncode != 0
    lines = [line for line in err.read_text().splitlines() if "it is unsigned" in line]
    assert len(lines) == 1 and lines[0].startswith("<3>"), err.read_text()


def test_fatal_start_error_is_one_err_line_under_the_journal(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    err = tmp_path / "stderr"
    argv = [sys.executable, "-m", "agent", "run", "--state-dir", str(blocker / "state"), "--listen", "127.0.0.1:0"]
    proc = run_with_stderr_file(argv, err, journal="match")
    assert proc.returncode != 0
    lines = [line for line in err.read_text().splitlines() if "is not usable" in line]
    assert len(lines) == 1 and lines[0].startswith("<3>"), err.read_text()


# -- 4. /metrics: process collector, no *_created, pulls, drop-in folder, build info -------------------
def test_metrics_scrape_parses_and_counts_pulls_and_drops(make_agent: Any, tmp_path: Path) -> None:
    from prometheus_client import CollectorRegistry, Counter, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from agent import __version__
    from agent.runtime.engine import wasmtime_version
    from tests.images_fixtures import make_keypair, signed_layout
    from tests.test_inbox import IDENTITY, make_model_dir, refused

    keys = tmp_path / "keys"
    keys.mkdir()
    release = make_keypair(keys, "release")

    def setup(agent: Any) -> None:
        from agent.wiring import attach_services

        agent.config.sections["trust"] = {
            "keys": {"release": str(release.public_path)},
            "scopes": {"registry.example.com/models": ["release"]},
        }
        agent.config.sections["inbox"] = {"settle_s": 0.2, "rescan_s": 5.0}
        agent.config.sections["lifecycle"] = {"rollback_grace_s": ROLLBACK_GRACE_S}  # as make_agent's own
        attach_services(agent)

    running = make_agent(setup=setup)
    other = make_agent(setup=None, state_dir=tmp_path / "other-state")  # a second agent in the same process
    inbox = running.agent.config.state_dir / "inbox"
    work = tmp_path / "work"
    work.mkdir()
    good, _ = signed_layout(work, make_model_dir(work, "2", 0.5), release, IDENTITY, tar=True)
    bad, _ = signed_layout(work, make_model_dir(work, "3", 0.7), None, IDENTITY, tar=True)
    os.rename(good, inbox / "a-good.tar")
    os.rename(bad, inbox / "b-unsigned.tar")

    def scrape(url: str) -> tuple[bytes, dict[str, Any]]:
        status, body = http("GET", url + "/metrics")
        assert status == 200
        return body, {f.name: f for f in text_string_to_metric_families(body.decode())}

    def drops(families: dict[str, Any]) -> dict[str, float]:
        return {s.labels["result"]: s.value for s in families["edge_agent_inbox_drops"].samples}

    wait_for(lambda: drops(scrape(running.url)[1]) == {"deployed": 1, "refused": 1}, what="both drops counted")
    assert refused(inbox, "b-unsigned.tar")
    body, families = scrape(running.url)

    def value(name: str, **labels: str) -> float:
        for family in families.values():
            for sample in family.samples:
                if sample.name == name and sample.labels == labels:
                    return sample.value
        raise AssertionError(f"no sample {name}{labels} in {sorted(families)}")

    # The process collector, registered on the agent's own registry.
    assert families["process_cpu_seconds"].type == "counter"
    assert value("process_cpu_seconds_total") > 0
    assert value("process_resident_memory_bytes") > 1_000_000
    assert "process_open_fds" in families and "process_start_time_seconds" in families
    assert "edge_agent_cpu_seconds" not in families  # the CPU-time gauge it replaces
    # No creation timestamps: every counter and histogram family, and no *_created sample anywhere.
    assert not [s.name for f in families.values() for s in f.samples if s.name.endswith("_created")]
    assert b"_created" not in body
    # Build information.
    assert value("edge_agent_build_info", version=__version__, wasmtime=wasmtime_version()) == 1
    # Pulls (a drop-in import is one) and the drop-in folder.
    assert value("edge_agent_image_pulls_total", result="imported") == 1
    assert value("edge_agent_image_pulls_total", result="refused") == 1
    assert value("edge_agent_image_pulls_total", result="failed") == 0
    assert value("edge_agent_image_fetched_bytes_total") > 10_000
    assert value("edge_agent_inbox_drops_total", result="deployed") == 1
    assert value("edge_agent_inbox_drops_total", result="refused") == 1
    # The other agent counts only its own.
    _, others = scrape(other.url)
    pulls = {s.labels["result"]: s.value for s in others["edge_agent_image_pulls"].samples}
    assert pulls and set(pulls.values()) == {0.0}
    # Nothing process-wide was switched off: a registry of anyone else still gets its *_created series.
    registry = CollectorRegistry()
    Counter("someone_elses", "a counter", registry=registry).inc()
    assert b"someone_elses_created" in generate_latest(registry)


def test_every_exposed_metric_is_documented(make_agent: Any) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    running = make_agent()
    status, body = http("GET", running.url + "/metrics")
    assert status == 200
    doc = (REPO / "docs" / "METRICS.md").read_text()
    names = {s.name for f in text_string_to_metric_families(body.decode()) for s in f.samples}
    for name in names:
        base = name.removesuffix("_bucket").removesuffix("_sum").removesuffix("_count")
        assert f"`{name}`" in doc or f"`{base}`" in doc, f"{name} is not in docs/METRICS.md"


def test_every_metric_in_the_source_is_documented() -> None:
    """Also the ones only some agents expose (the MQTT channel's), which a plain agent's scrape misses."""
    doc = (REPO / "docs" / "METRICS.md").read_text()
    names = set()
    for source in (REPO / "agent").rglob("*.py"):
        text = source.read_text()
        names.update(
            re.findall(r"(?:Counter|Gauge|Histogram|Summary|Info|MetricFamily)\(\s*[\"'](edge_agent_\w+)", text)
        )
    assert "edge_agent_mqtt_connected" in names and "edge_agent_inbox_drops" in names, names
    assert [n for n in sorted(names) if f"`{n}" not in doc] == []

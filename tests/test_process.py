"""`edge-agent run` as a real process: start-up, offline serving, signals, exit codes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from conftest import REPO, free_port, http
from modelkit import make_scale_model

from agent import exitcodes


def x_request(v: float) -> dict:
    return {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [v, 1, 1, 1]}]}


def import_model(state: Path, directory: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "agent", "import", "--state-dir", str(state), str(directory)],
        check=True,
        cwd=REPO,
        capture_output=True,
    )


def test_serves_an_imported_model_and_stops_cleanly_on_sigterm(agent_process, tmp_path: Path):
    state = tmp_path / "state"
    import_model(state, make_scale_model(tmp_path / "scale"))
    agent = agent_process(state, extra=["--no-seed"])
    agent.wait_ready()
    status, body = http("POST", agent.url + "/v2/models/scale/infer", x_request(2))
    assert status == 200 and body["outputs"][0]["data"] == [2, 2, 3, 4]
    assert agent.terminate() == exitcodes.OK
    log = agent.log()
    assert '"event": "agent stopped"' in log and '"drained": true' in log


def test_sigterm_lets_an_in_flight_request_finish(agent_process, tmp_path: Path):
    """SIGTERM while a request runs: the reply still comes whole, then the agent exits 0.

    The request spins until the model's 10 s deadline (input -1), so it is surely in
    flight when the signal lands 2 s in (the agent's own "in_flight" count at the stop
    confirms it); its full 504 answer must arrive. Every outcome is recorded: a
    connection cut before the answer fails the test.
    """
    import http.client
    import time

    state = tmp_path / "state"
    import_model(state, make_scale_model(tmp_path / "scale", timeout_ms=10000))
    # Never inline: the spinning request runs on a worker, so the loop is free to take the signal.
    agent = agent_process(
        state,
        extra=["--no-seed"],
        env={
            "EDGE_AGENT_INLINE_THRESHOLD_US": "0",
            "EDGE_AGENT_REQUEST_TIMEOUT_MS": "10000",
            "EDGE_AGENT_DRAIN_TIMEOUT_S": "60",
        },
    )
    agent.wait_ready()
    outcomes: list[object] = []
    conn = http.client.HTTPConnection("127.0.0.1", agent.port, timeout=60)
    conn.connect()  # connected before the signal: the request cannot be refused for lack of a listener

    def in_flight_request() -> None:
        body = json.dumps(x_request(-1)).encode()
        try:
            conn.request("POST", "/v2/models/scale/infer", body, {"Content-Type": "application/json"})
            resp = conn.getresponse()
            outcomes.append((resp.status, json.loads(resp.read())))
        except Exception as exc:  # noqa: BLE001 - a cut-off request is the failure this test looks for
            outcomes.append(("cut off", repr(exc)))

    thread = threading.Thread(target=in_flight_request)
    thread.start()
    time.sleep(2.0)  # well inside the 10 s the request runs
    assert agent.terminate(timeout=60) == exitcodes.OK
    thread.join(60)
    assert len(outcomes) == 1 and outcomes[0][0] == 504, outcomes
    assert "deadline" in outcomes[0][1]["error"], outcomes
    log = agent.log()
    assert '"in_flight": 1' in log and '"drained": true' in log, log


def test_corrupt_blob_marks_only_that_model_broken(agent_process, tmp_path: Path):
    state = tmp_path / "state"
    import_model(state, make_scale_model(tmp_path / "good", name="good"))
    import_model(state, make_scale_model(tmp_path / "bad", name="bad", scale=(5, 5, 5, 5)))
    from agent.state import StateDB

    db = StateDB(state / "agent.db")
    weights = db.get_version("bad", "1").weights_digest
    db.close()
    blob = state / "blobs" / "sha256" / weights[len("sha256:") :]
    blob.write_bytes(blob.read_bytes()[:-4] + b"XXXX")

    agent = agent_process(state, extra=["--no-seed"])
    agent.wait_ready()
    assert http("POST", agent.url + "/v2/models/good/infer", x_request(1))[0] == 200
    status, body = http("POST", agent.url + "/v2/models/bad/infer", x_request(1))
    assert status == 503 and "corrupt blob" in body["error"]
    lines = [json.loads(line) for line in agent.log().splitlines() if line.startswith("{")]
    broken = [entry for entry in lines if entry.get("event") == "model cannot be served"]
    assert broken and broken[0]["model"] == "bad" and weights in broken[0]["error"]


def test_port_in_use_exits_with_oserr(agent_process, tmp_path: Path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        agent = agent_process(tmp_path / "state", extra=["--no-seed"], port=sock.getsockname()[1])
        assert agent.proc.wait(30) == exitcodes.OSERR
    assert "cannot listen" in agent.log()


def run_cli(*args: str, env: dict[str, str] | None = None, stdin: str | None = None) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_AGENT_")}
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "agent", *args],
        capture_output=True,
        text=True,
        env=full_env,
        cwd=REPO,
        input=stdin,
        timeout=60,
    )


def test_unusable_state_dir_exits_with_cantcreat(tmp_path: Path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    proc = run_cli("run", "--state-dir", str(blocker / "state"), "--listen", f"127.0.0.1:{free_port()}")
    assert proc.returncode == exitcodes.CANTCREAT, proc.stderr
    assert "state directory" in proc.stderr


def test_bad_configuration_exits_with_config(tmp_path: Path):
    proc = run_cli("run", "--state-dir", str(tmp_path), env={"EDGE_AGENT_POOL_SIZE": "lots"})
    assert proc.returncode == exitcodes.CONFIG
    assert "pool_size" in proc.stderr


@pytest.mark.parametrize("verb", ["run", "models", "import", "infer", "status"])
def test_every_verb_has_help(verb: str):
    proc = run_cli(verb, "--help")
    assert proc.returncode == 0 and "--state-dir" in proc.stdout and "usage: edge-agent" in proc.stdout


def test_cli_models_import_infer_status(agent_process, tmp_path: Path):
    state = tmp_path / "state"
    model_dir = make_scale_model(tmp_path / "scale", scale=(2, 2, 2, 2))
    proc = run_cli("import", "--state-dir", str(state), str(model_dir))
    assert proc.returncode == 0 and "imported scale:1" in proc.stdout
    proc = run_cli("import", "--state-dir", str(state), str(tmp_path / "missing"))
    assert proc.returncode == exitcodes.NOINPUT
    listing = json.loads(run_cli("models", "--state-dir", str(state), "--json").stdout)
    assert [(m["model"], m["version"], m["active"]) for m in listing] == [("scale", "1", True)]

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    assert run_cli("status", "--url", url).returncode == exitcodes.UNAVAILABLE
    agent = agent_process(state, extra=["--no-seed"], port=port)
    agent.wait_ready()
    # The models come from the control API: the CLI reads the agent's token from the state directory.
    proc = run_cli("status", "--url", url, "--state-dir", str(state))
    assert proc.returncode == 0 and "ready" in proc.stdout and "scale" in proc.stdout
    # A bare array on standard input is wrapped as the model's single input.
    proc = run_cli("infer", "scale", "--input", "-", "--url", url, stdin="[1, 2, 3, 4]")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["outputs"][0]["data"] == [2, 4, 6, 8]
    proc = run_cli("infer", "scale", "--input", "-", "--url", url, stdin="[1, 2, 3]")
    assert proc.returncode == exitcodes.DATAERR and "shape" in proc.stderr
    proc = run_cli("infer", "nope", "--input", "-", "--url", url, stdin="[1, 2, 3, 4]")
    assert proc.returncode == exitcodes.UNAVAILABLE


def test_kill_9_in_the_middle_of_a_swap_restarts_on_a_whole_version(agent_process, tmp_path: Path):
    """The swap to v2 is killed during its (slow) warm-up; the restart serves one whole version
    and the reconciler, by its recorded state, finishes the swap the local source asked for."""
    state = tmp_path / "state"
    import_model(state, make_scale_model(tmp_path / "v1", version="1", scale=(1, 1, 1, 1)))
    slow = make_scale_model(tmp_path / "v2", version="2", scale=(2, 2, 2, 2), warmup_x=(8, 1, 1, 1), timeout_ms=20000)
    import_model(state, slow)
    agent = agent_process(state, extra=["--no-seed"])
    agent.wait_ready()
    deploy = subprocess.Popen(
        [sys.executable, "-m", "agent", "deploy", "store:scale:2", "--url", agent.url, "--state-dir", str(state)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    import time

    from agent.state import StateDB

    def swap_started() -> bool:
        db = StateDB(state / "agent.db")
        try:
            return len(db.swaps.unfinished()) > 0
        finally:
            db.close()

    deadline = time.monotonic() + 60  # hang guard only
    while not (started := swap_started()) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert started, "the swap never started"
    agent.proc.kill()  # kill -9 while v2 is warming up
    agent.proc.wait(10)
    deploy.wait(30)
    assert deploy.returncode != 0  # the client saw its agent die

    restarted = agent_process(state, extra=["--no-seed"])
    restarted.wait_ready(timeout=60)
    versions = set()
    for _ in range(20):
        status, body = http("POST", restarted.url + "/v2/models/scale/infer", x_request(1))
        assert status == 200
        assert body["outputs"][0]["data"] == [float(body["model_version"])] * 4
        versions.add(body["model_version"])
    assert versions == {"2"}  # the recorded desired state was v2: the reconciler finished the swap

    db = StateDB(state / "agent.db")
    states = [entry.state for entry in db.swaps.entries()]
    db.close()
    assert "started" not in states and "abandoned" in states and states[-1] == "switched"
    # The log tells what really happened: not "old version kept" while v2 is what serves.
    recovery = [json.loads(line) for line in restarted.log().splitlines() if "swap interrupted" in line]
    assert len(recovery) == 1 and recovery[0]["serving"] == "2", recovery
    assert "reconciliation finished it" in recovery[0]["outcome"], recovery

"""The local control API against hostile callers: no token, wrong token, a browser page, non-JSON, untrusted registries.

Every test drives a real agent over HTTP (in-process via ``make_agent``, or
``edge-agent run`` as a subprocess with the CLI as the client).
"""

from __future__ import annotations

import json
import socket
import stat
import subprocess
import sys
import threading
from http.client import HTTPConnection
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO, free_port, http
from modelkit import make_scale_model

from agent import exitcodes


def scale_agent(make_agent: Any, tmp_path: Path, **overrides: Any) -> Any:
    """An agent serving scale:1, with scale:2 stored beside it."""

    def setup(agent: Any) -> None:
        agent.repository.import_dir(make_scale_model(tmp_path / "v1", version="1", scale=(1, 1, 1, 1)))
        agent.repository.import_dir(make_scale_model(tmp_path / "v2", version="2", scale=(2, 2, 2, 2)))
        agent.db.set_active("scale", "1")

    return make_agent(setup=setup, seed_bundled=False, **overrides)


def token_of(running: Any) -> str:
    return (running.agent.config.state_dir / "api-token").read_text().strip()


def raw_post(running: Any, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, Any]:
    """A POST with exactly these headers (urllib would add a form Content-Type of its own)."""
    host, port = running.url[len("http://") :].rsplit(":", 1)
    conn = HTTPConnection(host, int(port), timeout=30)
    try:
        conn.putrequest("POST", path, skip_host="Host" in headers, skip_accept_encoding=True)
        for name, value in {**headers, "Content-Length": str(len(body))}.items():
            conn.putheader(name, value)
        conn.endheaders(body)
        resp = conn.getresponse()
        data = resp.read()
    finally:
        conn.close()
    return resp.status, json.loads(data) if data else None


def served_version(running: Any) -> str:
    request = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1, 1, 1, 1]}]}
    status, body = http("POST", running.url + "/v2/models/scale/infer", request)
    assert status == 200, body
    return body["model_version"]


def test_no_configured_token_means_a_generated_one_not_an_open_api(make_agent: Any, tmp_path: Path) -> None:
    running = scale_agent(make_agent, tmp_path)
    load = "/v2/repository/models/scale/load"
    body = json.dumps({"parameters": {"version": "2"}}).encode()
    # Without a token, nothing changes: the node keeps serving version 1.
    status, doc = raw_post(running, load, body, {"Content-Type": "application/json"})
    assert status == 401 and "token" in doc["error"]
    assert served_version(running) == "1"

    token_file = running.agent.config.state_dir / "api-token"
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    token = token_of(running)
    assert len(token) >= 32
    auth = {"Content-Type": "application/json", "Authorization": f"Bearer {token}"}
    assert raw_post(running, load, body, auth)[0] == 200
    assert served_version(running) == "2"

    # A restart on the same state directory keeps the token: clients holding it keep working.
    running.stop()
    again = make_agent(seed_bundled=False)
    assert token_of(again) == token
    assert raw_post(again, "/v2/repository/index", b"{}", auth)[0] == 200


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER", "bEaReR"])
def test_the_bearer_scheme_is_case_insensitive(make_agent: Any, tmp_path: Path, scheme: str) -> None:
    running = scale_agent(make_agent, tmp_path, api_token="s3cret-token")
    headers = {"Content-Type": "application/json", "Authorization": f"{scheme} s3cret-token"}
    assert raw_post(running, "/v2/repository/index", b"{}", headers)[0] == 200


@pytest.mark.parametrize(
    "authorization",
    ["", "Bearer", "Bearer ", "Bearer wrong", "Bearer s3cret-token-and-more", "Basic s3cret-token", "s3cret-token"],
)
def test_a_missing_or_wrong_token_is_401(make_agent: Any, tmp_path: Path, authorization: str) -> None:
    running = scale_agent(make_agent, tmp_path, api_token="s3cret-token")
    headers = {"Content-Type": "application/json", **({"Authorization": authorization} if authorization else {})}
    status, doc = raw_post(running, "/v2/repository/models/scale/unload", b"{}", headers)
    assert status == 401 and "token" in doc["error"]
    assert served_version(running) == "1"


@pytest.mark.parametrize(
    ("content_type", "body", "status"),
    [
        ("text/plain", b'{"parameters": {"version": "2"}}', 415),
        ("application/x-www-form-urlencoded", b"parameters=1", 415),
        ("multipart/form-data; boundary=x", b"--x--", 415),
        (None, b'{"parameters": {"version": "2"}}', 415),
        ("text/plain", b"", 415),  # an empty body with another type is still not JSON
        ("application/json", b'{"parameters": {"version": "2"}}', 200),
        ("Application/JSON; charset=utf-8", b'{"parameters": {"version": "2"}}', 200),
        (None, b"", 200),  # no body and no type: e.g. curl -X POST .../load
    ],
)
def test_control_requests_must_be_json(
    make_agent: Any, tmp_path: Path, content_type: str | None, body: bytes, status: int
) -> None:
    running = scale_agent(make_agent, tmp_path, api_token="s3cret-token")
    headers = {"Authorization": "Bearer s3cret-token", **({"Content-Type": content_type} if content_type else {})}
    answered, doc = raw_post(running, "/v2/repository/models/scale/load", body, headers)
    assert answered == status, doc
    if status == 415:
        assert "application/json" in doc["error"]
        assert served_version(running) == "1"


def test_cross_origin_requests_are_refused_even_with_the_token(make_agent: Any, tmp_path: Path) -> None:
    running = scale_agent(make_agent, tmp_path, api_token="s3cret-token")
    port = running.url.rsplit(":", 1)[1]
    auth = {"Content-Type": "application/json", "Authorization": "Bearer s3cret-token"}
    unload = "/v2/repository/models/scale/unload"
    refused = [
        {"Origin": "http://evil.example"},
        {"Origin": "null"},  # sandboxed frames, file:// pages
        {"Origin": f"http://127.0.0.1:{int(port) + 1}"},  # another service on the node: same site, other origin
        {"Origin": f"https://127.0.0.1:{port}"},
        {"Sec-Fetch-Site": "cross-site"},
        {"Sec-Fetch-Site": "same-site"},
        # DNS rebinding: the page's own name now resolves to the node, so Origin matches Host.
        {"Host": f"rebind.example:{port}", "Origin": f"http://rebind.example:{port}"},
    ]
    for extra in refused:
        status, doc = raw_post(running, unload, b"{}", {**auth, **extra})
        assert status == 403, (extra, status, doc)
        assert "cross-origin" in doc["error"]
        assert served_version(running) == "1"
    # The agent's own origin (a person's browser pointed at it) and tools that send none are fine.
    own = [
        {"Origin": f"http://127.0.0.1:{port}", "Sec-Fetch-Site": "same-origin"},
        {"Host": f"localhost:{port}", "Origin": f"http://localhost:{port}"},
        {"Sec-Fetch-Site": "none"},
    ]
    for extra in own:
        status, doc = raw_post(running, "/v2/repository/index", b"{}", {**auth, **extra})
        assert status == 200, (extra, status, doc)


class CountingListener:
    """A TCP port that counts connections: where an untrusted 'registry' would be."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            conn.close()

    def close(self) -> None:
        self.sock.close()


def test_api_deploy_pulls_only_from_trust_scopes(make_agent: Any, tmp_path: Path) -> None:
    from agent.images.signing import generate_keypair
    from agent.wiring import attach_images

    _, pub = generate_keypair(tmp_path / "release", None)
    untrusted = CountingListener()

    def setup(agent: Any) -> None:
        agent.config.sections["registry"] = {
            "attempts": 1,
            "hosts": {f"127.0.0.1:{untrusted.port}": {"plain_http": True}},
        }
        agent.config.sections["trust"] = {
            "keys": {"release": str(pub)},
            "scopes": {"registry.trusted.example/models": ["release"]},
        }
        agent.repository.import_dir(make_scale_model(tmp_path / "v1", version="1"))
        agent.db.set_active("scale", "1")
        attach_images(agent)

    running = make_agent(setup=setup, seed_bundled=False, api_token="s3cret-token")
    auth = {"Content-Type": "application/json", "Authorization": "Bearer s3cret-token"}
    try:
        for path, ref in [
            ("/v2/repository/deploy", f"127.0.0.1:{untrusted.port}/models/scale:2"),
            ("/v2/repository/models/scale/load", f"127.0.0.1:{untrusted.port}/models/scale:2"),
            ("/v2/repository/deploy", "registry.trusted.example/other/scale:2"),  # the registry, not the scope
        ]:
            status, doc = raw_post(running, path, json.dumps({"parameters": {"ref": ref}}).encode(), auth)
            assert status == 403, (ref, status, doc)
            assert "trust scope" in doc["error"] and ref in doc["error"]
        assert untrusted.connections == 0  # refused before any connection was made
        status, doc = raw_post(running, "/v2/repository/deploy", b'{"parameters": {"ref": "not a ref"}}', auth)
        assert status == 400 and "image reference" in doc["error"]
        assert served_version(running) == "1"
        # store: references never leave the node and stay allowed.
        status, doc = raw_post(running, "/v2/repository/deploy", b'{"parameters": {"ref": "store:scale:1"}}', auth)
        assert status == 200, doc
    finally:
        untrusted.close()


# -- the CLI as the client -----------------------------------------------------------------------------
def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("EDGE_AGENT_")}
    return subprocess.run(
        [sys.executable, "-m", "agent", *args], capture_output=True, text=True, cwd=REPO, env=env, timeout=120
    )


def test_cli_uses_the_token_file_and_a_refusal_exits_noperm(agent_process: Any, tmp_path: Path) -> None:
    state = tmp_path / "state"
    for version, scale in (("1", 1), ("2", 2)):
        proc = run_cli(
            "import",
            "--state-dir",
            str(state),
            str(make_scale_model(tmp_path / version, version=version, scale=(scale,) * 4)),
        )
        assert proc.returncode == 0, proc.stderr
    agent = agent_process(state, extra=["--no-seed"])
    agent.wait_ready()
    assert "beyond loopback" not in agent.log()

    # The state directory is all the CLI needs: it reads the token the agent made there.
    proc = run_cli("deploy", "store:scale:2", "--url", agent.url, "--state-dir", str(state))
    assert proc.returncode == 0, proc.stderr
    proc = run_cli("status", "--url", agent.url, "--state-dir", str(state), "--json")
    assert proc.returncode == 0, proc.stderr
    # Version 1 is kept warm for rollback: loaded and answering, so READY too.
    assert {(m["version"], m["state"]) for m in json.loads(proc.stdout)["models"]} == {
        ("1", "READY"),
        ("2", "READY"),
    }

    # A wrong token: the agent answers 401 and the CLI says so with EX_NOPERM.
    proc = run_cli("rollback", "scale", "--url", agent.url, "--token", "wrong")
    assert proc.returncode == exitcodes.NOPERM, (proc.returncode, proc.stderr)
    assert "401" in proc.stderr and "token" in proc.stderr
    # No token to be found at all (another state directory): the same, and the CLI says where it looked.
    proc = run_cli("rollback", "scale", "--url", agent.url, "--state-dir", str(tmp_path / "elsewhere"))
    assert proc.returncode == exitcodes.NOPERM, (proc.returncode, proc.stderr)
    assert str(tmp_path / "elsewhere" / "api-token") in proc.stderr
    # An untrusted registry is a refusal too.
    proc = run_cli("deploy", "127.0.0.1:1/models/scale:3", "--url", agent.url, "--state-dir", str(state))
    assert proc.returncode == exitcodes.NOPERM and "trust scope" in proc.stderr
    status, body = http(
        "POST",
        agent.url + "/v2/models/scale/infer",
        {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1, 1, 1, 1]}]},
    )
    assert status == 200 and body["model_version"] == "2"


def test_listening_beyond_loopback_is_warned_about(agent_process: Any, tmp_path: Path) -> None:
    port = free_port()
    agent = agent_process(tmp_path / "state", extra=["--no-seed", "--listen", f"0.0.0.0:{port}"], port=port)
    agent.wait_ready()
    warnings = [json.loads(line) for line in agent.log().splitlines() if "beyond loopback" in line]
    assert warnings and warnings[0]["level"] == "warning" and warnings[0]["listen"] == f"0.0.0.0:{port}"

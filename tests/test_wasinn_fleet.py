"""WASI-NN and language models through the fleet path, end to end, as pure-wasm models go through it.

Each model version is built into an OCI image, pushed to a real registry and signed with the
``edge-agent image build / push / sign`` verbs; a real agent (every service ``edge-agent run``
attaches, a real Mosquitto broker, signed fleet commands) deploys it by an MQTT ``deploy``
command, swaps to the next version while clients keep inferring, rolls back by command, reports
it in its telemetry, refuses an image signed by a key the trust policy does not list, and, restarted
with the broker and the registry down, serves the active version from its store.

(1) a WASI-NN ONNX reactor model (tests/wasinn_wat.py) served on ``/v2``;
(2) a language model: WasmEdge's ``wasmedge-ggml-basic`` command app with a tiny GGUF
(tests/ggufkit.py), served on ``/v1/chat/completions`` (and its app on ``/v2``);
(3) a language model request that picked v1 before the fleet swapped to v2: v1 drains it, answers it
with its own text and only then closes.

Waits are hang guards (``HANG_S``), never speed checks.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.client import HTTPConnection
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
from conftest import ROLLBACK_GRACE_S, AgentThread, http
from cryptography.hazmat.primitives.asymmetric import ec
from images_fixtures import (
    REGISTRY_BIN,
    ImageEnv,
    KeyPair,
    Registry,
    make_keypair,
    running_registry,
)
from mqtt_fixtures import HANG_S, Broker, Commander, Recorder, fleet_keypair, needs_mosquitto, wait_until
from wasinn_wat import linear_model_dir

from agent.config import Config
from agent.wiring import attach_services

pytestmark = [
    needs_mosquitto,
    pytest.mark.skipif(not os.path.exists(REGISTRY_BIN), reason="docker-registry is not installed"),
]

REPO = Path(__file__).resolve().parent.parent
NODE = "nn-node"
WASMEDGE_BASIC = REPO / "tests" / "data" / "wasmedge-ggml" / "basic.wasm"
X = np.random.default_rng(5).standard_normal((2, 4)).astype(np.float32)


# -- module-wide: one registry, one broker, the keys ------------------------------------------------
@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    with running_registry(tmp_path_factory.mktemp("registry")) as reg:
        yield reg


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    b = Broker(tmp_path_factory.mktemp("broker")).start()
    try:
        yield b
    finally:
        b.kill()


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, KeyPair]:
    root = tmp_path_factory.mktemp("keys")
    return {name: make_keypair(root, name) for name in ("release", "rogue")}


@pytest.fixture(scope="module")
def fleet_key(tmp_path_factory: pytest.TempPathFactory) -> tuple[ec.EllipticCurvePrivateKey, Path]:
    return fleet_keypair(tmp_path_factory.mktemp("fleet"))


# -- publishing: the CLI verbs a release pipeline runs ----------------------------------------------
def edge(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EDGE_AGENT_", "COSIGN_"))}
    return subprocess.run(
        [sys.executable, "-m", "agent", *args], capture_output=True, text=True, timeout=180, env=env, cwd=REPO
    )


def publish_cli(publisher: ImageEnv, model_dir: Path, ref: str, key: KeyPair) -> None:
    """``edge-agent image build`` to a tar, ``image push`` to the registry, ``image sign`` with ``key``."""
    tar = model_dir.parent / f"{model_dir.name}.tar"
    built = edge("image", "build", str(model_dir), "--tar", str(tar))
    assert built.returncode == 0, built.stderr
    pushed = publisher.cli("image", "push", str(tar), ref)
    assert pushed.returncode == 0, pushed.stderr
    signed = publisher.cli("image", "sign", ref, "--key", str(key.private_path))
    assert signed.returncode == 0, signed.stderr


class Fleet:
    """The node's config (registry, trust, broker), its agents (one at a time) and the fleet tools."""

    def __init__(self, root: Path, registry: Registry, broker: Broker, keys: dict[str, KeyPair], fleet_key: Any):
        self.root = root
        self.registry = registry
        self.broker = broker
        self.fleet_private, self.fleet_pub = fleet_key
        hosts = {registry.host: {"plain_http": True}}
        self.publisher = ImageEnv(root / "publisher", hosts=hosts)
        self.node = ImageEnv(
            root / "node",
            hosts=hosts,
            keys={"release": keys["release"].public_path},
            scopes={f"{registry.host}/models": ["release"]},
        )
        self.keys = keys
        self.agents: list[AgentThread] = []
        self.recorder = Recorder(broker, [f"edge/nodes/{NODE}/#"])
        self.commander = Commander(broker, self.fleet_private)

    def ref(self, name: str, version: str) -> str:
        return f"{self.registry.host}/models/{name}:{version}"

    def publish(self, model_dir: Path, name: str, version: str, key: str = "release") -> str:
        ref = self.ref(name, version)
        publish_cli(self.publisher, model_dir, ref, self.keys[key])
        return ref

    def start(self, llm: dict[str, Any] | None = None, **overrides: Any) -> AgentThread:
        """An agent as ``edge-agent run`` builds it (attach_services), on the node's config file."""
        config = Config.load(
            file=self.node.config_path,
            env={},
            overrides={
                "listen": "127.0.0.1:0",
                "grpc_listen": "off",
                "node_id": NODE,
                "seed_bundled": False,
                "worker_threads": 6,
                **overrides,
            },
        )

        def setup(agent: Any) -> None:
            agent.config.sections["mqtt"] = {
                "host": "127.0.0.1",
                "port": self.broker.port,
                "fleet_keys": [str(self.fleet_pub)],
                "reconnect_min_s": 0.05,
                "reconnect_max_s": 0.5,
            }
            agent.config.sections["telemetry"] = {"interval_s": 0.5, "gpu": False}
            agent.config.sections["lifecycle"] = {"rollback_grace_s": ROLLBACK_GRACE_S}
            if llm is not None:
                agent.config.sections["llm"] = llm
            attach_services(agent, env={})

        agent = AgentThread(config, setup)
        self.agents.append(agent)
        return agent

    def wait_online(self) -> None:
        def online() -> bool:
            states = [m.doc for m in self.recorder.on("/state") if isinstance(m.doc, dict)]
            return bool(states) and bool(states[-1].get("online"))

        wait_until(online, HANG_S, "the node to come online")

    def call(self, command: str, args: dict[str, Any]) -> dict[str, Any]:
        reply: dict[str, Any] = self.commander.call(NODE, command, args, timeout=HANG_S * 3)
        return reply

    @contextlib.contextmanager
    def offline(self) -> Iterator[None]:
        """The broker and the registry down for the block, up again after it (the fixtures are shared)."""
        self.broker.stop()
        self.registry.stop()
        try:
            yield
        finally:
            self.registry.start()
            self.broker.start()

    def close(self) -> None:
        for agent in self.agents:
            agent.stop()
        self.commander.close()
        self.recorder.close()


@pytest.fixture
def fleet(tmp_path: Path, registry: Registry, broker: Broker, keys: Any, fleet_key: Any) -> Iterator[Fleet]:
    made = Fleet(tmp_path, registry, broker, keys, fleet_key)
    try:
        yield made
    finally:
        made.close()


def telemetry_shows(recorder: Recorder, model: str, version: str, backend: str) -> dict[str, Any]:
    """The latest telemetry snapshot that has ``model:version`` (alone) serving and lists ``backend``."""

    def found() -> dict[str, Any] | None:
        for m in reversed(recorder.on("/telemetry")):
            data = m.doc.get("data", {}) if isinstance(m.doc, dict) else {}
            serving = [e for e in data.get("models", []) if e.get("model") == model and e.get("serving")]
            names = [b.get("name") for b in data.get("wasi_nn_backends", [])]
            if [e["version"] for e in serving] == [version] and backend in names:
                return data
        return None

    data: dict[str, Any] = wait_until(found, HANG_S, f"telemetry with {model}:{version} and {backend}", 0.1)
    return data


# -- (1) a WASI-NN ONNX reactor model ----------------------------------------------------------------
def reference(onnx_bytes: bytes, x: np.ndarray) -> np.ndarray:
    out: np.ndarray = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    return out


def x_request(x: np.ndarray) -> dict[str, Any]:
    return {"inputs": [{"name": "x", "datatype": "FP32", "shape": list(x.shape), "data": x.ravel().tolist()}]}


def infer_nnlin(agent: AgentThread) -> tuple[str, np.ndarray]:
    status, body = http("POST", f"{agent.url}/v2/models/nnlin/infer", x_request(X))
    assert status == 200, body
    out = body["outputs"][0]
    return body["model_version"], np.array(out["data"], dtype=np.float32).reshape(out["shape"])


class Clients:
    """Threads sending ``body`` to ``path`` back to back on their own keep-alive connections.

    Every answer (``parse``'s value of its JSON) and every failure is kept, per client in order.
    """

    def __init__(self, agent: AgentThread, count: int, path: str, body: dict[str, Any], parse: Any):
        host, port = agent.url[len("http://") :].split(":")
        self.address = (host, int(port))
        self.path = path
        self.body = json.dumps(body).encode()
        self.parse = parse
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.answers: list[list[Any]] = [[] for _ in range(count)]
        self.failures: list[object] = []
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(count)]
        for t in self.threads:
            t.start()

    def _run(self, i: int) -> None:
        conn = HTTPConnection(*self.address, timeout=HANG_S)
        while not self.stop.is_set():
            try:
                conn.request("POST", self.path, self.body, {"Content-Type": "application/json"})
                resp = conn.getresponse()
                payload = json.loads(resp.read())
            except Exception as exc:  # noqa: BLE001 - every failure is recorded and fails the test
                with self.lock:
                    self.failures.append(repr(exc))
                conn.close()
                conn = HTTPConnection(*self.address, timeout=HANG_S)
                continue
            with self.lock:
                if resp.status != 200:
                    self.failures.append((resp.status, payload))
                    continue
                self.answers[i].append(self.parse(payload))
        conn.close()

    def count(self, check: Any = None) -> int:
        with self.lock:
            return sum(1 for per in self.answers for a in per if check is None or check(a))

    def close(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(HANG_S)


def nn_answer(payload: dict[str, Any]) -> tuple[str, np.ndarray]:
    out = payload["outputs"][0]
    return payload["model_version"], np.array(out["data"], dtype=np.float32).reshape(out["shape"])


def test_wasi_nn_onnx_model_through_the_fleet_path(fleet: Fleet) -> None:
    models = {
        v: linear_model_dir(fleet.root / "models" / f"nnlin-{v}", version=v, seed=int(v) * 10) for v in ("1", "2", "3")
    }
    want = {v: reference(onnx, X) for v, (_, onnx) in models.items()}
    assert not np.allclose(want["1"], want["2"])
    ref1 = fleet.publish(models["1"][0], "nnlin", "1")
    ref2 = fleet.publish(models["2"][0], "nnlin", "2")
    # The same kind of image, signed by a key the node's trust policy does not list.
    ref3 = fleet.publish(models["3"][0], "nnlin", "3", key="rogue")

    agent = fleet.start()
    fleet.wait_online()

    # Deployed by a signed MQTT command from the signed image; served over the v2 protocol.
    reply = fleet.call("deploy", {"ref": ref1})
    assert reply["ok"], reply
    assert (reply["result"]["model"], reply["result"]["version"]) == ("nnlin", "1")
    version, got = infer_nnlin(agent)
    assert version == "1" and np.array_equal(got, want["1"])

    # v2 by MQTT while clients infer: no request fails; each client's answers switch once, from v1's to v2's.
    clients = Clients(agent, 4, "/v2/models/nnlin/infer", x_request(X), nn_answer)
    try:
        wait_until(lambda: clients.count(lambda a: a[0] == "1") >= 8 or clients.failures, HANG_S, "answers from v1")
        reply = fleet.call("deploy", {"ref": ref2})
        assert reply["ok"], reply
        assert (reply["result"]["version"], reply["result"]["previous"]) == ("2", "1")
        wait_until(lambda: clients.count(lambda a: a[0] == "2") >= 8 or clients.failures, HANG_S, "answers from v2")
    finally:
        clients.close()
    assert not clients.failures, clients.failures[:5]
    for per_client in clients.answers:
        versions = [v for v, _ in per_client]
        assert versions == sorted(versions), "a client got v1's answer after v2's"
        for v, got in per_client:
            assert np.array_equal(got, want[v]), v
    assert clients.count(lambda a: a[0] == "1") and clients.count(lambda a: a[0] == "2")
    version, got = infer_nnlin(agent)
    assert version == "2" and np.array_equal(got, want["2"])

    # Rollback by command: v1 again, its outputs.
    reply = fleet.call("rollback", {"model": "nnlin"})
    assert reply["ok"] and reply["result"]["version"] == "1", reply
    version, got = infer_nnlin(agent)
    assert version == "1" and np.array_equal(got, want["1"])
    # And forward again (the image is in the cache by now) for what follows.
    reply = fleet.call("deploy", {"ref": ref2})
    assert reply["ok"] and reply["result"]["version"] == "2", reply

    # Telemetry over MQTT: the WASI-NN version served, the node's backends.
    data = telemetry_shows(fleet.recorder, "nnlin", "2", "onnxruntime")
    onnx = next(b for b in data["wasi_nn_backends"] if b["name"] == "onnxruntime")
    assert onnx["encoding"] == "onnx"

    # An image signed by an untrusted key: refused with the signature error; v2 keeps serving.
    reply = fleet.call("deploy", {"ref": ref3})
    assert not reply["ok"], reply
    assert reply["error"]["code"] == "signature_error", reply
    assert ("nnlin", "3") not in fleet.node.versions()
    version, got = infer_nnlin(agent)
    assert version == "2" and np.array_equal(got, want["2"])

    # A canary split by set-desired: both WASI-NN versions take requests, each answering its own outputs;
    # then v2 alone again.
    split = {"1": 50, "2": 50}
    reply = fleet.call("set-desired", {"deployments": [{"model": "nnlin", "ref": ref2, "traffic": split}]})
    assert reply["ok"], reply
    seen: set[str] = set()
    for _ in range(200):  # P(one version never picked in 200 draws at 50/50) is 2**-199
        version, got = infer_nnlin(agent)
        assert np.array_equal(got, want[version]), version
        seen.add(version)
        if seen == {"1", "2"}:
            break
    assert seen == {"1", "2"}
    reply = fleet.call("set-desired", {"deployments": [{"model": "nnlin", "ref": ref2}]})
    assert reply["ok"], reply
    assert {infer_nnlin(agent)[0] for _ in range(10)} == {"2"}

    # The other fleet commands on a WASI-NN model: status, pin (a deploy refused while pinned), the
    # cache's verify (every blob re-hashed, the ONNX weights included) and GC (what is in use kept).
    reply = fleet.call("status", {})
    nn_status = next(m for m in reply["result"]["models"] if m["name"] == "nnlin")
    assert nn_status["serving"] == ["2"], nn_status
    assert fleet.call("pin", {"model": "nnlin"})["result"]["pinned"] is True
    refused = fleet.call("deploy", {"ref": ref1})
    assert not refused["ok"] and "pinned" in refused["error"]["message"], refused
    assert fleet.call("pin", {"model": "nnlin", "pinned": False})["result"]["pinned"] is False
    verify = fleet.call("cache-verify", {})
    assert verify["ok"] and verify["result"]["quarantined"] == [], verify
    assert fleet.call("cache-gc", {})["ok"]
    version, got = infer_nnlin(agent)
    assert version == "2" and np.array_equal(got, want["2"])
    # Unloaded by command (its hosts closed with it), deployed again by command (its image is cached).
    v2 = agent.agent.models.get("nnlin", "2")
    assert fleet.call("unload", {"model": "nnlin"})["result"] == {"model": "nnlin", "unloaded": True}
    assert http("POST", f"{agent.url}/v2/models/nnlin/infer", x_request(X))[0] == 404
    wait_until(lambda: v2.nn_version.open_hosts == 0, HANG_S, "the unloaded version's WASI-NN hosts closed")
    reply = fleet.call("deploy", {"ref": ref2})
    assert reply["ok"] and reply["result"]["version"] == "2", reply
    version, got = infer_nnlin(agent)
    assert version == "2" and np.array_equal(got, want["2"])

    # Restarted with the broker and the registry down: the fleet's deployment (an image reference)
    # resolves to the digest the node last pulled, and the version serves from the node's own store.
    agent.stop()
    with fleet.offline():
        again = fleet.start()
        offline = again.agent.events.recent("image.offline")
        assert offline and offline[-1].fields["version"] == "2", again.agent.events.recent()
        version, got = infer_nnlin(again)
        assert version == "2" and np.array_equal(got, want["2"])
        assert again.agent.mqtt is not None and not again.agent.mqtt.link.connected
        nnlin = next(m for m in again.agent.status()["models"] if m["name"] == "nnlin")
        assert nnlin["serving"] == ["2"] and nnlin["status"] != "broken", nnlin
        again.stop()


# -- (2) a language model ------------------------------------------------------------------------------
# Long enough that no generation of it ends by itself while a test looks at it (tests/test_llm_serving.py).
LONG = 6000
# Greedy (temperature 0): each version's own answer, every time.
CHAT = {
    "model": "tinychat",
    "messages": [{"role": "user", "content": "tell me a story"}],
    "max_tokens": 12,
    "temperature": 0,
}


def chat_answer(payload: dict[str, Any]) -> str:
    text: str = payload["choices"][0]["message"]["content"]
    return text


def chat(agent: AgentThread) -> str:
    status, body = http("POST", agent.url + "/v1/chat/completions", CHAT)
    assert status == 200, body
    text = chat_answer(body)
    assert text
    return text


def test_language_model_through_the_fleet_path(fleet: Fleet) -> None:
    pytest.importorskip("llama_cpp", reason="llama-cpp-python (the ggml backend) is not installed")
    if not WASMEDGE_BASIC.exists():
        pytest.skip("WasmEdge's example apps are not in tests/data/wasmedge-ggml")
    from llmkit import llm_model_dir

    # WasmEdge's basic app (``basic.wasm default PROMPT``) over a tiny GGUF; v2 is a GGUF of another seed.
    # The app generates until EOS (its n-predict comes from an environment variable the agent does not
    # set), so the GGUFs stop on their own (``eos_bias``); seeds 1 and 3 both answer a few words.
    dirs = {
        v: llm_model_dir(
            fleet.root / "models" / f"tinychat-{v}",
            version=v,
            seed=seed,
            args=("default",),
            app=WASMEDGE_BASIC,
            eos_bias=True,
        )
        for v, seed in (("1", 1), ("2", 3))
    }
    refs = {v: fleet.publish(path, "tinychat", v) for v, path in dirs.items()}

    agent = fleet.start()
    fleet.wait_online()
    reply = fleet.call("deploy", {"ref": refs["1"]})
    assert reply["ok"], reply
    first = chat(agent)
    assert chat(agent) == first  # greedy: the model's own answer, every time
    # The app from the image runs per v2 request: its stdout is the answer.
    prompt = "tell me about paris"
    status, body = http(
        "POST",
        agent.url + "/v2/models/tinychat/infer",
        {"inputs": [{"name": "prompt", "datatype": "BYTES", "shape": [1], "data": [prompt]}]},
    )
    assert status == 200, body
    assert body["model_version"] == "1"
    assert body["outputs"][0]["data"][0].startswith(f"Prompt:\n{prompt}\nResponse:\n")

    # v1 -> v2 by command while clients chat: no request fails (a generation in flight holds its
    # version until it ends), each client's answers switch once from v1's to v2's, which differ.
    clients = Clients(agent, 3, "/v1/chat/completions", CHAT, chat_answer)
    try:
        wait_until(lambda: clients.count() >= 6 or clients.failures, HANG_S, "chats with v1")
        reply = fleet.call("deploy", {"ref": refs["2"]})
        assert reply["ok"] and reply["result"]["previous"] == "1", reply
        wait_until(lambda: clients.count(lambda a: a != first) >= 6 or clients.failures, HANG_S, "chats with v2")
    finally:
        clients.close()
    assert not clients.failures, clients.failures[:5]
    second = chat(agent)
    assert second != first
    for per_client in clients.answers:
        labels = ["1" if a == first else "2" if a == second else a for a in per_client]
        assert set(labels) <= {"1", "2"}, labels
        assert labels == sorted(labels), "a client got v1's answer after v2's"
    assert clients.count(lambda a: a == first) and clients.count(lambda a: a == second)
    reply = fleet.call("rollback", {"model": "tinychat"})
    assert reply["ok"] and reply["result"]["version"] == "1", reply
    assert chat(agent) == first

    # A GGUF image signed by an untrusted key: refused with the signature error; v1 keeps answering.
    rogue = llm_model_dir(
        fleet.root / "models" / "tinychat-3", version="3", seed=5, args=("default",), app=WASMEDGE_BASIC
    )
    reply = fleet.call("deploy", {"ref": fleet.publish(rogue, "tinychat", "3", key="rogue")})
    assert not reply["ok"] and reply["error"]["code"] == "signature_error", reply
    assert chat(agent) == first

    data = telemetry_shows(fleet.recorder, "tinychat", "1", "llama.cpp")
    assert any(b["encoding"] == "ggml" for b in data["wasi_nn_backends"] if b["name"] == "llama.cpp")

    # Offline restart: v1 from the store, the same answers.
    agent.stop()
    with fleet.offline():
        again = fleet.start()
        assert chat(again) == first
        again.stop()


def metric(agent: AgentThread, name: str, **labels: str) -> float:
    """One series' value from the agent's /metrics (0 when absent)."""
    status, body = http("GET", agent.url + "/metrics")
    assert status == 200
    text = body.decode() if isinstance(body, bytes) else str(body)
    for line in text.splitlines():
        if line.startswith((name + "{", name + " ")):
            found = dict(re.findall(r'(\w+)="([^"]*)"', line.split(" ")[0]))
            if all(found.get(k) == v for k, v in labels.items()):
                return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_a_request_in_flight_across_a_fleet_swap_is_answered_by_its_version(fleet: Fleet) -> None:
    """A chat request that picked v1 before the fleet swapped to v2 (queued behind a long stream on
    v1's one generation slot) is not failed: the swapped-out version drains it, past its rollback
    grace, answers it with v1's own text, and closes once it has ended."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python (the ggml backend) is not installed")
    from llmkit import llm_model_dir

    # GGUFs that never sample EOS: a generation runs for max_tokens, and a long one takes many seconds.
    refs = {
        v: fleet.publish(llm_model_dir(fleet.root / "models" / f"tinychat-{v}", version=v, seed=seed), "tinychat", v)
        for v, seed in (("1", 1), ("2", 2))
    }
    agent = fleet.start(llm={"max_concurrency": 1})
    fleet.wait_online()
    assert fleet.call("deploy", {"ref": refs["1"]})["ok"]
    first = chat(agent)

    # A long stream takes v1's one slot (LONG tokens: far longer than anything below takes) ...
    body = json.dumps({**CHAT, "max_tokens": LONG, "stream": True})
    host, port = agent.url[len("http://") :].split(":")
    stream = socket.create_connection((host, int(port)), timeout=HANG_S)
    stream.sendall(
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n{body}".encode()
    )
    data = b""
    while b'"content"' not in data:
        chunk = stream.recv(65536)
        assert chunk, data
        data += chunk
    # ... and a chat request queues behind it: it picked v1, so v1 owes it an answer.
    queued: dict[str, Any] = {}
    waiter = threading.Thread(
        target=lambda: queued.update(reply=http("POST", agent.url + "/v1/chat/completions", CHAT))
    )
    waiter.start()
    wait_until(
        lambda: metric(agent, "edge_agent_llm_waiting", model="tinychat", version="1") == 1, HANG_S, "the chat to queue"
    )

    # Closers run when the version closes (its engine's is among them): this one tells the test when.
    v1 = agent.agent.models.get("tinychat", "1")
    v1_closed = threading.Event()
    v1.closers.append(v1_closed.set)
    reply = fleet.call("deploy", {"ref": refs["2"]})
    assert reply["ok"] and reply["result"]["previous"] == "1", reply
    second = chat(agent)  # new requests go to v2 (a slot of its own) ...
    assert second != first
    # ... while v1, past its rollback grace and no longer routed, stays open for what it still owes.
    wait_until(lambda: ("tinychat", "1") not in agent.agent.models.loaded, HANG_S, "v1 to be let go")
    assert v1.inflight == 2 and not v1_closed.is_set() and "reply" not in queued

    # The stream's client leaves: the slot goes to the queued chat, which v1 answers with its own text.
    stream.close()
    waiter.join(HANG_S)
    status, answer = queued["reply"]
    assert status == 200, answer
    assert chat_answer(answer) == first
    assert metric(agent, "edge_agent_llm_requests_total", model="tinychat", version="1", outcome="cancelled") == 1
    # Drained: v1 closes now; v2 goes on answering.
    assert v1_closed.wait(HANG_S), "v1 was not closed once its requests ended"
    assert chat(agent) == second

"""Real components for the image tests: a distribution registry, a token server, a fault proxy.

The registry is Debian's ``docker-registry`` (CNCF distribution) run as a
process on a free loopback port with its own storage directory: anonymous,
behind htpasswd basic auth, behind a bearer-token service (a small one here,
whose signing certificate the registry's ``auth.token`` config trusts), or
over TLS with a test CA. The proxy sits between the agent and a registry and
cuts, stalls, throttles or fails connections on purpose.

Test modules import what they use from here (``from images_fixtures import
registry, ...``; conftest puts tests/ on the path).
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import http.client
import ipaddress
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import numpy as np
import pytest
import safetensors.numpy
import wasmtime
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID
from modelkit import SCALE_WAT, make_scale_model
from ports import free_port

REPO = Path(__file__).resolve().parent.parent
REGISTRY_BIN = shutil.which("docker-registry") or "/usr/bin/docker-registry"
SKOPEO = shutil.which("skopeo")
HTPASSWD = shutil.which("htpasswd")
USER, PASSWORD = "edge", "s3cret-pass"

needs_registry = pytest.mark.skipif(
    not os.path.exists(REGISTRY_BIN), reason="docker-registry (Debian package docker-registry) is not installed"
)
needs_skopeo = pytest.mark.skipif(SKOPEO is None, reason="skopeo is not installed")


def wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port}")


# -- certificates -----------------------------------------------------------------------------------
@dataclass
class Cert:
    cert_pem: bytes
    key_pem: bytes
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    def write(self, directory: Path, stem: str) -> tuple[Path, Path]:
        cert_path, key_path = directory / f"{stem}.pem", directory / f"{stem}-key.pem"
        cert_path.write_bytes(self.cert_pem)
        key_path.write_bytes(self.key_pem)
        return cert_path, key_path


def make_cert(common_name: str, issuer: Cert | None = None, ca: bool = False, ip: str | None = None) -> Cert:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.cert.subject if issuer else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ip:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(ip))]), critical=False
        )
    cert = builder.sign(issuer.key if issuer else key, hashes.SHA256())
    return Cert(
        cert.public_bytes(serialization.Encoding.PEM),
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
        cert,
        key,
    )


# -- the bearer-token service -----------------------------------------------------------------------
def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class TokenServer:
    """Issues ES256 JWTs the distribution registry accepts (x5c chain to its rootcertbundle)."""

    def __init__(self, service: str, issuer: str = "edge-test-issuer"):
        self.service = service
        self.issuer = issuer
        self.signer = make_cert("edge-test-token-signer", ca=True)
        self.requests: list[dict[str, Any]] = []
        self.port = free_port()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                query = parse_qs(urlsplit(self.path).query)
                auth = self.headers.get("Authorization", "")
                user = None
                if auth.startswith("Basic "):
                    name, _, pw = base64.b64decode(auth[6:]).decode().partition(":")
                    if (name, pw) != (USER, PASSWORD):
                        self._answer(401, {"details": "bad credentials"})
                        return
                    user = name
                scope = query.get("scope", [""])[0]
                server.requests.append({"user": user, "scope": scope, "service": query.get("service", [""])[0]})
                if user is None:
                    self._answer(401, {"details": "login required"})
                    return
                self._answer(200, {"token": server.token(user, scope), "expires_in": 300})

            def _answer(self, status: int, doc: dict[str, Any]) -> None:
                body = json.dumps(doc).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def realm(self) -> str:
        return f"http://127.0.0.1:{self.port}/token"

    def token(self, user: str, scope: str) -> str:
        access = []
        if scope:
            kind, name, actions = scope.split(":", 2)
            access.append({"type": kind, "name": name, "actions": actions.split(",")})
        now = int(time.time())
        header = {
            "typ": "JWT",
            "alg": "ES256",
            "x5c": [base64.b64encode(self.signer.cert.public_bytes(serialization.Encoding.DER)).decode()],
        }
        claims = {
            "iss": self.issuer,
            "sub": user,
            "aud": self.service,
            "exp": now + 300,
            "nbf": now - 10,
            "iat": now,
            "jti": uuid.uuid4().hex,
            "access": access,
        }
        signing_input = f"{_b64url(json.dumps(header).encode())}.{_b64url(json.dumps(claims).encode())}"
        der = self.signer.key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256()))
        r, s = decode_dss_signature(der)
        return f"{signing_input}.{_b64url(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


# -- the registry ---------------------------------------------------------------------------------
class Registry:
    def __init__(
        self,
        root: Path,
        htpasswd: bool = False,
        token: TokenServer | None = None,
        tls: Cert | None = None,
    ):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.storage = self.root / "storage"
        self.port = free_port()
        self.host = f"127.0.0.1:{self.port}"
        self.token = token
        self.tls = tls
        self.htpasswd = htpasswd
        self.proc: subprocess.Popen[bytes] | None = None
        lines = [
            "version: 0.1",
            "log:",
            "  level: error",
            "  accesslog:",
            "    disabled: true",
            "storage:",
            "  filesystem:",
            f"    rootdirectory: {self.storage}",
            "  delete:",
            "    enabled: true",
            "http:",
            f"  addr: 127.0.0.1:{self.port}",
            f"  secret: {uuid.uuid4().hex}",
        ]
        if tls is not None:
            cert_path, key_path = tls.write(self.root, "server")
            lines += ["  tls:", f"    certificate: {cert_path}", f"    key: {key_path}"]
        if htpasswd:
            if HTPASSWD is None:
                pytest.skip("htpasswd (Debian package apache2-utils) is not installed")
            entry = subprocess.run([HTPASSWD, "-Bbn", USER, PASSWORD], check=True, capture_output=True, text=True)
            (self.root / "htpasswd").write_text(entry.stdout)
            lines += ["auth:", "  htpasswd:", "    realm: edge-test", f"    path: {self.root / 'htpasswd'}"]
        if token is not None:
            bundle = self.root / "token-root.pem"
            bundle.write_bytes(token.signer.cert_pem)
            lines += [
                "auth:",
                "  token:",
                f"    realm: {token.realm}",
                f"    service: {token.service}",
                f"    issuer: {token.issuer}",
                f"    rootcertbundle: {bundle}",
            ]
        self.config = self.root / "config.yml"
        self.config.write_text("\n".join(lines) + "\n")

    def start(self) -> Registry:
        self.log = open(self.root / "registry.log", "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [REGISTRY_BIN, "serve", str(self.config)], stdout=self.log, stderr=subprocess.STDOUT
        )
        wait_port(self.port)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()

    def blob_file(self, digest: str) -> Path:
        hexpart = digest.split(":", 1)[1]
        return self.storage / "docker" / "registry" / "v2" / "blobs" / "sha256" / hexpart[:2] / hexpart / "data"


@contextlib.contextmanager
def running_registry(root: Path, **kwargs: Any) -> Iterator[Registry]:
    reg = Registry(root, **kwargs).start()
    try:
        yield reg
    finally:
        reg.stop()


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    if not os.path.exists(REGISTRY_BIN):
        pytest.skip("docker-registry is not installed")
    with running_registry(tmp_path_factory.mktemp("registry")) as reg:
        yield reg


# -- the fault proxy ------------------------------------------------------------------------------
@dataclass
class FaultProxy:
    """A TCP proxy to ``target`` that counts, cuts, stalls, throttles or fails on command.

    Byte counts are of what went from the registry to the agent, over all
    connections, so a test can tell how much of a blob was sent twice.
    """

    target_port: int
    cut_at: int | None = None  # close every connection once this many bytes in total went down (once)
    stall_at: int | None = None  # stop sending (keep the connection open) at this total (once)
    fail_first: int = 0  # answer this many connections with a 500 and close them
    rate_bps: float | None = None  # throttle the download to this many bytes per second
    down_bytes: int = 0
    connections: int = 0
    failed: int = 0
    port: int = field(default_factory=free_port)
    up_log: bytearray = field(default_factory=bytearray)  # what clients sent (requests), for header checks

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._pumps = 0
        self._sock = socket.socket()
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", self.port))
        self._sock.listen(16)
        self._stop = threading.Event()
        self._release = threading.Event()  # ends a stall (so does close())
        self.holding = 0  # stalled connections the proxy is holding open, silent, right now
        self._threads: list[threading.Thread] = []
        self._open: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def release(self) -> None:
        """End the stall: the held connection is closed (the client sees it end, if it is still waiting)."""
        self._release.set()

    def settle(self, timeout: float = 60.0) -> None:
        """Wait until no connection is being pumped (after a client was killed, say), so counts are final."""
        deadline = time.monotonic() + timeout
        while self._pumps and time.monotonic() < deadline:
            time.sleep(0.01)

    def request_heads(self) -> list[dict[str, str]]:
        """The request lines and headers clients sent through the proxy, in order."""
        heads = []
        for block in re.split(rb"\r\n\r\n", bytes(self.up_log)):
            lines = block.decode("latin-1").split("\r\n")
            match = re.search(r"(GET|HEAD|PUT|POST|PATCH|DELETE) (\S+) HTTP/1\.[01]$", lines[0])
            if not match:
                continue
            head = {"method": match.group(1), "path": match.group(2)}
            for line in lines[1:]:
                name, _, value = line.partition(":")
                head[name.strip().lower()] = value.strip()
            heads.append(head)
        return heads

    def close(self) -> None:
        self._stop.set()
        self._release.set()
        # shutdown() wakes the thread blocked in accept(); close() alone leaves it listening.
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            self._sock.close()
        for sock in list(self._open):
            with contextlib.suppress(OSError):
                sock.close()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._sock.accept()
            except OSError:
                return
            self.connections += 1
            with self._lock:
                fail = self.fail_first > 0
                if fail:
                    self.fail_first -= 1
            if fail:
                threading.Thread(target=self._fail, args=(client,), daemon=True).start()
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                client.close()
                continue
            self._open += [client, upstream]
            with self._lock:
                self._pumps += 1
            threading.Thread(target=self._pump_up, args=(client, upstream), daemon=True).start()
            threading.Thread(target=self._pump_down, args=(upstream, client), daemon=True).start()

    def _fail(self, client: socket.socket) -> None:
        with contextlib.suppress(OSError):
            client.settimeout(5)
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = client.recv(65536)
                if not chunk:
                    break
                data += chunk
            body = b'{"errors":[{"code":"UNKNOWN","message":"injected fault"}]}'
            head = b"HTTP/1.1 500 Internal Server Error\r\nContent-Type: application/json\r\n"
            client.sendall(head + b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body)
            self.failed += 1
        client.close()

    def _pump_up(self, client: socket.socket, upstream: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while chunk := client.recv(65536):
                with self._lock:
                    if len(self.up_log) < 4 << 20:
                        self.up_log += chunk
                upstream.sendall(chunk)
        with contextlib.suppress(OSError):
            upstream.shutdown(socket.SHUT_WR)

    def _pump_down(self, upstream: socket.socket, client: socket.socket) -> None:
        t0 = time.monotonic()
        sent_here = 0
        try:
            while chunk := upstream.recv(65536):
                with self._lock:
                    limit = None
                    if self.cut_at is not None:
                        limit = ("cut", self.cut_at)
                    elif self.stall_at is not None:
                        limit = ("stall", self.stall_at)
                    if limit is not None and self.down_bytes + len(chunk) >= limit[1]:
                        chunk = chunk[: max(0, limit[1] - self.down_bytes)]
                        if limit[0] == "cut":
                            self.cut_at = None
                        else:
                            self.stall_at = None
                    else:
                        limit = None
                    self.down_bytes += len(chunk)
                client.sendall(chunk)
                sent_here += len(chunk)
                if limit is not None:
                    if limit[0] == "stall":
                        # Hold the connection open, silent, until released: for as long as a client
                        # without a stall timeout would wait (120 s is only there so a thread ends).
                        with self._lock:
                            self.holding += 1
                        self._release.wait(120)
                        with self._lock:
                            self.holding -= 1
                    break
                if self.rate_bps:
                    ahead = sent_here / self.rate_bps - (time.monotonic() - t0)
                    if ahead > 0:
                        time.sleep(ahead)
        except OSError:
            pass
        for sock in (client, upstream):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                sock.close()
        with self._lock:
            self._pumps -= 1


# -- models and keys --------------------------------------------------------------------------------
def make_large_model(directory: Path, name: str, version: str, weight_bytes: int, seed: int = 0) -> Path:
    """A valid model whose one parameter is a large FP32 tensor (the first four elements scale x)."""
    n = max(4, weight_bytes // 4)
    make_scale_model(directory, name=name, version=version, golden=False)
    meta = json.loads((directory / "model.json").read_text())
    meta["params"] = [{"name": "scale", "datatype": "FP32", "shape": [n]}]
    meta["resources"]["memory_limit_mb"] = max(4, weight_bytes // (1 << 20) + 16)
    (directory / "model.json").write_text(json.dumps(meta, indent=1))
    weights = np.random.default_rng(seed).random(n, dtype=np.float32)
    weights[:4] = (1.0, 2.0, 3.0, 4.0)
    safetensors.numpy.save_file({"scale": weights}, str(directory / "weights.safetensors"))
    # The test kernel insists on a 16-byte parameter; this one takes any length.
    wat = SCALE_WAT.replace("(i32.const ABI)", "(i32.const 1)").replace(
        "(if (i32.ne (i32.load offset=4 (local.get $t)) (i32.const 16)) (then (return (i32.const -2))))", ""
    )
    (directory / "model.wasm").write_bytes(wasmtime.wat2wasm(wat))
    return directory


@dataclass
class KeyPair:
    private_path: Path
    public_path: Path

    @property
    def private_key(self) -> ec.EllipticCurvePrivateKey:
        key = serialization.load_pem_private_key(self.private_path.read_bytes(), password=None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        return key


def make_keypair(directory: Path, stem: str) -> KeyPair:
    from agent.images.signing import generate_keypair

    key_path, pub_path = generate_keypair(directory / stem, password=None)
    return KeyPair(key_path, pub_path)


def http_get(host: str, path: str) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(host, timeout=10)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


# -- an agent configured for images ------------------------------------------------------------------
def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(str(value))


class ImageEnv:
    """A state directory plus a TOML config naming registries, keys and scopes, as an operator writes it."""

    def __init__(
        self,
        root: Path,
        hosts: dict[str, dict[str, Any]] | None = None,
        keys: dict[str, Path] | None = None,
        scopes: dict[str, list[str]] | None = None,
        require_signature: bool = True,
        registry: dict[str, Any] | None = None,
        cache: dict[str, Any] | None = None,
    ):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.state_dir = self.root / "state"
        # Fast retries: tests inject faults and should not sit through production backoff. The stall timeout
        # stays generous: a loaded machine must not pass for a stalled registry (tests of stalls set their own).
        reg = {"backoff_initial_s": 0.02, "backoff_max_s": 0.2, "attempts": 4, "stall_timeout_s": 30.0}
        reg.update(registry or {})
        lines = ["[agent]", f"state_dir = {_toml_value(self.state_dir)}", 'log_level = "warning"', "", "[registry]"]
        lines += [f"{k} = {_toml_value(v)}" for k, v in reg.items()]
        for host, values in (hosts or {}).items():
            lines += ["", f"[registry.hosts.{json.dumps(host)}]"]
            lines += [f"{k} = {_toml_value(v)}" for k, v in values.items()]
        lines += ["", "[trust]", f"require_signature = {_toml_value(require_signature)}", "", "[trust.keys]"]
        lines += [f"{json.dumps(name)} = {_toml_value(path)}" for name, path in (keys or {}).items()]
        lines += ["", "[trust.scopes]"]
        lines += [f"{json.dumps(scope)} = {_toml_value(names)}" for scope, names in (scopes or {}).items()]
        if cache:
            lines += ["", "[cache]"] + [f"{k} = {_toml_value(v)}" for k, v in cache.items()]
        self.config_path = self.root / "config.toml"
        self.config_path.write_text("\n".join(lines) + "\n")
        self._repo: Any = None

    def config(self) -> Any:
        from agent.config import Config

        return Config.load(file=self.config_path, env={})

    def registry_settings(self) -> Any:
        from agent.images.settings import RegistrySettings

        return RegistrySettings.from_config(self.config())

    @property
    def repository(self) -> Any:
        if self._repo is None:
            from agent.cas import BlobStore
            from agent.repository import ModelRepository
            from agent.state import StateDB

            self._repo = ModelRepository(BlobStore(self.state_dir), StateDB(self.state_dir / "agent.db"))
        return self._repo

    def puller(self, events: Any = None) -> Any:
        from agent.images.service import build_puller

        return build_puller(self.config(), self.repository, events)

    def cli(
        self, *args: str, timeout: float = 120.0, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        full_env = {k: v for k, v in os.environ.items() if not k.startswith(("EDGE_AGENT_", "COSIGN_"))}
        full_env.update(env or {})
        return subprocess.run(
            [sys.executable, "-m", "agent", *args, "--config", str(self.config_path)],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=full_env,
            cwd=REPO,
        )

    def versions(self) -> list[tuple[str, str]]:
        return [(r.model, r.version) for r in self.repository.db.versions()]


def publish(
    work: Path,
    settings: Any,
    model_dir: Path,
    ref: str,
    key: KeyPair | None = None,
) -> str:
    """Build ``model_dir`` into a layout, push it to ``ref`` and sign it with ``key``; returns the digest."""
    from agent.images.layout import OciLayout, build_from_dir
    from agent.images.push import push_layout, sign_image

    layout_dir = work / f"layout-{uuid.uuid4().hex[:8]}"
    built = build_from_dir(model_dir, layout_dir)
    push_layout(OciLayout(layout_dir), built.name, ref, settings)
    if key is not None:
        sign_image(ref, key.private_key, settings)
    return built.manifest.digest


def signed_layout(
    work: Path, model_dir: Path, key: KeyPair | None, identity: str, tar: bool = False
) -> tuple[Path, str]:
    """Build ``model_dir`` into a layout (or a tar of one) and sign it for ``identity``; returns (path, digest)."""
    from agent.images.layout import build_from_dir, write_tar
    from agent.images.push import sign_layout

    layout_dir = work / f"layout-{uuid.uuid4().hex[:8]}"
    built = build_from_dir(model_dir, layout_dir)
    path = layout_dir
    if tar:
        path = work / f"{layout_dir.name}.tar"
        write_tar(layout_dir, path)
        shutil.rmtree(layout_dir)
    if key is not None:
        sign_layout(path, None, key.private_key, identity)
    return path, built.manifest.digest

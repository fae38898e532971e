"""A small Kubernetes API server for the tests: the real paths and JSON, in one process.

It serves what the agent's watcher uses — EdgeModelDeployment list (with
limit/continue) and watch (chunked, with ADDED/MODIFIED/DELETED/BOOKMARK
and ERROR 410 events), a Node, the status subresource (JSON merge patch) and
core/v1 Events — and lets a test inject 500s, hangs, expired resource
versions and an outright stop, keeping its "etcd" across restarts.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import json
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

GROUP, VERSION, PLURAL, KIND = "edge-agent.io", "v1alpha1", "edgemodeldeployments", "EdgeModelDeployment"
API_VERSION = f"{GROUP}/{VERSION}"


@dataclass
class Seen:
    method: str
    path: str
    query: dict[str, str]
    body: Any
    headers: dict[str, str]
    at: float = field(default_factory=time.monotonic)

    @property
    def is_watch(self) -> bool:
        return self.query.get("watch") in ("true", "True", "1")


@dataclass
class Fault:
    method: str
    path_part: str
    status: int
    count: int
    watch: bool | None = None  # None: lists and watches alike


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def status_body(code: int, reason: str, message: str) -> dict[str, Any]:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }


class FakeKube:
    def __init__(self, node: str = "edge-1", labels: dict[str, str] | None = None):
        self.cond = threading.Condition()
        self.rv = 1000
        self.objects: dict[tuple[str, str], dict[str, Any]] = {}
        self.history: list[tuple[int, str, dict[str, Any]]] = []
        self.compacted_below = 0  # watches from an older resourceVersion get 410
        self.nodes: dict[str, dict[str, str]] = {node: dict(labels or {})}
        self.events: list[dict[str, Any]] = []
        self.requests: list[Seen] = []
        self.faults: list[Fault] = []
        self.hang_watches = False
        self.gone_as_status = False  # 410 as the HTTP status instead of an ERROR event
        self.bookmark_every: float | None = None
        self.expire_continue = False
        self._snapshots: dict[str, tuple[list[dict[str, Any]], int, int]] = {}
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._conns: set[socket.socket] = set()
        self.port = 0
        self.running = False

    # -- lifecycle -----------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> FakeKube:
        fake = self

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            allow_reuse_address = True

            def process_request(self, request: Any, client_address: Any) -> None:
                with fake.cond:
                    fake._conns.add(request)
                super().process_request(request, client_address)

        handler = type("Handler", (_Handler,), {"fake": self})
        self._server = Server(("127.0.0.1", self.port), handler)
        self.port = self._server.server_address[1]
        self.running = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """The API server goes away: listener closed, every open connection cut."""
        with self.cond:
            self.running = False
            self.cond.notify_all()
            conns, self._conns = self._conns, set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                conn.close()

    # -- the "etcd" ----------------------------------------------------------------------
    def _record(self, kind: str, obj: dict[str, Any]) -> None:
        self.rv += 1
        obj["metadata"]["resourceVersion"] = str(self.rv)
        self.history.append((self.rv, kind, copy.deepcopy(obj)))
        self.cond.notify_all()

    def create(
        self, name: str, spec: dict[str, Any], namespace: str = "default", created: str | None = None
    ) -> dict[str, Any]:
        with self.cond:
            obj = {
                "apiVersion": API_VERSION,
                "kind": KIND,
                "metadata": {
                    "name": name,
                    "namespace": namespace,
                    "uid": str(uuid.uuid4()),
                    "generation": 1,
                    "creationTimestamp": created or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                },
                "spec": copy.deepcopy(spec),
            }
            self.objects[(namespace, name)] = obj
            self._record("ADDED", obj)
            return copy.deepcopy(obj)

    def update_spec(self, name: str, spec: dict[str, Any], namespace: str = "default") -> None:
        with self.cond:
            obj = self.objects[(namespace, name)]
            obj["spec"] = copy.deepcopy(spec)
            obj["metadata"]["generation"] += 1
            self._record("MODIFIED", obj)

    def delete(self, name: str, namespace: str = "default") -> None:
        with self.cond:
            obj = self.objects.pop((namespace, name))
            self._record("DELETED", obj)

    def compact(self) -> None:
        """Forget history: every watch from an older resourceVersion now gets 410 Gone."""
        with self.cond:
            self.compacted_below = self.rv + 1
            self.history.clear()

    def set_labels(self, labels: dict[str, str], node: str | None = None) -> None:
        with self.cond:
            self.nodes[node or next(iter(self.nodes))] = dict(labels)

    def fail(self, method: str, path_part: str, status: int, count: int = 1, watch: bool | None = None) -> None:
        with self.cond:
            self.faults.append(Fault(method, path_part, status, count, watch))

    def node_status(self, name: str, namespace: str = "default", node: str = "edge-1") -> dict[str, Any] | None:
        with self.cond:
            obj = self.objects.get((namespace, name))
            return copy.deepcopy(((obj or {}).get("status") or {}).get("nodes", {}).get(node))

    def seen(self, method: str = "", part: str = "", watch: bool | None = None) -> list[Seen]:
        with self.cond:
            return [
                r
                for r in self.requests
                if (not method or r.method == method) and part in r.path and (watch is None or r.is_watch == watch)
            ]

    def take_fault(self, seen: Seen) -> Fault | None:
        with self.cond:
            for fault in self.faults:
                if (
                    fault.method == seen.method
                    and fault.path_part in seen.path
                    and fault.count > 0
                    and (fault.watch is None or fault.watch == seen.is_watch)
                ):
                    fault.count -= 1
                    return fault
        return None


class _Handler(BaseHTTPRequestHandler):
    fake: FakeKube
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # quiet: the tests read requests, not logs
        pass

    # -- plumbing ------------------------------------------------------------------------
    def _seen(self) -> tuple[Seen, list[str]]:
        parts = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        body = json.loads(raw) if raw else None
        seen = Seen(self.command, parts.path, query, body, {k.lower(): v for k, v in self.headers.items()})
        with self.fake.cond:
            self.fake.requests.append(seen)
        return seen, [p for p in parts.path.split("/") if p]

    def _json(self, status: int, doc: Any) -> None:
        data = json.dumps(doc).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: int, reason: str, message: str) -> None:
        self._json(status, status_body(status, reason, message))

    def _chunk(self, doc: Any) -> None:
        data = json.dumps(doc).encode() + b"\n"
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()

    def _route(self) -> None:
        seen, parts = self._seen()
        fault = self.fake.take_fault(seen)
        if fault is not None:
            self._error(fault.status, "InternalError" if fault.status >= 500 else "Injected", "injected by the test")
            return
        if parts[:2] == ["api", "v1"] and len(parts) == 4 and parts[2] == "nodes" and self.command == "GET":
            return self._node(parts[3])
        if parts[:3] == ["api", "v1", "namespaces"] and len(parts) == 5 and parts[4] == "events":
            return self._event(parts[3], seen)
        if parts[:3] == ["apis", GROUP, VERSION]:
            rest = parts[3:]
            if rest == [PLURAL] and self.command == "GET":
                return self._list_or_watch(None, seen)
            if len(rest) == 3 and rest[0] == "namespaces" and rest[2] == PLURAL and self.command == "GET":
                return self._list_or_watch(rest[1], seen)
            is_status = len(rest) == 5 and rest[0] == "namespaces" and rest[2] == PLURAL and rest[4] == "status"
            if is_status and self.command == "PATCH":
                return self._patch_status(rest[1], rest[3], seen)
        self._error(404, "NotFound", f"no route for {self.command} {seen.path}")

    do_GET = do_PATCH = do_POST = _route  # http.server dispatches on do_<METHOD>

    # -- resources -----------------------------------------------------------------------
    def _node(self, name: str) -> None:
        with self.fake.cond:
            labels = self.fake.nodes.get(name)
        if labels is None:
            return self._error(404, "NotFound", f'nodes "{name}" not found')
        self._json(
            200,
            {
                "apiVersion": "v1",
                "kind": "Node",
                "metadata": {"name": name, "uid": "node-uid", "resourceVersion": "1", "labels": labels},
                "spec": {},
                "status": {},
            },
        )

    def _event(self, namespace: str, seen: Seen) -> None:
        body = seen.body or {}
        involved = body.get("involvedObject") or {}
        if self.command != "POST":
            return self._error(405, "MethodNotAllowed", "events: POST only here")
        if involved.get("namespace") != namespace or not (body.get("metadata") or {}).get("name"):
            return self._error(422, "Invalid", "involvedObject.namespace does not match the event's namespace")
        with self.fake.cond:
            self.fake.events.append(body)
        self._json(201, body)

    def _patch_status(self, namespace: str, name: str, seen: Seen) -> None:
        if seen.headers.get("content-type") != "application/merge-patch+json":
            return self._error(
                415, "UnsupportedMediaType", f"unsupported patch type {seen.headers.get('content-type')}"
            )
        with self.fake.cond:
            obj = self.fake.objects.get((namespace, name))
            if obj is None:
                return self._error(404, "NotFound", f'{PLURAL}.{GROUP} "{name}" not found')
            # The status subresource ignores everything but .status.
            obj["status"] = merge_patch(obj.get("status"), (seen.body or {}).get("status"))
            self.fake._record("MODIFIED", obj)
            doc = copy.deepcopy(obj)
        self._json(200, doc)

    def _list_or_watch(self, namespace: str | None, seen: Seen) -> None:
        if seen.is_watch:
            return self._watch(namespace, seen)
        fake = self.fake
        limit = int(seen.query.get("limit") or 0)
        token = seen.query.get("continue")
        with fake.cond:
            if token:
                if fake.expire_continue or token not in fake._snapshots:
                    fake.expire_continue = False
                    return self._error(410, "Expired", "The provided continue parameter is too old")
                items, offset, rv = fake._snapshots.pop(token)
            else:
                items = [
                    copy.deepcopy(o)
                    for (ns, _), o in sorted(fake.objects.items())
                    if namespace is None or ns == namespace
                ]
                offset, rv = 0, fake.rv
            page = items[offset : offset + limit] if limit else items[offset:]
            meta: dict[str, Any] = {"resourceVersion": str(rv)}
            if limit and offset + limit < len(items):
                next_token = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode()
                fake._snapshots[next_token] = (items, offset + limit, rv)
                meta["continue"] = next_token
        self._json(200, {"apiVersion": API_VERSION, "kind": f"{KIND}List", "metadata": meta, "items": page})

    def _watch(self, namespace: str | None, seen: Seen) -> None:
        fake = self.fake
        since = int(seen.query.get("resourceVersion") or 0)
        timeout = float(seen.query.get("timeoutSeconds") or 1800)
        bookmarks = seen.query.get("allowWatchBookmarks") in ("true", "True", "1")
        gone = since < fake.compacted_below
        if gone and fake.gone_as_status:
            return self._error(410, "Expired", f"too old resource version: {since} ({fake.compacted_below})")
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self.wfile.flush()
        deadline = time.monotonic() + timeout
        if fake.hang_watches:
            # A stuck connection: headers, then silence until the client gives up.
            with fake.cond:
                while fake.running and fake.hang_watches and time.monotonic() < deadline:
                    fake.cond.wait(0.05)
            self.close_connection = True
            return
        if gone:
            self._chunk(
                {
                    "type": "ERROR",
                    "object": status_body(
                        410, "Expired", f"too old resource version: {since} ({fake.compacted_below})"
                    ),
                }
            )
            self.wfile.write(b"0\r\n\r\n")
            return
        sent = since
        next_bookmark = time.monotonic() + (fake.bookmark_every or 1e9)
        try:
            while True:
                with fake.cond:
                    pending = [
                        (rv, kind, o)
                        for rv, kind, o in fake.history
                        if rv > sent and (namespace is None or o["metadata"]["namespace"] == namespace)
                    ]
                    if not pending and fake.running:
                        fake.cond.wait(0.05)
                    running, current_rv = fake.running, fake.rv
                if not running:
                    self.close_connection = True
                    return
                for rv, kind, obj in pending:
                    self._chunk({"type": kind, "object": obj})
                    sent = rv
                if bookmarks and fake.bookmark_every and time.monotonic() >= next_bookmark:
                    self._chunk(
                        {
                            "type": "BOOKMARK",
                            "object": {
                                "apiVersion": API_VERSION,
                                "kind": KIND,
                                "metadata": {"resourceVersion": str(current_rv)},
                            },
                        }
                    )
                    sent = max(sent, current_rv)
                    next_bookmark = time.monotonic() + fake.bookmark_every
                if time.monotonic() >= deadline:
                    self.wfile.write(b"0\r\n\r\n")
                    self.wfile.flush()
                    return
        except OSError:
            self.close_connection = True

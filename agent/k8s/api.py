"""The calls the agent makes to the Kubernetes API, through the official ``kubernetes`` client.

Everything here blocks (the client is urllib3 underneath); the watcher runs
the short calls on daemon threads (``agent.k8s.threads.call``) and each watch
stream on a thread of its own (:class:`WatchStream`), so the event loop never
waits on the network. Each agent has its own ``ApiClient`` and
``Configuration``: the client's global default configuration is never read
or written, so many agents in one process can talk to different clusters.
Every call has a connect and a read timeout: an API server that stops
answering must look like an error, not like a quiet cluster.
"""

from __future__ import annotations

import asyncio
import os
import random
import threading
import time
from datetime import UTC, datetime
from typing import Any, cast

import urllib3
from kubernetes import client, config, watch
from kubernetes.client.exceptions import ApiException
from kubernetes.config.config_exception import ConfigException

from agent.k8s.crd import GROUP, PLURAL, VERSION
from agent.k8s.settings import KubeSettings

MERGE_PATCH = "application/merge-patch+json"

# What a call to the API server fails with: an HTTP error status, the network,
# a client that cannot be configured (yet), or a reply that does not parse.
CALL_ERRORS: tuple[type[Exception], ...] = (
    ApiException,
    urllib3.exceptions.HTTPError,
    OSError,
    ConfigException,
    ValueError,
)


class Gone(Exception):
    """410: the resourceVersion (or continue token) is too old; list again."""


def is_gone(exc: BaseException) -> bool:
    return isinstance(exc, Gone) or (isinstance(exc, ApiException) and exc.status == 410)


def describe(exc: BaseException) -> str:
    """A short, log-friendly reason for a failed call."""
    if isinstance(exc, ApiException):
        return f"HTTP {exc.status} {exc.reason or ''}".strip()
    return f"{type(exc).__name__}: {exc}"


def configuration(settings: KubeSettings, env: dict[str, str] | None = None) -> client.Configuration:
    """A client Configuration for the configured mode; reads token and kubeconfig files (blocking)."""
    env = dict(os.environ) if env is None else env
    cfg = client.Configuration()
    mode = settings.mode
    if mode == "auto":
        mode = "in-cluster" if env.get("KUBERNETES_SERVICE_HOST") else ("url" if settings.url else "kubeconfig")
    if mode == "in-cluster":
        # Also installs a hook that re-reads the projected token before it expires.
        config.load_incluster_config(client_configuration=cfg)
    elif mode == "kubeconfig":
        config.load_kube_config(
            config_file=settings.kubeconfig or None, context=settings.context or None, client_configuration=cfg
        )
    else:
        cfg.host = settings.url.rstrip("/")
    return cfg


class KubeAPI:
    def __init__(self, api_client: client.ApiClient, settings: KubeSettings):
        self.api_client = api_client
        self.settings = settings
        self.custom = client.CustomObjectsApi(api_client)
        self.core = client.CoreV1Api(api_client)
        self.timeout = (settings.connect_timeout_s, settings.read_timeout_s)

    @classmethod
    def connect(cls, settings: KubeSettings) -> KubeAPI:
        return cls(client.ApiClient(configuration(settings)), settings)

    def close(self) -> None:
        self.api_client.close()

    # -- EdgeModelDeployments ----------------------------------------------------
    def _list_call(self) -> Any:
        if self.settings.namespace:
            return self.custom.list_namespaced_custom_object
        return self.custom.list_cluster_custom_object

    def _scope(self) -> tuple[Any, ...]:
        if self.settings.namespace:
            return (GROUP, VERSION, self.settings.namespace, PLURAL)
        return (GROUP, VERSION, PLURAL)

    def list_resources(self) -> tuple[list[dict[str, Any]], str]:
        """Every resource, page by page, and the resourceVersion to watch from."""
        for _attempt in range(3):
            items: list[dict[str, Any]] = []
            token: str | None = None
            try:
                while True:
                    kwargs: dict[str, Any] = {"limit": self.settings.page_size, "_request_timeout": self.timeout}
                    if token:
                        kwargs["_continue"] = token
                    page = self._list_call()(*self._scope(), **kwargs)
                    items.extend(page.get("items") or [])
                    meta = page.get("metadata") or {}
                    token = meta.get("continue")
                    if not token:
                        return items, str(meta.get("resourceVersion") or "")
            except ApiException as exc:
                # The continue token expired between pages: the snapshot is gone,
                # start a consistent list over.
                if exc.status == 410 and token:
                    continue
                raise
        raise Gone("list kept expiring between pages")

    def watch(self, resource_version: str, loop: asyncio.AbstractEventLoop) -> WatchStream:
        # Spread reconnects of many nodes over time, as client-go does.
        timeout = max(1, int(self.settings.watch_timeout_s * random.uniform(1.0, 1.5)))
        kwargs = {
            "resource_version": resource_version,
            "allow_watch_bookmarks": True,
            "timeout_seconds": timeout,
            "_request_timeout": self.timeout,
        }
        return WatchStream(self._list_call(), self._scope(), kwargs, loop, self.api_client)

    def patch_node_status(self, namespace: str, name: str, node: str, entry: dict[str, Any] | None) -> dict[str, Any]:
        """Set (or, with None, remove) this node's entry under ``status.nodes``.

        A JSON merge patch on the node's own key: nodes write their entries
        concurrently and none of them can overwrite another's.
        """
        body = {"status": {"nodes": {node: entry}}}
        result = self.custom.patch_namespaced_custom_object_status(
            GROUP, VERSION, namespace, PLURAL, name, body, _content_type=MERGE_PATCH, _request_timeout=self.timeout
        )
        # The client types custom-object calls as returning ``object``: it is the patched object's JSON.
        return cast(dict[str, Any], result)

    # -- nodes and events --------------------------------------------------------
    def node_labels(self, node: str) -> dict[str, str]:
        obj = self.core.read_node(node, _request_timeout=self.timeout)
        labels = obj.metadata.labels if obj.metadata is not None else None
        return dict(labels or {})

    def create_event(
        self, involved: dict[str, Any], reason: str, message: str, kind: str, node: str, action: str
    ) -> None:
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        namespace = involved["namespace"]
        # A plain JSON body rather than client models: the models differ between
        # client releases, and building one without a configuration would copy
        # the client's process-wide default.
        event = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {
                # The name convention of client-go's recorder: object name, then a unique suffix.
                "name": f"{involved['name']}.{time.time_ns():x}{random.getrandbits(16):04x}",
                "namespace": namespace,
            },
            "involvedObject": dict(involved),
            "reason": reason,
            "message": message[:1024],
            "type": kind,
            "action": action,
            "source": {"component": "edge-agent", "host": node},
            "reportingComponent": "edge-agent.io/agent",
            "reportingInstance": node,
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        # The client validates its arguments (pydantic) and so turns this dict into the CoreV1Event
        # its annotation names; the annotation does not say a dict is accepted.
        self.core.create_namespaced_event(namespace, event, _request_timeout=self.timeout)  # type: ignore[arg-type]


_END = object()


class _Watch(watch.Watch):
    """``watch.Watch`` on this agent's ApiClient.

    The stock constructor makes an ApiClient of its own from the client's
    global default configuration (it only uses it to deserialize events); this
    one borrows the agent's, so no watch ever reads shared state. The
    attributes are the ones ``Watch.__init__`` sets (kubernetes 29 to 37).
    """

    def __init__(self, api_client: client.ApiClient):
        self._raw_return_type = None
        self._stop = False
        self._api_client = api_client
        self.resource_version = None


class WatchStream:
    """One watch request, read on its own thread, its events handed to the loop through a queue.

    ``stop()`` shuts the connection's socket down, which wakes the reading
    thread at once instead of after the read timeout.
    """

    def __init__(
        self,
        func: Any,
        scope: tuple[Any, ...],
        kwargs: dict[str, Any],
        loop: asyncio.AbstractEventLoop,
        api_client: client.ApiClient,
    ):
        self._watch = _Watch(api_client)
        self._func, self._scope, self._kwargs = func, scope, kwargs
        self._loop = loop
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._pump, name="k8s-watch", daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        try:
            for event in self._watch.stream(self._func, *self._scope, **self._kwargs):
                if self._stopped.is_set():
                    break
                if isinstance(event, dict):  # the client yields None for a blank keep-alive line
                    self._put(event)
            self._put(_END)
        except BaseException as exc:  # noqa: BLE001 - not handled here: handed to the loop, which decides
            self._put(exc)

    def _put(self, item: Any) -> None:
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            self._stopped.set()

    async def next(self) -> dict[str, Any] | None:
        """The next event; None when the server ended the watch; raises what the stream raised."""
        item = await self._queue.get()
        if item is _END:
            return None
        if isinstance(item, BaseException):
            raise item
        return dict(item)

    def stop(self) -> None:
        self._stopped.set()
        self._watch.stop()

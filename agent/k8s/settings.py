"""The ``[k8s]`` config table (env ``EDGE_AGENT_K8S__<KEY>``), parsed and checked.

::

    [k8s]
    enabled = "auto"         # auto: on when running in a pod (KUBERNETES_SERVICE_HOST set); true | false
    mode = "auto"            # auto | in-cluster | kubeconfig | url
    kubeconfig = ""          # mode kubeconfig: file (default ~/.kube/config)
    context = ""             # mode kubeconfig: context (default the current one)
    url = ""                 # mode url: API base, e.g. http://127.0.0.1:8001 (kubectl proxy)
    node_name = ""           # default $NODE_NAME (downward API), else the agent's node_id
    namespace = ""           # watch one namespace; empty watches all of them
    watch_timeout_s = 300    # server closes each watch after about this long
    read_timeout_s = 120     # nothing (not even a bookmark) for this long: the watch hangs
    connect_timeout_s = 10
    backoff_initial_s = 0.5
    backoff_max_s = 60
    node_refresh_s = 60      # how often the node's labels are re-read
    page_size = 500          # list page size (limit/continue)
    retry_initial_s = 10     # a model the reconciler failed to bring to the spec is retried after this,
    retry_max_s = 600        # doubling up to this (a registry that was down, a node short of memory)
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

from agent.config import Config, section_values
from agent.errors import ConfigError

MODES = ("auto", "in-cluster", "kubeconfig", "url")


@dataclasses.dataclass(frozen=True)
class KubeSettings:
    enabled: bool = False
    mode: str = "auto"
    kubeconfig: str = ""
    context: str = ""
    url: str = ""
    node_name: str = ""
    namespace: str = ""
    watch_timeout_s: int = 300
    read_timeout_s: float = 120.0
    connect_timeout_s: float = 10.0
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 60.0
    node_refresh_s: float = 60.0
    page_size: int = 500
    retry_initial_s: float = 10.0
    retry_max_s: float = 600.0

    @classmethod
    def from_config(cls, config: Config, env: Mapping[str, str] | None = None) -> KubeSettings:
        env = os.environ if env is None else env
        return cls.from_table(
            config.section("k8s"),
            default_node=env.get("NODE_NAME") or config.node_id,
            in_cluster=bool(env.get("KUBERNETES_SERVICE_HOST")),
        )

    @classmethod
    def from_table(cls, table: Mapping[str, Any], default_node: str = "", in_cluster: bool = False) -> KubeSettings:
        table = dict(table)
        # "auto" (the default): a pod always has KUBERNETES_SERVICE_HOST, so an
        # agent deployed by the DaemonSet needs no switch, and one on bare
        # hardware never tries to reach a cluster it was not told about.
        if str(table.get("enabled", "auto")).strip().lower() == "auto":
            table["enabled"] = in_cluster
        values = section_values("k8s", table, cls)
        if not values.get("node_name"):
            values["node_name"] = default_node
        settings = cls(**values)
        settings.validate()
        return settings

    def validate(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"k8s.mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.mode == "url" and not self.url.startswith(("http://", "https://")):
            raise ConfigError(f"k8s.mode = 'url' needs k8s.url = 'http(s)://HOST:PORT', got {self.url!r}")
        if self.enabled and not self.node_name:
            raise ConfigError("k8s.node_name is empty and NODE_NAME is not set: the agent cannot tell its node")
        positive = ("read_timeout_s", "connect_timeout_s", "backoff_initial_s", "backoff_max_s", "node_refresh_s")
        for name in (*positive, "retry_initial_s", "retry_max_s"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"k8s.{name} must be positive, got {getattr(self, name)}")
        if self.watch_timeout_s < 1 or self.page_size < 1:
            raise ConfigError("k8s.watch_timeout_s and k8s.page_size must be at least 1")
        if self.backoff_max_s < self.backoff_initial_s:
            raise ConfigError("k8s.backoff_max_s must not be below k8s.backoff_initial_s")
        if self.retry_max_s < self.retry_initial_s:
            raise ConfigError("k8s.retry_max_s must not be below k8s.retry_initial_s")

"""Kubernetes integration: EdgeModelDeployment resources drive a node's desired state.

Importing this package does not import the ``kubernetes`` client; only a
watcher that is enabled (``[k8s] enabled``, by default: running in a pod)
loads it, when it first connects. ``agent.wiring.attach_k8s`` builds the watcher.
"""

from agent.k8s.settings import KubeSettings
from agent.k8s.watcher import KubeWatcher

__all__ = ["KubeSettings", "KubeWatcher"]

"""The topic layout (docs/MQTT.md), in one place so code, docs and ACLs agree.

Everything a node publishes lives under ``<prefix>/nodes/<node>/``, so a
broker ACL can give each node write access to its own subtree and read
access to its command topics, and nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass

from agent.mqtt.settings import check_topic_segment


@dataclass(frozen=True)
class Topics:
    prefix: str
    node: str
    groups: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        check_topic_segment("node_id", self.node)

    @property
    def base(self) -> str:
        return f"{self.prefix}/nodes/{self.node}"

    # -- what the node subscribes to -------------------------------------------------------
    @property
    def node_commands(self) -> str:
        return f"{self.base}/cmd"

    def group_commands(self, group: str) -> str:
        return f"{self.prefix}/groups/{group}/cmd"

    @property
    def fleet_commands(self) -> str:
        return f"{self.prefix}/fleet/cmd"

    def command_topics(self) -> list[str]:
        return [self.node_commands, *(self.group_commands(g) for g in self.groups), self.fleet_commands]

    def target_of(self, topic: str) -> str | None:
        """The ``target`` a command arriving on ``topic`` must name in its signed body."""
        if topic == self.node_commands:
            return f"node:{self.node}"
        if topic == self.fleet_commands:
            return "fleet"
        for group in self.groups:
            if topic == self.group_commands(group):
                return f"group:{group}"
        return None

    # -- what the node publishes -------------------------------------------------------------
    @property
    def state(self) -> str:
        """Retained: online/offline, versions served, health. The last will lands here too."""
        return f"{self.base}/state"

    @property
    def telemetry(self) -> str:
        return f"{self.base}/telemetry"

    @property
    def events(self) -> str:
        return f"{self.base}/events"

    @property
    def replies(self) -> str:
        """Where replies go when a command names no MQTT v5 response topic."""
        return f"{self.base}/replies"

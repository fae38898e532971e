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
        """Where replies go when a command names no usable MQTT v5 response topic, and where refusals go."""
        return f"{self.base}/replies"

    @property
    def fleet_replies(self) -> str:
        """The fleet tools' reply area: the one part of the tree a response topic may name."""
        return f"{self.prefix}/replies/"

    def honours_response_topic(self, topic: str) -> bool:
        """Whether a valid command's v5 response topic may receive its reply.

        Not inside the agent's own tree (``<prefix>/...``): there a reply would land on a
        node's retained state, in the command topics nodes read (its own included, where
        it would read its reply back as a command), or wherever the layout gives another
        meaning. The fleet's reply area ``<prefix>/replies/...`` is the exception (the
        broker ACL in docs/MQTT.md lets nodes write there); anything outside the prefix
        is the broker's ACL to decide.
        """
        if topic == self.prefix or topic.startswith(self.prefix + "/"):
            return topic.startswith(self.fleet_replies) and len(topic) > len(self.fleet_replies)
        return True

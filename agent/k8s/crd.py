"""The EdgeModelDeployment resource: what it says, whom it selects, what a node wants from it.

The schema itself lives in k3s-manifests/base/crd-edgemodeldeployment.yaml;
this module re-checks what the agent relies on, because a cluster may run
with an older CRD and a resource that fails here must cost its own model an
error on its status, never the node its other models.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypedDict

from agent.control import ModelDeployment
from agent.spec import NAME_RE, VERSION_RE

GROUP = "edge-agent.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "EdgeModelDeployment"
PLURAL = "edgemodeldeployments"

OPERATORS = ("In", "NotIn", "Exists", "DoesNotExist")


class SpecError(ValueError):
    """A resource the agent cannot act on; the message goes to the resource's status."""


@dataclass(frozen=True)
class Requirement:
    key: str
    operator: str
    values: tuple[str, ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        if self.operator == "Exists":
            return self.key in labels
        if self.operator == "DoesNotExist":
            return self.key not in labels
        if self.operator == "In":
            return self.key in labels and labels[self.key] in self.values
        return self.key not in labels or labels[self.key] not in self.values  # NotIn, as Kubernetes has it


@dataclass(frozen=True)
class NodeSelector:
    """A Kubernetes LabelSelector; the empty selector selects every node, as in Kubernetes."""

    match_labels: tuple[tuple[str, str], ...] = ()
    expressions: tuple[Requirement, ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        return all(labels.get(k) == v for k, v in self.match_labels) and all(
            r.matches(labels) for r in self.expressions
        )

    @classmethod
    def parse(cls, doc: Any) -> NodeSelector:
        if doc is None:
            return cls()
        if not isinstance(doc, dict):
            raise SpecError("spec.nodeSelector must be an object with matchLabels and/or matchExpressions")
        labels = doc.get("matchLabels") or {}
        if not isinstance(labels, dict) or not all(isinstance(v, str) for v in labels.values()):
            raise SpecError("spec.nodeSelector.matchLabels must map label keys to string values")
        expressions = []
        for i, expr in enumerate(doc.get("matchExpressions") or []):
            where = f"spec.nodeSelector.matchExpressions[{i}]"
            if not isinstance(expr, dict) or not isinstance(expr.get("key"), str):
                raise SpecError(f"{where} needs a key")
            operator, values = expr.get("operator"), expr.get("values") or []
            if operator not in OPERATORS:
                raise SpecError(f"{where}.operator must be one of {', '.join(OPERATORS)}, got {operator!r}")
            if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
                raise SpecError(f"{where}.values must be a list of strings")
            if operator in ("In", "NotIn") and not values:
                raise SpecError(f"{where}: operator {operator} needs values")
            if operator in ("Exists", "DoesNotExist") and values:
                raise SpecError(f"{where}: operator {operator} takes no values")
            expressions.append(Requirement(expr["key"], operator, tuple(values)))
        return cls(tuple(sorted(labels.items())), tuple(expressions))


@dataclass(frozen=True)
class Resource:
    """One EdgeModelDeployment as the agent uses it."""

    namespace: str
    name: str
    uid: str
    generation: int
    created: str  # RFC 3339; the oldest resource wins a conflict
    resource_version: str
    selector: NodeSelector | None  # None when unreadable: then no node can tell it is meant
    deployment: ModelDeployment | None  # None when the spec is unusable (see ``error``)
    error: str | None = None
    status_nodes: dict[str, Any] = field(default_factory=dict, compare=False)

    def selects(self, labels: Mapping[str, str]) -> bool:
        return self.selector is not None and self.selector.matches(labels)

    @property
    def key(self) -> tuple[str, str]:
        return self.namespace, self.name

    @property
    def ident(self) -> str:
        return f"{self.namespace}/{self.name}"

    def object_ref(self) -> dict[str, Any]:
        """The ``involvedObject`` of an Event about this resource."""
        return {
            "apiVersion": API_VERSION,
            "kind": KIND,
            "namespace": self.namespace,
            "name": self.name,
            "uid": self.uid,
            "resourceVersion": self.resource_version,
        }


class _ResourceBase(TypedDict):
    """The fields of a Resource read from its metadata and status, whatever its spec says."""

    namespace: str
    name: str
    uid: str
    generation: int
    created: str
    resource_version: str
    status_nodes: dict[str, Any]


def parse_resource(obj: Mapping[str, Any]) -> Resource:
    """Any object from the API to a Resource; a bad spec becomes ``Resource.error``, never an exception."""
    meta = obj.get("metadata") or {}
    status = obj.get("status") or {}
    nodes = status.get("nodes") if isinstance(status, dict) else None
    base: _ResourceBase = {
        "namespace": str(meta.get("namespace") or ""),
        "name": str(meta.get("name") or ""),
        "uid": str(meta.get("uid") or ""),
        "generation": int(meta.get("generation") or 0),
        "created": str(meta.get("creationTimestamp") or ""),
        "resource_version": str(meta.get("resourceVersion") or ""),
        "status_nodes": dict(nodes) if isinstance(nodes, dict) else {},
    }
    spec = obj.get("spec")
    try:
        if not isinstance(spec, dict):
            raise SpecError("spec is missing")
        selector = NodeSelector.parse(spec.get("nodeSelector"))
    except SpecError as exc:
        return Resource(selector=None, deployment=None, error=str(exc), **base)
    try:
        return Resource(selector=selector, deployment=parse_deployment(spec), **base)
    except SpecError as exc:
        return Resource(selector=selector, deployment=None, error=str(exc), **base)


def parse_deployment(spec: Mapping[str, Any]) -> ModelDeployment:
    model = spec.get("model")
    if not isinstance(model, str) or not NAME_RE.match(model):
        raise SpecError(f"spec.model must be a model name matching {NAME_RE.pattern}, got {model!r}")
    image, version = spec.get("image"), spec.get("version")
    if (image is None) == (version is None):
        raise SpecError("spec needs exactly one of image (an OCI reference) or version (a version in the node's store)")
    if image is not None:
        if not isinstance(image, str) or not image.strip() or any(c.isspace() for c in image):
            raise SpecError(f"spec.image must be an OCI reference (name:tag or name@sha256:...), got {image!r}")
        ref = image
    else:
        if not isinstance(version, str) or not VERSION_RE.match(version):
            raise SpecError(f"spec.version must match {VERSION_RE.pattern}, got {version!r}")
        ref = f"store:{model}:{version}"
    pinned = spec.get("pinned", False)
    if not isinstance(pinned, bool):
        raise SpecError(f"spec.pinned must be true or false, got {pinned!r}")
    return ModelDeployment(model=model, ref=ref, pinned=pinned, traffic=parse_traffic(spec.get("traffic")))


def parse_traffic(doc: Any) -> dict[str, int]:
    if doc is None:
        return {}
    if not isinstance(doc, list):
        raise SpecError("spec.traffic must be a list of {version, weight}")
    split: dict[str, int] = {}
    for i, entry in enumerate(doc):
        if not isinstance(entry, dict):
            raise SpecError(f"spec.traffic[{i}] must be an object with version and weight")
        version, weight = entry.get("version"), entry.get("weight")
        if not isinstance(version, str) or not VERSION_RE.match(version):
            raise SpecError(f"spec.traffic[{i}].version must match {VERSION_RE.pattern}, got {version!r}")
        if isinstance(weight, bool) or not isinstance(weight, int) or not 0 <= weight <= 100:
            raise SpecError(f"spec.traffic[{i}].weight must be an integer from 0 to 100, got {weight!r}")
        if version in split:
            raise SpecError(f"spec.traffic names version {version} twice")
        split[version] = weight
    if split and sum(split.values()) != 100:
        raise SpecError(f"spec.traffic weights must add up to 100, got {sum(split.values())}")
    return split


@dataclass
class Selection:
    """What the resources in the cluster ask of one node."""

    governing: dict[str, Resource] = field(default_factory=dict)  # model -> the resource that governs it here
    problems: list[tuple[Resource, str]] = field(default_factory=list)  # selecting this node, yet not applied

    def deployments(self) -> list[ModelDeployment]:
        return sorted((r.deployment for r in self.governing.values() if r.deployment), key=lambda d: d.model)


def select(resources: Iterable[Resource], labels: Mapping[str, str]) -> tuple[Selection, list[Resource]]:
    """Split resources into those selecting this node (with conflicts resolved) and the rest.

    Two resources that give the same model to the same node conflict; the
    older one (creation time, then namespace/name) governs, so adding a
    resource can never take a model away from one that already has it.
    """
    selection = Selection()
    matching: list[Resource] = []
    others: list[Resource] = []
    for res in resources:
        (matching if res.selects(labels) else others).append(res)
    for res in sorted(matching, key=lambda r: (r.created, r.namespace, r.name)):
        if res.deployment is None:
            selection.problems.append((res, f"invalid spec: {res.error}"))
            continue
        holder = selection.governing.get(res.deployment.model)
        if holder is not None:
            why = f"model {res.deployment.model} on this node is already declared by {holder.ident}, which is older"
            selection.problems.append((res, why))
            continue
        selection.governing[res.deployment.model] = res
    return selection, others

"""k3s-manifests/: valid Kubernetes 1.30 objects, a structural CRD, and in agreement with the agent.

Every object is validated with ``kubernetes-validate`` against the 1.30
schemas in strict mode (unknown fields are errors, so a typo in a field name
cannot pass). The example EdgeModelDeployments are validated against the
CRD's own openAPIV3Schema with jsonschema, and parsed by the agent's own
``agent.k8s.crd`` the same way. Where ``kubectl`` is installed, the base and
the example overlay are rendered with its built-in kustomize and the result
is validated too.
"""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
import tempfile
import tomllib
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from agent.config import Config
from agent.images.settings import TrustSettings
from agent.k8s import KubeSettings
from agent.k8s.crd import API_VERSION, GROUP, KIND, PLURAL, VERSION, parse_resource
from agent.mqtt.settings import MqttSettings

REPO = Path(__file__).resolve().parent.parent
MANIFESTS = REPO / "k3s-manifests"
BASE = MANIFESTS / "base"
OVERLAY = MANIFESTS / "overlays" / "example"
EXAMPLES = MANIFESTS / "examples" / "edgemodeldeployment.yaml"
K8S_VERSION = "1.30.0"


def load_all(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def base_objects() -> list[dict[str, Any]]:
    kustomization = yaml.safe_load((BASE / "kustomization.yaml").read_text())
    objects = []
    for name in kustomization["resources"]:
        objects.extend(load_all(BASE / name))
    return objects


def by_kind(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def kustomize(directory: Path) -> list[dict[str, Any]]:
    result = subprocess.run(
        ["kubectl", "kustomize", str(directory)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def crd_schema() -> dict[str, Any]:
    crd = by_kind(base_objects(), "CustomResourceDefinition")
    (version,) = crd["spec"]["versions"]
    return version["schema"]["openAPIV3Schema"]


def cr_errors(obj: dict[str, Any]) -> list[str]:
    validator = jsonschema.Draft7Validator(crd_schema())
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(obj)]


def validate_k8s(obj: dict[str, Any]) -> None:
    if obj.get("apiVersion") == API_VERSION:
        assert cr_errors(obj) == [], obj["metadata"]["name"]
        return
    kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


needs_kubectl = pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (with kustomize) not installed")


# -- schemas ---------------------------------------------------------------------------------


def test_every_base_object_and_example_is_valid_for_kubernetes_1_30() -> None:
    objects = base_objects() + load_all(EXAMPLES)
    assert {o["kind"] for o in objects} >= {
        "Namespace",
        "CustomResourceDefinition",
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "ConfigMap",
        "DaemonSet",
        KIND,
    }
    for obj in objects:
        validate_k8s(obj)


def test_a_typo_is_caught_by_strict_validation() -> None:
    daemonset = copy.deepcopy(by_kind(base_objects(), "DaemonSet"))
    daemonset["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}  # sic
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(daemonset, K8S_VERSION, strict=True)


@needs_kubectl
@pytest.mark.parametrize("directory", [BASE, OVERLAY], ids=["base", "overlay-example"])
def test_kustomize_renders_valid_objects(directory: Path) -> None:
    objects = kustomize(directory)
    for obj in objects:
        validate_k8s(obj)
    namespaced = [o for o in objects if o["kind"] not in ("Namespace", "CustomResourceDefinition", "ClusterRole")]
    namespaced = [o for o in namespaced if o["kind"] != "ClusterRoleBinding"]
    assert {o["metadata"]["namespace"] for o in namespaced} == {"edge-agent"}


@needs_kubectl
def test_the_overlay_changes_image_node_selection_resources_and_config() -> None:
    objects = kustomize(OVERLAY)
    pod = by_kind(objects, "DaemonSet")["spec"]["template"]["spec"]
    images = {c["image"] for c in pod["containers"] + pod["initContainers"]}
    assert images == {"registry.factory-1.example.net/edge-agent:0.1.0"}
    assert pod["nodeSelector"]["topology.kubernetes.io/zone"] == "factory-1"
    assert pod["nodeSelector"]["node-role.kubernetes.io/edge"] == "true", "the base's selector is kept"
    (agent,) = pod["containers"]
    assert agent["resources"]["limits"]["memory"] == "2Gi"
    assert agent["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready", "the patch merges, not replaces"
    config = agent_config(by_kind(objects, "ConfigMap"))
    assert config.section("mqtt")["host"] == "mqtt.factory-1.example.net"


# -- the CRD -----------------------------------------------------------------------------------


def structural_problems(schema: dict[str, Any], where: str = "", in_junctor: bool = False) -> list[str]:
    """The rules of a structural schema that apiextensions enforces and an OpenAPI validator does not."""
    problems = []
    if in_junctor:
        for key in ("type", "default", "description", "nullable", "additionalProperties"):
            if key in schema:
                problems.append(f"{where}: {key} inside oneOf/anyOf/allOf/not")
    elif "type" not in schema and not (
        schema.get("x-kubernetes-int-or-string") or schema.get("x-kubernetes-preserve-unknown-fields")
    ):
        problems.append(f"{where}: no type")
    if "additionalProperties" in schema and "properties" in schema:
        problems.append(f"{where}: properties and additionalProperties together")
    for name, sub in (schema.get("properties") or {}).items():
        problems += structural_problems(sub, f"{where}.{name}", in_junctor)
    if isinstance(schema.get("additionalProperties"), dict):
        problems += structural_problems(schema["additionalProperties"], f"{where}.*", in_junctor)
    if "items" in schema:
        problems += structural_problems(schema["items"], f"{where}[]", in_junctor)
        keys = schema.get("x-kubernetes-list-map-keys") or []
        missing = set(keys) - set(schema["items"].get("required") or [])
        if missing:
            problems.append(f"{where}: list-map keys {sorted(missing)} must be required")
    for junctor in ("oneOf", "anyOf", "allOf"):
        for i, sub in enumerate(schema.get(junctor) or []):
            problems += structural_problems(sub, f"{where}.{junctor}[{i}]", True)
    if "not" in schema:
        problems += structural_problems(schema["not"], f"{where}.not", True)
    return problems


def test_the_crd_is_structural_and_names_what_the_agent_watches() -> None:
    crd = by_kind(base_objects(), "CustomResourceDefinition")
    spec = crd["spec"]
    assert crd["metadata"]["name"] == f"{PLURAL}.{GROUP}"
    assert (spec["group"], spec["names"]["plural"], spec["names"]["kind"]) == (GROUP, PLURAL, KIND)
    (version,) = spec["versions"]
    assert version["name"] == VERSION and version["served"] and version["storage"]
    assert version["subresources"] == {"status": {}}, "nodes write status through /status only"
    schema = version["schema"]["openAPIV3Schema"]
    assert structural_problems(schema) == []
    properties = schema["properties"]["spec"]["properties"]
    assert {"model", "image", "version", "nodeSelector", "traffic", "pinned"} <= set(properties)
    node_entry = schema["properties"]["status"]["properties"]["nodes"]["additionalProperties"]["properties"]
    # Everything a node writes must be in the schema, or the API server prunes it.
    assert set(node_entry) == {"version", "serving", "lastError", "observedGeneration", "updated"}


def test_examples_match_the_crd_and_the_agent_reads_them_the_same_way() -> None:
    examples = load_all(EXAMPLES)
    assert len(examples) >= 2
    for obj in examples:
        assert cr_errors(obj) == []
        resource = parse_resource(obj)
        assert resource.error is None, resource.error
        assert resource.deployment is not None and resource.deployment.model == obj["spec"]["model"]
    detector, digits = examples
    assert "@sha256:" in parse_resource(detector).deployment.ref
    assert parse_resource(detector).selects(
        {"node-role.kubernetes.io/edge": "true", "topology.kubernetes.io/zone": "factory-1"}
    )
    assert not parse_resource(detector).selects({"node-role.kubernetes.io/edge": "true"})
    split = parse_resource(digits).deployment
    assert split.traffic == {"1": 90, "2": 10} and split.pinned


def spec_cr(**spec: Any) -> dict[str, Any]:
    return {"apiVersion": API_VERSION, "kind": KIND, "metadata": {"name": "x", "namespace": "n"}, "spec": spec}


@pytest.mark.parametrize(
    ("spec", "why"),
    [
        ({"model": "m", "image": "r/m:1", "version": "1"}, "both image and version"),
        ({"model": "m"}, "neither image nor version"),
        ({"model": "M!", "version": "1"}, "model name"),
        ({"model": "m", "image": "has space"}, "image reference"),
        ({"model": "m", "version": "1", "traffic": [{"version": "1", "weight": 101}]}, "weight over 100"),
        ({"model": "m", "version": "1", "pinned": "yes"}, "pinned not a boolean"),
        (
            {"model": "m", "version": "1", "nodeSelector": {"matchExpressions": [{"key": "k", "operator": "Near"}]}},
            "unknown operator",
        ),
    ],
)
def test_bad_resources_are_refused_by_the_schema_and_by_the_agent(spec: dict[str, Any], why: str) -> None:
    obj = spec_cr(**spec)
    assert cr_errors(obj), f"the CRD schema accepts {why}"
    assert parse_resource(obj).error, f"the agent accepts {why}"


# -- the agent's objects ------------------------------------------------------------------------


def agent_config(configmap: dict[str, Any]) -> Config:
    """The ConfigMap's config.toml as the agent in the pod loads it."""
    text = configmap["data"]["config.toml"]
    tomllib.loads(text)
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "config.toml"
        path.write_text(text)
        return Config.load(file=path, env={})


def daemonset_pod() -> dict[str, Any]:
    return by_kind(base_objects(), "DaemonSet")["spec"]["template"]["spec"]


def test_the_cluster_role_allows_exactly_what_the_agent_does() -> None:
    role = by_kind(base_objects(), "ClusterRole")
    rules = {
        (group, resource): sorted(rule["verbs"])
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
    }
    assert rules == {
        (GROUP, PLURAL): ["get", "list", "watch"],
        (GROUP, f"{PLURAL}/status"): ["patch"],
        ("", "events"): ["create"],
        ("", "nodes"): ["get"],
    }
    assert not any("*" in str(rule) for rule in role["rules"])
    binding = by_kind(base_objects(), "ClusterRoleBinding")
    account = by_kind(base_objects(), "ServiceAccount")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": account["metadata"]["name"], "namespace": account["metadata"]["namespace"]}
    ]
    assert daemonset_pod()["serviceAccountName"] == account["metadata"]["name"]


def test_the_daemonset_runs_the_agent_as_configured() -> None:
    pod = daemonset_pod()
    (agent,) = pod["containers"]
    config = agent_config(by_kind(base_objects(), "ConfigMap"))
    # Downward API: the node name the watcher selects by and reports under.
    env = {e["name"]: e for e in agent["env"]}
    assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    settings = KubeSettings.from_config(config, env={"NODE_NAME": "edge-7", "KUBERNETES_SERVICE_HOST": "10.43.0.1"})
    assert settings.enabled and settings.mode == "in-cluster" and settings.node_name == "edge-7"
    # The state directory is on the node's disk, where the config puts it.
    mounts = {m["name"]: m for m in agent["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    state = next(m for m in agent["volumeMounts"] if "hostPath" in volumes[m["name"]])
    assert Path(state["mountPath"]) == config.state_dir
    assert not state.get("readOnly")
    # Probes hit the agent's health endpoints on the port it listens on.
    port = next(p for p in agent["ports"] if p["name"] == "http")["containerPort"]
    host, listen_port = config.host_port
    assert listen_port == port and host == "0.0.0.0", "probes come from the kubelet, not loopback"
    assert agent["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert agent["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert agent["readinessProbe"]["httpGet"]["port"] in ("http", port)
    # The gRPC API on the port the pod declares, for clients and grpc probes.
    grpc_port = next(p for p in agent["ports"] if p["name"] == "grpc")["containerPort"]
    assert config.grpc_host_port == ("0.0.0.0", grpc_port)
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(agent["resources"][kind]), kind
    assert pod["nodeSelector"]["node-role.kubernetes.io/edge"] == "true"
    assert any(t["key"] == "node-role.kubernetes.io/edge" for t in pod["tolerations"])
    # Non-root, no privilege: the wasm JIT needs none.
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    security = agent["securityContext"]
    assert security["allowPrivilegeEscalation"] is False and security["capabilities"]["drop"] == ["ALL"]
    assert security["readOnlyRootFilesystem"] is True
    # Graceful stop: longer than the agent's drain.
    assert pod["terminationGracePeriodSeconds"] > config.drain_timeout_s
    # Secrets are referenced, never inlined.
    secret_refs = {
        e["valueFrom"]["secretKeyRef"]["name"] for e in agent["env"] if "secretKeyRef" in e.get("valueFrom", {})
    }
    secret_volumes = {v["secret"]["secretName"] for v in pod["volumes"] if "secret" in v}
    assert {"edge-agent-mqtt", "edge-agent-api"} <= secret_refs
    assert {"edge-agent-trust", "edge-agent-mqtt"} <= secret_volumes
    assert all(mounts[name]["readOnly"] for name in ("config", "trust", "mqtt"))
    assert not [o for o in base_objects() if o["kind"] == "Secret"], "no secret material in the manifests"


@needs_kubectl
def test_files_the_overlay_config_names_are_where_the_daemonset_mounts_secrets() -> None:
    objects = kustomize(OVERLAY)
    pod = by_kind(objects, "DaemonSet")["spec"]["template"]["spec"]
    (agent,) = pod["containers"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    secret_dirs = {Path(m["mountPath"]) for m in agent["volumeMounts"] if "secret" in volumes[m["name"]]}
    config = agent_config(by_kind(objects, "ConfigMap"))
    trust = TrustSettings.from_config(config)
    mqtt = MqttSettings.from_config(config)
    files = [Path(p) for p in trust.keys.values()]
    files += [p for p in (mqtt.ca_file, mqtt.password_file) if p is not None] + list(mqtt.fleet_keys)
    assert files
    for file in files:
        assert file.parent in secret_dirs, f"{file} is not in a mounted Secret"
    assert KubeSettings.from_config(config, env={"NODE_NAME": "n"}).namespace == "edge-agent"


def test_the_containerfile_installs_only_the_wheel_and_runs_unprivileged() -> None:
    text = (MANIFESTS / "Containerfile").read_text()
    stages = re.split(r"(?m)^FROM ", text)[1:]
    assert len(stages) == 3, "a build stage, a runtime stage and the flattened image"
    runtime, final = stages[1], stages[2]
    user = re.search(r"(?m)^USER (\S+)", final)
    assert user and user.group(1).split(":")[0] not in ("0", "root")
    uid = int(user.group(1).split(":")[0])
    assert daemonset_pod()["securityContext"]["runAsUser"] == uid
    # Nothing from the source tree reaches the runtime image: only wheels, offline.
    assert not re.search(r"(?m)^(COPY|ADD) ", runtime)
    assert "--no-index" in runtime and "from=build" in runtime
    assert final.startswith("scratch")
    assert re.findall(r"(?m)^(?:COPY|ADD) .*", final) == ["COPY --from=runtime /rootfs /"]
    assert re.search(r"(?m)^ENTRYPOINT \[\"edge-agent\"\]", final)
    assert re.search(r"(?m)^HEALTHCHECK .*/v2/health/ready", final.replace("\\\n", ""))

"""Tests for the Kubernetes manifests (`deploy/kubernetes/`): offline schema validation and cross-references.

`kubernetes-validate` ships the Kubernetes JSON schemas of each release, so validation needs no cluster
and no network. Strict mode rejects unknown fields, which is how a misspelt key (`hostPid`) is caught.
The schema cannot see the references between objects and into the agent's config, so the other tests
check those: ports, names, volumes, the node-name variable and the embedded agent.yaml.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent.config import load_config
from agent.errors import ConfigError

kubernetes_validate = pytest.importorskip(
    "kubernetes_validate", reason="kubernetes-validate is not installed (pip install kubernetes-validate==1.37.0)"
)

MANIFESTS = Path(__file__).resolve().parents[2] / "deploy" / "kubernetes"
# The oldest release the DaemonSet supports (securityContext.appArmorProfile is 1.30+), and the newest
# the installed package ships.
VERSIONS = ("1.30.0", kubernetes_validate.latest_version())
METRICS_PORT = 9464


def documents(name: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all((MANIFESTS / name).read_text()) if doc]


def kustomization() -> dict[str, Any]:
    return documents("kustomization.yaml")[0]


def only(name: str) -> dict[str, Any]:
    (doc,) = documents(name)
    return doc


def pod_spec() -> dict[str, Any]:
    spec: dict[str, Any] = only("daemonset.yaml")["spec"]["template"]["spec"]
    return spec


def container() -> dict[str, Any]:
    containers: list[dict[str, Any]] = pod_spec()["containers"]
    assert len(containers) == 1
    return containers[0]


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("name", ["daemonset.yaml", "configmap.yaml", "serviceaccount.yaml"])
def test_manifest_is_valid_against_the_kubernetes_schema(name: str, version: str) -> None:
    for doc in documents(name):
        kubernetes_validate.validate(doc, version, strict=True)


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        (("spec", "template", "spec", "hostPid"), True, "hostPid"),
        (("spec", "template", "spec", "containers", 0, "ports", 0, "containerPort"), "9464", "integer"),
    ],
    ids=["misspelt field", "wrong type"],
)
def test_strict_validation_catches_mistakes(path: tuple[str | int, ...], value: Any, message: str) -> None:
    broken = copy.deepcopy(only("daemonset.yaml"))
    node: Any = broken
    for step in path[:-1]:
        node = node[step]
    node[path[-1]] = value
    with pytest.raises(kubernetes_validate.ValidationError, match=message):
        kubernetes_validate.validate(broken, VERSIONS[0], strict=True)


def test_kustomization_lists_every_manifest() -> None:
    listed = set(kustomization()["resources"])
    assert listed == {p.name for p in MANIFESTS.glob("*.yaml")} - {"kustomization.yaml"}


def test_daemonset_runs_in_the_host_pid_namespace_on_every_node() -> None:
    spec = pod_spec()
    assert spec["hostPID"] is True
    assert {"operator": "Exists"} in spec["tolerations"]
    assert spec["priorityClassName"] == "system-node-critical"


def test_names_refer_to_the_objects_shipped_alongside() -> None:
    spec = pod_spec()
    assert spec["serviceAccountName"] == only("serviceaccount.yaml")["metadata"]["name"]
    config_volume = next(v for v in spec["volumes"] if "configMap" in v)
    assert config_volume["configMap"]["name"] == only("configmap.yaml")["metadata"]["name"]
    image = container()["image"]
    assert image in {entry["name"] for entry in kustomization()["images"]}


def test_every_mount_has_a_volume_and_every_volume_is_mounted() -> None:
    volumes = {v["name"] for v in pod_spec()["volumes"]}
    mounts = {m["name"] for m in container()["volumeMounts"]}
    assert volumes == mounts


def test_host_mounts_are_read_only() -> None:
    host_volumes = {v["name"] for v in pod_spec()["volumes"] if "hostPath" in v}
    assert host_volumes
    for mount in container()["volumeMounts"]:
        if mount["name"] in host_volumes:
            assert mount.get("readOnly") is True, mount


def test_node_name_comes_from_the_downward_api() -> None:
    env = {e["name"]: e for e in container()["env"]}
    assert env["PROFILING_AGENT_NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"


def test_probes_and_scrape_annotations_use_the_metrics_port() -> None:
    agent = container()
    ports = {p["name"]: p["containerPort"] for p in agent["ports"]}
    assert ports["metrics"] == METRICS_PORT
    for probe, path in (("startupProbe", "/healthz"), ("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        assert agent[probe]["httpGet"] == {"path": path, "port": "metrics"}
    annotations = only("daemonset.yaml")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == METRICS_PORT


def test_agent_config_listens_on_all_interfaces_and_writes_to_the_state_volume() -> None:
    config = yaml.safe_load(only("configmap.yaml")["data"]["agent.yaml"])
    assert config["metrics"]["address"] == f"0.0.0.0:{METRICS_PORT}"
    state = next(m for m in container()["volumeMounts"] if m["name"] == "state")
    assert config["export"]["files"]["output_dir"].startswith(state["mountPath"] + "/")


def test_container_args_point_at_the_mounted_config() -> None:
    args = container()["args"]
    config_mount = next(m for m in container()["volumeMounts"] if m["name"] == "config")
    assert args[:2] == ["run", "--config"]
    assert args[2] == config_mount["mountPath"] + "/agent.yaml"
    assert "agent.yaml" in only("configmap.yaml")["data"]


def test_embedded_agent_config_loads(tmp_path: Path) -> None:
    path = tmp_path / "agent.yaml"
    path.write_text(only("configmap.yaml")["data"]["agent.yaml"])
    try:
        load_config(str(path), environ={})
    except ConfigError as e:
        pytest.fail(f"the ConfigMap's agent.yaml is refused: {e}")

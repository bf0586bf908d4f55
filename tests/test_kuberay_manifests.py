"""The shipped KubeRay manifests have auth on: every Ray container takes the token from the Secret,
and NetworkPolicies admit only the cluster's own pods (plus submitters on the head's Jobs/client ports)."""
from __future__ import annotations

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
KUBERAY = ROOT / "cluster" / "kuberay"
SUBMIT_PORTS = {8265, 10001}  # dashboard / Jobs API, Ray client


def _documents() -> list[dict]:
    return [d for p in sorted(KUBERAY.glob("*.yaml")) for d in yaml.safe_load_all(p.read_text()) if d]


def _raycluster() -> dict:
    (cluster,) = [d for d in _documents() if d["kind"] == "RayCluster"]
    return cluster


def _containers(cluster: dict) -> list[dict]:
    spec = cluster["spec"]
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


def test_every_ray_container_takes_token_auth_from_the_secret():
    secrets = set()
    for container in _containers(_raycluster()):
        env = {e["name"]: e for e in container.get("env", [])}
        assert env["RAY_AUTH_MODE"]["value"] == "token", container["name"]
        ref = env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]
        assert "value" not in env["RAY_AUTH_TOKEN"]  # never a literal token in the manifest
        secrets.add((ref["name"], ref["key"]))
    assert secrets == {("segrl-ray-auth", "auth_token")}


def test_network_policies_admit_only_the_cluster_and_submitters():
    name = _raycluster()["metadata"]["name"]
    policies = [d for d in _documents() if d["kind"] == "NetworkPolicy"]
    selected = {p["spec"]["podSelector"]["matchLabels"]["ray.io/node-type"]: p for p in policies}
    assert set(selected) == {"head", "worker"}
    for node_type, policy in selected.items():
        spec = policy["spec"]
        assert spec["podSelector"]["matchLabels"]["ray.io/cluster"] == name
        assert "Ingress" in spec["policyTypes"]
        for rule in spec["ingress"]:
            assert rule.get("from"), f"{node_type}: a rule open to every source"
            own = all(s.get("podSelector", {}).get("matchLabels") == {"ray.io/cluster": name} for s in rule["from"])
            if not own:  # only the head, only its submit ports, only labelled pods of the namespace
                assert node_type == "head"
                assert {p["port"] for p in rule["ports"]} <= SUBMIT_PORTS
                assert all(set(s) == {"podSelector"} for s in rule["from"])


def test_readme_shows_how_to_submit_with_the_token():
    readme = (ROOT / "README.md").read_text()
    assert "kubectl create secret generic segrl-ray-auth" in readme
    assert "export RAY_AUTH_TOKEN=" in readme and "export RAY_AUTH_MODE=token" in readme
    assert "ray job submit --address http://HEAD:8265" in readme

"""The shipped RayService serves segrl: its Serve config is what `segrl serve-config` writes for the
command its annotation names, builds segrl's application, reads from the volume and fits its pods; the
NetworkPolicies of networkpolicy-serve.yaml select its pods by labels KubeRay gives them and open its Serve port.
(Strict schema validation of every manifest, this one included: tests/test_kuberay_manifests.py.)"""
from __future__ import annotations

import copy
import importlib
import re
import shlex
from pathlib import Path

import pytest
import yaml
from test_kuberay_manifests import (
    KUBERAY,
    PAPER,
    ROOT,
    _at,
    _containers,
    _file_documents,
    _ids,
    _mounts,
    _raycluster,
    _services,
)

from cluster.placement import raycluster_nodes, raycluster_spec
from config import Config
from pipelines.cli import build_parser

# --- the RayService serves segrl: its Serve config is segrl's own and fits its pods ------------------------

SERVE_CONFIG_COMMAND = "segrl.io/serve-config"
"""The annotation naming the `segrl serve-config` command whose output the manifest's serveConfigV2 is."""


def serve_config_command(service: dict) -> list[str]:
    words = shlex.split(service["metadata"]["annotations"][SERVE_CONFIG_COMMAND])
    assert words[:2] == ["segrl", "serve-config"], words
    return words[1:]


def embedded_serve_config(service: dict) -> dict:
    from ray.serve.schema import ServeDeploySchema

    serve_cfg = yaml.safe_load(service["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(serve_cfg)  # what the dashboard's Serve API takes
    return serve_cfg


def test_a_rayservice_is_shipped_and_names_how_its_serve_config_was_made():
    (service,) = _services()
    args = build_parser().parse_args(serve_config_command(service))
    assert args.command == "serve-config" and args.config in PAPER and args.output is None


def as_replicas_read_it(serve_cfg: dict) -> dict:
    """The Serve config with its segrl config as the replicas see it (validated: a key added to segrl since,
    with its default, reads the same; a renamed or removed one fails, as it would in the replicas)."""
    serve_cfg = copy.deepcopy(serve_cfg)
    for app in serve_cfg["applications"]:
        app["args"]["config"] = Config.model_validate(app["args"]["config"]).model_dump(mode="json")
    return serve_cfg


@pytest.mark.parametrize("service", _services(), ids=_ids)
def test_serve_config_is_what_segrl_serve_config_writes(service, capsys):
    """In sync: the command of the annotation, run here, writes the embedded config (its paths are the
    pods' /data, absolute, so they read the same here)."""
    from pipelines.cli import main

    assert main(serve_config_command(service)) == 0
    written = yaml.safe_load(capsys.readouterr().out)
    assert as_replicas_read_it(embedded_serve_config(service)) == as_replicas_read_it(written), \
        f"serveConfigV2 is stale: paste the output of `{service['metadata']['annotations'][SERVE_CONFIG_COMMAND]}`"


def _application(service: dict) -> dict:
    (app,) = embedded_serve_config(service)["applications"]
    return app


@pytest.mark.parametrize("service", _services(), ids=_ids)
def test_import_path_builds_the_deployments_the_config_sets(service):
    """The import path resolves to a callable application builder, which builds, from the config's own
    args, exactly the deployments the config sets options for, with the ingress first."""
    from ray.serve._private.build_app import build_app

    app = _application(service)
    module, _, attribute = app["import_path"].partition(":")
    builder = getattr(importlib.import_module(module), attribute)
    assert callable(builder)
    built = build_app(builder(app["args"]), name=app["name"])
    assert {d.name for d in built.deployments} == {d["name"] for d in app["deployments"]}
    assert built.ingress_deployment_name == app["deployments"][0]["name"] == "ingress"


@pytest.mark.parametrize("service", _services(), ids=_ids)
def test_the_served_files_live_on_the_volume_and_the_proxy_listens_on_the_pod(service):
    spec = raycluster_spec(service)
    (root,) = {path for c in _containers(service) for path, name in _mounts(c).items() if name == "data"}
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    assert {v["persistentVolumeClaim"]["claimName"] for g in groups for v in g["template"]["spec"]["volumes"]
            } == {"segrl-data"}
    assert all(_mounts(c).get(root) == "data" for c in _containers(service))
    serve_cfg, app = embedded_serve_config(service), _application(service)
    config = Config.model_validate(app["args"]["config"])  # what the replicas run with
    model_dirs = {d["user_config"]["model_dir"] for d in app["deployments"] if "model_dir" in d["user_config"]}
    for path in (*model_dirs, config.paths.work_dir, config.model.sam.checkpoint):
        assert Path(path).is_relative_to(root), path
    assert len(model_dirs) == 1 and serve_cfg["http_options"]["host"] == "0.0.0.0"


def replica_demands(serve_cfg: dict, at: str) -> list[dict[str, float]]:
    """Every replica's {"GPU", "CPU"} with each deployment at its ``min_replicas`` or ``max_replicas``
    (a fixed ``num_replicas`` at both)."""
    out = []
    for d in serve_cfg["applications"][0]["deployments"]:
        count = d["autoscaling_config"][at] if "autoscaling_config" in d else d["num_replicas"]
        options = d["ray_actor_options"]
        out += [{"GPU": options["num_gpus"], "CPU": options["num_cpus"]}] * count
    return out


def pack(demands: list[dict[str, float]], nodes) -> str | None:
    """None when the replicas fit the nodes (largest first, each onto the first node with room), else
    the first that does not."""
    free = [{"GPU": n.gpus, "CPU": n.cpus} for n in nodes]
    for need in sorted(demands, key=lambda d: (-d["GPU"], -d["CPU"])):
        room = [f for f in free if all(f[r] >= need[r] - 1e-9 for r in need)]
        if not room:
            return f"a replica needing {need} does not fit ({len(demands)} replicas on {len(nodes)} nodes)"
        for r in need:
            room[0][r] -= need[r]
    return None


@pytest.mark.parametrize("service", _services(), ids=_ids)
def test_serve_replicas_fit_the_pods_at_the_start_and_at_max_replicas(service):
    """The fewest replicas fit the pods KubeRay starts; the most Serve's autoscaling asks for fit the
    pods at maxReplicas; the head (num-cpus 0) takes none."""
    serve_cfg, spec = embedded_serve_config(service), raycluster_spec(service)
    assert raycluster_nodes(_at(spec, "replicas"))[0].cpus == 0
    assert pack(replica_demands(serve_cfg, "min_replicas"), raycluster_nodes(_at(spec, "replicas"))) is None
    assert pack(replica_demands(serve_cfg, "max_replicas"), raycluster_nodes(_at(spec, "maxReplicas"))) is None


def test_the_packing_refuses_what_the_pods_lack():
    """The check above fails for a replica asking a GPU on CPU pods, or more CPUs than a pod has, and for
    more replicas than the pods hold together."""
    (service,) = _services()
    nodes = raycluster_nodes(_at(raycluster_spec(service), "maxReplicas"))
    pod = max(n.cpus for n in nodes)
    assert pack([{"GPU": 1.0, "CPU": 1.0}], nodes) is not None
    assert pack([{"GPU": 0.0, "CPU": pod + 1}], nodes) is not None
    assert pack([{"GPU": 0.0, "CPU": pod}] * (len(nodes) - 1), nodes) is None  # the head has no CPUs
    assert pack([{"GPU": 0.0, "CPU": pod}] * len(nodes), nodes) is not None


def test_readme_shows_how_to_serve_on_kubernetes():
    readme = (ROOT / "README.md").read_text()
    assert "kubectl apply -f cluster/kuberay/rayservice.yaml" in readme
    assert "segrl serve-config --config configs/llava15-7b-reasonseg.yaml" in readme


# --- NetworkPolicies: networkpolicy-serve.yaml selects the RayService's pods and opens its Serve port --------

SERVE_POLICIES = "networkpolicy-serve.yaml"
KUBERAY_PROTECTED = {"ray.io/node-type", "ray.io/group", "ray.io/cluster"}  # a template cannot set these


def kuberay_pod_labels(doc: dict, cluster: str, group: dict | None, serving: bool = False) -> dict[str, str]:
    """The labels KubeRay puts on a pod of ``doc``'s cluster, named ``cluster``: the head's when ``group`` is
    None, else a pod of that worker group's. KubeRay ray-operator/controllers/ray/common/pod.go: labelPod
    (from DefaultHeadPodTemplate / DefaultWorkerPodTemplate) sets the keys below and copies the pod template's
    labels over them except ray.io/node-type, ray.io/group and ray.io/cluster; BuildPod adds ray.io/serve to a
    RayService's pods, "true" on workers, "false" on the head until the operator finds its proxy healthy
    (``serving``; rayservice_controller.go: updateHeadPodServeLabel). The ray.io/originated-from-cr-name/-crd
    labels go on the RayCluster object only (rayservice_controller.go: constructRayClusterForRayService), not
    on its pods."""
    spec = raycluster_spec(doc)
    node_type = "head" if group is None else "worker"
    template = (spec["headGroupSpec"] if group is None else group)["template"]
    labels = {"ray.io/is-ray-node": "yes", "ray.io/cluster": cluster, "ray.io/node-type": node_type,
              "ray.io/group": "headgroup" if group is None else group["groupName"],
              "ray.io/identifier": f"{cluster}-{node_type}",
              "app.kubernetes.io/name": "kuberay", "app.kubernetes.io/created-by": "kuberay-operator"}
    template_labels = template.get("metadata", {}).get("labels", {})
    labels.update({k: v for k, v in template_labels.items() if k not in KUBERAY_PROTECTED})
    if doc["kind"] == "RayService":
        labels["ray.io/serve"] = "true" if group is not None or serving else "false"
    return labels


def kuberay_pods(doc: dict, cluster: str, serving: bool = False) -> dict[str, dict[str, str]]:
    """{"head" or the worker group's name: its pods' labels} of ``doc``'s cluster named ``cluster``."""
    groups = raycluster_spec(doc)["workerGroupSpecs"]
    return {"head": kuberay_pod_labels(doc, cluster, None, serving),
            **{g["groupName"]: kuberay_pod_labels(doc, cluster, g) for g in groups}}


def service_clusters(service: dict) -> list[str]:
    """Two names KubeRay could give the service's clusters (<name>-raycluster-<5 random characters>, a new one
    at each upgrade): the policies must hold for any."""
    return [f"{service['metadata']['name']}-raycluster-{suffix}" for suffix in ("x7k2p", "q9m4z")]


def selects(selector: dict, labels: dict[str, str]) -> bool:
    assert set(selector) == {"matchLabels"}, selector  # the policies here use matchLabels only
    return selector["matchLabels"].items() <= labels.items()


def serve_policies() -> dict[str, dict]:
    policies = _file_documents(SERVE_POLICIES)
    assert {p["kind"] for p in policies} == {"NetworkPolicy"}
    return {p["metadata"]["name"]: p for p in policies}


def selected(policy: dict, pods: dict[str, dict[str, str]]) -> set[str]:
    return {name for name, labels in pods.items() if selects(policy["spec"]["podSelector"], labels)}


def own_pods_rule(rule: dict) -> dict | None:
    """The rule's pod selector when it admits, on every port, pods of this namespace chosen by one selector."""
    if "ports" in rule or len(rule["from"]) != 1 or set(rule["from"][0]) != {"podSelector"}:
        return None
    return rule["from"][0]["podSelector"]


def test_kuberay_pod_labels_match_a_rayservice_head_pod_seen_in_a_cluster():
    """The rule above against the labels of a RayService's head pod as `kubectl describe` showed them
    (ray-project/kuberay issue #3133, KubeRay v1.3.0): nothing more, nothing less."""
    sample = {"kind": "RayService", "spec": {"rayClusterConfig": {
        "headGroupSpec": {"template": {"spec": {}}}, "workerGroupSpecs": []}}}
    assert kuberay_pod_labels(sample, "rayservice-sample-raycluster-vpjz2", None) == {
        "app.kubernetes.io/created-by": "kuberay-operator", "app.kubernetes.io/name": "kuberay",
        "ray.io/cluster": "rayservice-sample-raycluster-vpjz2", "ray.io/group": "headgroup",
        "ray.io/identifier": "rayservice-sample-raycluster-vpjz2-head", "ray.io/is-ray-node": "yes",
        "ray.io/node-type": "head", "ray.io/serve": "false"}


def another_service(service: dict) -> dict:
    """Someone else's RayService in the namespace: another name, pod templates without segrl's labels."""
    other = copy.deepcopy(service)
    other["metadata"]["name"] = "other-serve"
    spec = raycluster_spec(other)
    for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
        group["template"].pop("metadata", None)
    return other


@pytest.mark.parametrize("service", _services(), ids=_ids)
def test_the_serve_policies_select_the_services_pods_whatever_its_clusters_are_named(service):
    """Under any generated cluster name, the head serving or not yet, the head policy selects the head only, the
    workers policy every worker only, and the own-pods rules admit every pod of the service (of the old and the
    new cluster of an upgrade alike); none of them selects or admits a pod of the RayCluster `segrl` or of
    another RayService, and networkpolicy.yaml's policies select none of the service's pods."""
    policies = serve_policies()
    assert set(policies) == {"segrl-serve-head", "segrl-serve-workers", "segrl-serve-http"}
    clusters = [kuberay_pods(service, name, serving) for name in service_clusters(service) for serving in (False, True)]
    every = [labels for pods in clusters for labels in pods.values()]
    other = another_service(service)
    foreign = [*kuberay_pods(_raycluster(), _raycluster()["metadata"]["name"]).values(),
               *[labels for serving in (False, True) for name in service_clusters(other)
                 for labels in kuberay_pods(other, name, serving).values()]]
    for pods in clusters:
        workers = set(pods) - {"head"}
        assert workers and selected(policies["segrl-serve-head"], pods) == {"head"}
        assert selected(policies["segrl-serve-workers"], pods) == workers
        assert selected(policies["segrl-serve-http"], pods) == set(pods)
        for policy in _file_documents("networkpolicy.yaml"):
            assert selected(policy, pods) == set()
    for policy in policies.values():
        assert not any(selects(policy["spec"]["podSelector"], labels) for labels in foreign)
    for name in ("segrl-serve-head", "segrl-serve-workers"):
        spec = policies[name]["spec"]
        assert spec["policyTypes"] == ["Ingress"]
        (own,) = [s for s in map(own_pods_rule, spec["ingress"]) if s is not None]
        assert all(selects(own, labels) for labels in every)
        assert not any(selects(own, labels) for labels in foreign)


def serve_port(service: dict) -> int:
    """Where Serve's HTTP proxy listens (http_options.port, Serve's default 8000): it must be the head
    container's port named "serve", or 8000 when it names none, which is the port KubeRay's serve Service
    forwards to and its proxy health check calls (common/service.go getServicePorts, utils.DefaultServingPort)."""
    port = embedded_serve_config(service).get("http_options", {}).get("port", 8000)
    head = raycluster_spec(service)["headGroupSpec"]["template"]["spec"]["containers"][0]
    named = {p["name"]: p["containerPort"] for p in head.get("ports", []) if "name" in p}
    assert named.get("serve", 8000) == port
    return port


def dashboard_port(service: dict) -> int:
    """The dashboard's port, where the operator PUTs the Serve config (rayStartParams dashboard-port, default
    8265; the head Service forwards the container port named "dashboard", default 8265)."""
    spec = raycluster_spec(service)["headGroupSpec"]
    port = int(spec["rayStartParams"].get("dashboard-port", 8265))
    named = {p["name"]: p["containerPort"] for p in spec["template"]["spec"]["containers"][0].get("ports", [])
             if "name" in p}
    assert named.get("dashboard", 8265) == port
    return port


def ports(rule: dict) -> set[int]:
    assert all(p["protocol"] == "TCP" for p in rule["ports"])
    return {p["port"] for p in rule["ports"]}


@pytest.mark.parametrize("service", _services(), ids=_ids)
def test_the_http_policy_opens_the_serve_port_to_labelled_clients_on_every_proxy(service):
    """Serve's port and nothing else, to pods labelled segrl.io/serve-client: "true", on every pod that runs a
    proxy (HeadOnly: the head; otherwise also the workers that hold replicas)."""
    spec = serve_policies()["segrl-serve-http"]["spec"]
    (rule,) = spec["ingress"]
    assert ports(rule) == {serve_port(service)}
    assert rule["from"] == [{"podSelector": {"matchLabels": {"segrl.io/serve-client": "true"}}}]
    pods = kuberay_pods(service, service_clusters(service)[0])
    proxies = {"head"} if embedded_serve_config(service).get("proxy_location") == "HeadOnly" else set(pods)
    assert proxies <= selected(serve_policies()["segrl-serve-http"], pods)


@pytest.mark.parametrize("service", _services(), ids=_ids)
def test_the_head_admits_the_operator_on_the_dashboard_and_proxy_and_submitters_on_the_dashboard(service):
    """Besides its own pods the head takes submitters on the dashboard only, and the KubeRay operator's pods, from
    the operator's namespace by its kubernetes.io/metadata.name, on exactly the dashboard (Serve config and
    status) and the Serve port (the proxy's /-/healthz); the workers take their own pods only."""
    policies = serve_policies()
    head = [r for r in policies["segrl-serve-head"]["spec"]["ingress"] if own_pods_rule(r) is None]
    by_peer = {yaml.safe_dump(r["from"], sort_keys=True): r for r in head}
    assert len(by_peer) == len(head) == 2
    submitter = by_peer.pop(yaml.safe_dump([{"podSelector": {"matchLabels": {"segrl.io/ray-submitter": "true"}}}]))
    assert ports(submitter) == {dashboard_port(service)}
    (operator,) = by_peer.values()
    (peer,) = operator["from"]
    assert set(peer["namespaceSelector"]["matchLabels"]) == {"kubernetes.io/metadata.name"}
    assert peer["podSelector"] == {"matchLabels": {"app.kubernetes.io/component": "kuberay-operator"}}
    assert ports(operator) == {dashboard_port(service), serve_port(service)}
    (rule,) = policies["segrl-serve-workers"]["spec"]["ingress"]
    assert own_pods_rule(rule) is not None


def operator_namespace(text: str) -> str:
    """The namespace the head policy admits the operator from, in the policies' file ``text``."""
    head = next(p for p in yaml.safe_load_all(text) if p and p["metadata"]["name"] == "segrl-serve-head")
    (peer,) = [r["from"][0] for r in head["spec"]["ingress"] if "namespaceSelector" in r["from"][0]]
    return peer["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"]


def test_the_operator_namespace_is_a_placeholder_the_header_and_readme_set():
    """The header says the namespace is a placeholder to set; the README applies the policies with the
    RayService, and its sed sets the namespace and changes nothing else."""
    text = (KUBERAY / SERVE_POLICIES).read_text()
    placeholder = operator_namespace(text)
    header = " ".join(line.lstrip("# ") for line in text.splitlines() if line.startswith("#"))
    assert f"({placeholder} is a placeholder;" in header
    readme = (ROOT / "README.md").read_text()
    assert f"kubectl apply -f cluster/kuberay/rayservice.yaml -f cluster/kuberay/{SERVE_POLICIES}" in readme
    sed = re.search(rf"sed -i 's#([^#]+)#([^#]+)#' cluster/kuberay/{re.escape(SERVE_POLICIES)}\n", readme)
    old, new = sed.groups()
    assert text.count(old) == 1
    edited = text.replace(old, new)
    assert operator_namespace(edited) not in (placeholder, "")
    assert [line for line in edited.splitlines() if line not in text.splitlines()] == \
        [line.replace(old, new) for line in text.splitlines() if old in line]

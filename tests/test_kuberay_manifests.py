"""The shipped KubeRay manifests: KubeRay accepts them (each validated strictly against its CRD's schema,
so that a misspelled field fails), they name the installed Ray, their entrypoints parse with segrl's own
CLI, and their GPU pods hold the configs they run (the RayService's Serve config:
tests/test_kuberay_rayservice.py); auth is on (every Ray container takes the token from the Secret) and
NetworkPolicies admit only the cluster's own pods (plus submitters on the head's Jobs/client ports; the
RayService's policies: tests/test_kuberay_rayservice.py), each a valid networking.k8s.io/v1 NetworkPolicy.

The CRD schemas (ray.io/v1, each CRD's openAPIV3Schema as JSON) are read from ``../shared/kuberay``
beside the repository; where that folder is absent the schema tests skip, saying so.
"""
from __future__ import annotations

import copy
import json
import shlex
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

from cluster.placement import CLUSTER_SPEC, fit, plan, raycluster_nodes, raycluster_spec
from config import load_config
from pipelines.cli import build_parser, config_source

ROOT = Path(__file__).resolve().parents[1]
KUBERAY = ROOT / "cluster" / "kuberay"
SCHEMAS = ROOT.parent / "shared" / "kuberay"
SCHEMA_FILE = {"RayCluster": "raycluster.v1.schema.json", "RayJob": "rayjob.v1.schema.json",
               "RayService": "rayservice.v1.schema.json"}
PAPER = ["configs/llava15-7b-reasonseg.yaml", "configs/qwen25vl-7b-grefcoco.yaml"]
SUBMIT_PORTS = {8265, 10001}  # dashboard / Jobs API, Ray client


def _documents() -> list[dict]:
    return [d for p in sorted(KUBERAY.glob("*.yaml")) for d in yaml.safe_load_all(p.read_text()) if d]


def _file_documents(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((KUBERAY / name).read_text()) if d]


def _network_policies() -> list[dict]:
    return [d for d in _documents() if d["kind"] == "NetworkPolicy"]


def _raycluster() -> dict:
    (cluster,) = [d for d in _documents() if d["kind"] == "RayCluster"]
    return cluster


def _containers(doc: dict) -> list[dict]:
    """The Ray containers of a manifest's cluster (head and every worker group)."""
    spec = raycluster_spec(doc)
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


def test_every_ray_container_takes_token_auth_from_the_secret():
    """The RayCluster's containers and its autoscaler take the token from the Secret segrl-ray-auth."""
    secrets = set()
    cluster = _raycluster()
    for container in [*_containers(cluster), cluster["spec"]["autoscalerOptions"]]:
        env = {e["name"]: e for e in container.get("env", [])}
        assert env["RAY_AUTH_MODE"]["value"] == "token", container.get("name", "autoscaler")
        ref = env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]
        assert "value" not in env["RAY_AUTH_TOKEN"]  # never a literal token in the manifest
        secrets.add((ref["name"], ref["key"]))
    assert secrets == {("segrl-ray-auth", "auth_token")}


def test_a_rayjobs_cluster_has_token_auth_from_kuberay():
    """A RayJob's cluster asks KubeRay for token mode, which makes a Secret per cluster and hands the
    token to every Ray container, the autoscaler and the submitter; no container sets its own."""
    for job in _jobs():
        assert raycluster_spec(job)["authOptions"] == {"mode": "token"}
        for container in _containers(job):
            assert not {e["name"] for e in container.get("env", [])} & {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN"}


def test_a_rayservices_cluster_takes_the_token_of_the_shared_secret():
    """KubeRay hands the token of segrl-ray-auth to every Ray container and the autoscaler and deploys the
    Serve config with it; the Secret outlives the new clusters of an upgrade. No container sets its own."""
    for service in _services():
        assert raycluster_spec(service)["authOptions"] == {"mode": "token", "secretName": "segrl-ray-auth"}
        for container in _containers(service):
            assert not {e["name"] for e in container.get("env", [])} & {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN"}


def test_network_policies_admit_only_the_cluster_and_submitters():
    name = _raycluster()["metadata"]["name"]
    policies = _file_documents("networkpolicy.yaml")  # the RayCluster's (the RayService's: networkpolicy-serve.yaml)
    assert {p["kind"] for p in policies} == {"NetworkPolicy"}
    selected = {p["spec"]["podSelector"]["matchLabels"]["ray.io/node-type"]: p for p in policies}
    assert set(selected) == {"head", "worker"} and len(policies) == 2
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


# --- KubeRay accepts them: strict validation against the CRD schemas -------------------------------------

def _ray_documents() -> list[dict]:
    return [d for d in _documents() if d["kind"] in CLUSTER_SPEC]


def _services() -> list[dict]:
    return [d for d in _ray_documents() if d["kind"] == "RayService"]


def _ids(doc: dict) -> str:
    return f"{doc['kind']}/{doc['metadata']['name']}"


def strict(schema: dict) -> dict:
    """A copy of an OpenAPI v3 schema in which every object that lists its ``properties`` (and does not
    keep unknown fields, ``x-kubernetes-preserve-unknown-fields``) refuses any other key: Kubernetes
    would silently prune a misspelled field, this rejects it."""
    out = dict(schema)
    if isinstance(schema.get("properties"), dict):
        out["properties"] = {name: strict(sub) for name, sub in schema["properties"].items()}
        if not schema.get("x-kubernetes-preserve-unknown-fields") and "additionalProperties" not in schema:
            out["additionalProperties"] = False
    for key in ("items", "additionalProperties", "not"):
        if isinstance(schema.get(key), dict):
            out[key] = strict(schema[key])
    for key in ("anyOf", "allOf", "oneOf"):
        if isinstance(schema.get(key), list):
            out[key] = [strict(sub) for sub in schema[key]]
    return out


def crd_schema(kind: str) -> dict:
    path = SCHEMAS / SCHEMA_FILE[kind]
    if not path.is_file():
        pytest.skip(f"KubeRay CRD schema {path} not found (CI has the shared folder beside the clone)")
    return json.loads(path.read_text())


def problems(schema: dict, doc: dict) -> list[str]:
    """Every place ``doc`` breaks ``schema``, as ``path: message`` lines."""
    errors = jsonschema.Draft7Validator(schema).iter_errors(doc)
    return sorted(f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in errors)


def test_every_kuberay_kind_is_shipped():
    assert sorted({d["kind"] for d in _ray_documents()}) == ["RayCluster", "RayJob", "RayService"]
    assert all(d["apiVersion"] == "ray.io/v1" for d in _ray_documents())


@pytest.mark.parametrize("doc", _ray_documents(), ids=_ids)
def test_manifest_validates_strictly_against_its_crd(doc):
    assert problems(strict(crd_schema(doc["kind"])), doc) == []


def _misspell_top(doc: dict) -> str:
    raycluster_spec(doc)["enableInTreeAutoscalling"] = True
    return "enableInTreeAutoscalling"


def _misspell_container(doc: dict) -> str:
    container = raycluster_spec(doc)["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    container["resource"] = container.pop("resources")
    return "resource"


@pytest.mark.parametrize("misspell", [_misspell_top, _misspell_container], ids=["cluster spec", "pod container"])
@pytest.mark.parametrize("doc", _ray_documents(), ids=_ids)
def test_a_misspelled_field_fails_strict_validation_only(doc, misspell):
    """The CRD itself admits the misspelling (Kubernetes would drop the field without a word); the
    strict schema names it, also deep inside an embedded pod template."""
    schema, bad = crd_schema(doc["kind"]), copy.deepcopy(doc)
    name = misspell(bad)
    assert problems(schema, bad) == []
    found = problems(strict(schema), bad)
    assert len(found) == 1 and f"'{name}' was unexpected" in found[0], found


def network_policy_schema() -> dict:
    """networking.k8s.io/v1 NetworkPolicy: its rules and label selectors are the Kubernetes types (from
    k8s.io/api/networking/v1) that KubeRay's RayCluster CRD embeds in spec.networkPolicy.head, wrapped in the
    policy's own fields (spec.podSelector required, policyTypes Ingress or Egress)."""
    spec = crd_schema("RayCluster")["properties"]["spec"]["properties"]
    if "networkPolicy" not in spec:
        pytest.skip("this KubeRay CRD embeds no NetworkPolicy rules to validate against")
    rules = spec["networkPolicy"]["properties"]["head"]["properties"]
    ingress, egress = rules["ingressRules"]["items"], rules["egressRules"]["items"]
    selector = ingress["properties"]["from"]["items"]["properties"]["podSelector"]
    strings = {"type": "object", "additionalProperties": {"type": "string"}}
    return {"type": "object", "required": ["apiVersion", "kind", "metadata", "spec"], "properties": {
        "apiVersion": {"const": "networking.k8s.io/v1"}, "kind": {"const": "NetworkPolicy"},
        "metadata": {"type": "object", "required": ["name"], "properties": {
            "name": {"type": "string"}, "namespace": {"type": "string"}, "labels": strings, "annotations": strings}},
        "spec": {"type": "object", "required": ["podSelector"], "properties": {
            "podSelector": selector,
            "policyTypes": {"type": "array", "items": {"enum": ["Ingress", "Egress"]}},
            "ingress": {"type": "array", "items": ingress}, "egress": {"type": "array", "items": egress}}}}}


@pytest.mark.parametrize("policy", _network_policies(), ids=lambda d: d["metadata"]["name"])
def test_every_network_policy_validates_strictly_as_networking_v1(policy):
    assert problems(strict(network_policy_schema()), policy) == []
    assert all(p["protocol"] == "TCP" and isinstance(p["port"], int)
               for rule in policy["spec"].get("ingress", []) for p in rule.get("ports", []))


def test_a_misspelled_network_policy_field_fails_strict_validation():
    bad = copy.deepcopy(_network_policies()[0])
    rule = next(r for r in bad["spec"]["ingress"] if "ports" in r)
    rule["port"] = rule.pop("ports")
    found = problems(strict(network_policy_schema()), bad)
    assert len(found) == 1 and "'port' was unexpected" in found[0], found


def test_the_strict_schema_keeps_free_form_maps_free():
    schema = {"type": "object", "properties": {
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "raw": {"type": "object", "properties": {"a": {"type": "integer"}},
                "x-kubernetes-preserve-unknown-fields": True},
        "list": {"type": "array", "items": {"type": "object", "properties": {"b": {"type": "string"}}}}}}
    assert problems(strict(schema), {"labels": {"any": "x"}, "raw": {"a": 1, "extra": 2}, "list": [{"b": "y"}]}) == []
    assert problems(strict(schema), {"list": [{"b": "y", "c": 1}]}) == \
        ["list.0: Additional properties are not allowed ('c' was unexpected)"]


# --- they run segrl: the installed Ray, segrl's own CLI, GPUs for the config -----------------------------

@pytest.mark.parametrize("doc", _ray_documents(), ids=_ids)
def test_ray_version_is_the_installed_ray(doc):
    assert raycluster_spec(doc)["rayVersion"] == ray.__version__


def _jobs() -> list[dict]:
    return [d for d in _ray_documents() if d["kind"] == "RayJob"]


def _trainers() -> list[dict]:
    """The manifests a training run goes on (a RayService's cluster serves)."""
    return [d for d in _ray_documents() if d["kind"] != "RayService"]


def entrypoint_args(job: dict):
    """The RayJob's entrypoint parsed by segrl's own parser (argparse exits on anything it does not take)."""
    words = shlex.split(job["spec"]["entrypoint"])
    assert words[0] == "segrl", words
    return build_parser().parse_args(words[1:])


def image_workdir() -> str:
    """The image's working folder, where the repository sits (cluster/kuberay/Dockerfile)."""
    (line,) = [w for w in (KUBERAY / "Dockerfile").read_text().splitlines() if w.startswith("WORKDIR ")]
    return line.split()[1]


def test_the_image_is_rays_of_the_installed_version_and_python():
    dockerfile = (KUBERAY / "Dockerfile").read_text()
    assert f"FROM rayproject/ray:{ray.__version__}-py311-gpu\n" in dockerfile
    assert 'pip install --no-cache-dir ".[gpu]"' in dockerfile


def job_config(job: dict):
    """(the repository's config file the entrypoint names in the image, the config it loads)."""
    args = entrypoint_args(job)
    in_image = Path(args.config)
    assert in_image.is_relative_to(image_workdir()), f"{in_image} is not in the image's repository"
    args.config = str(in_image.relative_to(image_workdir()))
    return args.config, load_config(*config_source(args))  # every override names a field and a valid value


@pytest.mark.parametrize("job", _jobs(), ids=_ids)
def test_the_entrypoint_is_segrl_train_resuming_by_itself_on_a_paper_config(job):
    args = entrypoint_args(job)
    path, config = job_config(job)
    assert args.command == "train" and path in PAPER and not args.resume and not args.overwrite
    assert config.train.resume == "auto"  # a retry, or a rescheduled head pod, continues the run


def _mounts(container: dict) -> dict[str, str]:
    return {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}


@pytest.mark.parametrize("job", _jobs(), ids=_ids)
def test_the_runs_files_live_on_the_volume_every_pod_shares(job):
    """Data, features, checkpoints, the SAM weights and downloads survive a retry's new cluster."""
    spec = raycluster_spec(job)
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    claims = {v["name"]: v["persistentVolumeClaim"]["claimName"]
              for g in groups for v in g["template"]["spec"]["volumes"] if "persistentVolumeClaim" in v}
    assert set(claims.values()) == {"segrl-data"}
    (root,) = {path for c in _containers(job) for path, name in _mounts(c).items() if name in claims}
    assert all(_mounts(c).get(root) in claims for c in _containers(job))
    _, config = job_config(job)
    env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])["env_vars"]
    for path in (config.paths.work_dir, config.model.sam.checkpoint, env["HF_HOME"]):
        assert Path(path).is_relative_to(root), path


@pytest.mark.parametrize("job", _jobs(), ids=_ids)
def test_a_job_retries_and_cleans_up_after_itself(job):
    spec = job["spec"]
    assert spec["backoffLimit"] > 0 and spec["shutdownAfterJobFinishes"] is True
    assert spec["ttlSecondsAfterFinished"] > 0
    assert set(yaml.safe_load(spec["runtimeEnvYAML"])) == {"env_vars"}


@pytest.mark.parametrize("doc", _ray_documents(), ids=_ids)
def test_autoscaling_is_on_and_has_room(doc):
    """Training scales its GPU pods (more engines); a RayService the pods its Serve replicas run on."""
    spec = raycluster_spec(doc)
    assert spec["enableInTreeAutoscaling"] is True and spec["autoscalerOptions"]["idleTimeoutSeconds"] > 0
    groups = spec["workerGroupSpecs"]
    assert all(g["minReplicas"] <= g["replicas"] <= g["maxReplicas"] for g in groups)
    grows = [g for g in groups if doc["kind"] == "RayService" or "nvidia.com/gpu" in str(g["template"])]
    assert any(g["maxReplicas"] > g["minReplicas"] for g in grows)


def _at(spec: dict, replicas: str) -> dict:
    """The RayCluster manifest of ``spec`` with every worker group at its ``replicas`` or ``maxReplicas``."""
    spec = copy.deepcopy(spec)
    for group in spec["workerGroupSpecs"]:
        group["replicas"] = group[replicas]
    return {"kind": "RayCluster", "spec": spec}


def _configs(doc: dict) -> list[str]:
    """The configs a manifest is for: a RayJob's entrypoint names its own, a RayCluster takes the paper's."""
    return [job_config(doc)[0]] if doc["kind"] == "RayJob" else PAPER


@pytest.mark.parametrize("doc", _trainers(), ids=_ids)
def test_gpu_pods_hold_the_config_at_the_start_and_at_max_replicas(doc):
    spec = raycluster_spec(doc)
    for path in _configs(doc):
        p = plan(load_config(path))
        for replicas in ("replicas", "maxReplicas"):
            nodes = raycluster_nodes(_at(spec, replicas))
            result = fit(p, nodes)
            assert result.fits, f"{path} at {replicas}: {result.error}"
        capacity = sum(n.gpus for n in raycluster_nodes(_at(spec, "maxReplicas")))
        assert capacity > p.totals["num_gpus"], f"{path}: no room for the autoscaler to add engines"


def test_segrl_plan_reads_a_rayjobs_cluster(tmp_path, capsys):
    from pipelines.cli import main

    (job,) = _jobs()
    path, _ = job_config(job)
    assert main(["plan", "--config", path, "--cluster", str(KUBERAY / "rayjob.yaml"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["fits"] is True
    selector = tmp_path / "existing.yaml"  # a RayJob that runs on an existing cluster describes none
    selector.write_text(yaml.safe_dump({"apiVersion": "ray.io/v1", "kind": "RayJob",
                                        "spec": {"clusterSelector": {"ray.io/cluster": "segrl"}}}))
    assert main(["plan", "--config", path, "--cluster", str(selector)]) == 2
    assert f"--cluster {selector}: this RayJob has no spec.rayClusterSpec" in capsys.readouterr().err

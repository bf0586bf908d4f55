"""The shipped RayService serves segrl: its Serve config is what `segrl serve-config` writes for the
command its annotation names, builds segrl's application, reads from the volume and fits its pods.
(Strict schema validation of every manifest, this one included: tests/test_kuberay_manifests.py.)"""
from __future__ import annotations

import copy
import importlib
import shlex
from pathlib import Path

import pytest
import yaml
from test_kuberay_manifests import PAPER, ROOT, _at, _containers, _ids, _mounts, _services

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

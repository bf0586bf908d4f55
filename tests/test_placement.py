"""Placement: the plan from a config, the fit against a cluster, `segrl plan`, and real placement groups
on a Ray cluster of logical GPUs (its own cluster, in a subprocess: the session's stays untouched)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from cluster.placement import Node, fit, format_cluster, parse_cluster, plan, raycluster_nodes
from config import ConfigError, load_config
from pipelines.cli import main

ROOT = Path(__file__).resolve().parents[1]
PAPER = ["configs/llava15-7b-reasonseg.yaml", "configs/qwen25vl-7b-grefcoco.yaml"]
MANIFESTS = [p for p in sorted((ROOT / "cluster" / "kuberay").glob("*.yaml"))
             if next(yaml.safe_load_all(p.read_text()))["kind"] == "RayCluster"]
PODS = "2x(gpu=8,cpu=64)+cpu=16"  # the manifest's worker pods


def test_tiny_plan_asks_what_the_actors_ask_and_no_gpu():
    p = plan(load_config("configs/tiny.yaml"))
    assert p.totals["num_gpus"] == 0 and p.totals["num_cpus"] == 2.0  # the 2 cores, as before placement groups
    for k in p.kinds:
        assert k.actor_gpus == 0 and not k.capture
        assert sum(b.get("CPU", 0) for g in k.groups() for b in g) == k.count * k.num_cpus
        assert all("GPU" not in b for b in k.bundles)


@pytest.mark.parametrize("path", PAPER)
def test_paper_plan(path):
    p = plan(load_config(path))
    rollout, learner = p.kind("rollout"), p.kind("learner")
    assert (rollout.count, rollout.num_gpus, rollout.strategy, rollout.capture) == (2, 4, "STRICT_PACK", True)
    assert rollout.bundles == ({"GPU": 1.0, "CPU": 8.0}, {"GPU": 1.0}, {"GPU": 1.0}, {"GPU": 1.0})
    assert rollout.actor_gpus == 0  # vLLM's tensor-parallel workers take the bundles' GPUs
    assert len(rollout.groups()) == 2 and rollout.slot(1) == (1, 0)
    assert (learner.count, learner.strategy, len(learner.groups()), learner.slot(3)) == (7, "PACK", 1, (0, 3))
    assert p.totals["num_gpus"] == 16 and p.totals["num_cpus"] == 88
    assert all(k.memory_gib > 10 for k in p.kinds if k.kind != "reward")


def test_single_gpu_engine_takes_its_gpu_itself():
    rollout = plan(load_config("configs/tiny.yaml", ["cluster.rollout.num_gpus=1"])).kind("rollout")
    assert rollout.bundles == ({"GPU": 1.0, "CPU": 0.5},) and rollout.actor_gpus == 1 and not rollout.capture


def test_engine_gpus_must_match_tensor_parallelism():
    with pytest.raises(ConfigError, match="cluster.rollout.num_gpus .* rollout.tensor_parallel_size"):
        load_config(PAPER[0], ["rollout.tensor_parallel_size=2"])


def test_an_actor_asking_for_nothing_gets_no_group():
    assert plan(load_config("configs/tiny.yaml", ["cluster.reward.num_cpus=0"])).kind("reward").groups() == []


def test_learner_memory_shrinks_with_more_ranks():
    small, large = (plan(load_config(PAPER[0], [f"cluster.learner_world_size={n}"])).kind("learner").memory_gib
                    for n in (2, 7))
    assert small > large


@pytest.mark.parametrize("path", PAPER)
@pytest.mark.parametrize("spec", [PODS, "gpu=16,cpu=96"])
def test_paper_configs_fit_sixteen_gpus(path, spec):
    assert fit(plan(load_config(path)), parse_cluster(spec)).fits


def test_seventeen_gpus_do_not_fit_and_the_error_names_kind_and_shortfall():
    result = fit(plan(load_config(PAPER[0], ["cluster.learner_world_size=8"])), parse_cluster(PODS))
    assert not result.fits
    assert result.error.startswith("reference does not fit") and "1 GPU short" in result.error
    assert "needs 17 GPUs" in result.error


def test_strict_pack_needs_one_node_per_engine():
    p = plan(load_config(PAPER[0], ["cluster.learner.num_gpus=0", "cluster.reference.num_gpus=0"]))
    assert fit(p, parse_cluster("gpu=8,cpu=200")).fits  # totals only
    result = fit(p, parse_cluster("4x(gpu=2,cpu=64)"))  # 8 GPUs, but no node holds an engine's 4
    assert not result.fits and result.error.startswith("rollout does not fit") and "2 GPUs short" in result.error


def test_cpu_shortfall_is_named():
    result = fit(plan(load_config(PAPER[0])), parse_cluster("2x(gpu=8,cpu=40)"))
    assert not result.fits and "CPU" in result.error and "short" in result.error


def test_parse_examples():
    assert parse_cluster("gpu=16,cpu=96") == [Node(16, 96)]
    assert parse_cluster(" 2 x ( GPU=8, cpu=64 ) + cpu=16") == [Node(8, 64), Node(8, 64), Node(0, 16)]
    assert parse_cluster("cpu=0.5") == [Node(0, 0.5)]


@pytest.mark.parametrize("spec", ["", "gpu", "gpu=-1", "gpu=1,gpu=2", "0x(gpu=1)", "2x(gpu=8", "mem=3",
                                  "gpu=nan", "gpu=inf", "2x()", "gpu=8++cpu=1", "x(gpu=1)"])
def test_bad_specs_are_config_errors(spec):
    with pytest.raises(ConfigError, match="--cluster"):
        parse_cluster(spec)


nodes = st.lists(st.builds(Node, st.integers(0, 64).map(float), st.integers(0, 512).map(lambda c: c / 4)),
                 min_size=1, max_size=12)


@given(nodes)
def test_format_parses_back(cluster):
    assert parse_cluster(format_cluster(cluster)) == cluster


@given(st.text(alphabet="gpucx=0123456789.,+() -", max_size=30))
def test_parser_takes_anything_or_says_why(spec):
    try:
        assert all(n.gpus >= 0 and n.cpus >= 0 for n in parse_cluster(spec))
    except ConfigError as exc:
        assert "--cluster" in str(exc)


@pytest.mark.parametrize("manifest", MANIFESTS, ids=lambda p: p.name)
@pytest.mark.parametrize("path", PAPER)
def test_shipped_manifests_hold_the_paper_configs(manifest, path, capsys):
    nodes = raycluster_nodes(yaml.safe_load(manifest.read_text()))
    assert [n for n in nodes if n.gpus] == [Node(8, 64)] * 2
    assert fit(plan(load_config(path)), nodes).fits
    assert main(["plan", "--config", path, "--cluster", str(manifest), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["fits"] is True


@pytest.mark.parametrize("path", PAPER)
def test_plan_json_prints_the_numbers(path, capsys):
    assert main(["plan", "--config", path, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)  # exactly one JSON object
    kinds = {a["kind"]: a for a in out["actors"]}
    assert list(kinds) == ["rollout", "learner", "reference", "reward"] and out["fits"] is None
    assert (kinds["rollout"]["count"], kinds["rollout"]["num_gpus"], len(kinds["rollout"]["bundles"])) == (2, 4.0, 4)
    assert (kinds["learner"]["count"], kinds["learner"]["num_gpus"], kinds["reference"]["num_gpus"]) == (7, 1.0, 1.0)
    assert (kinds["reward"]["count"], kinds["reward"]["num_cpus"]) == (4, 2.0)
    assert out["totals"]["num_gpus"] == 16.0 and out["totals"]["num_cpus"] == 88.0


def test_plan_table_and_errors(capsys):
    assert main(["plan", "--config", PAPER[0], "--cluster", PODS]) == 0
    out = capsys.readouterr().out
    assert "STRICT_PACK" in out and "rough estimate" in out and out.rstrip().endswith("fits")
    assert main(["plan", "--config", PAPER[0], "--cluster", PODS, "cluster.learner_world_size=8"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "reference does not fit" in err[0] and "1 GPU short" in err[0]
    assert main(["plan", "--cluster", "2x(gpu=8"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--cluster" in err[0] and "Traceback" not in err[0]


FAKE_CLUSTER = r"""
import contextlib, io, json, sys, time
import ray
import ray._private.state as state
from ray.cluster_utils import Cluster
from ray.util.placement_group import placement_group_table

from actors.reward_pool import RewardPool
from cluster.placement import PlacementError
from cluster.topology import reserve, start_actors
from config import load_config
from pipelines.cli import main

cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 16, "include_dashboard": False})
gpu_nodes = [cluster.add_node(num_cpus=64, num_gpus=8).node_id for _ in range(2)]
ray.init(address=cluster.address)
out = {"gpu_nodes": gpu_nodes}
try:
    placement = reserve(load_config(sys.argv[1]), timeout_s=60)
    tables = {kind: [placement_group_table(g) for g in groups] for kind, groups in placement.groups.items()}
    out["groups"] = {kind: [{"strategy": t["strategy"], "state": t["state"],
                             "bundles": [t["bundles"][i] for i in sorted(t["bundles"])],
                             "nodes": sorted(set(t["bundles_to_node_id"].values()))} for t in ts]
                     for kind, ts in tables.items()}

    def bundle_users(group):  # each actor in bundle i holds 0.001 of bundle_group_i_<id>
        resources = {k: v for r in state.available_resources_per_node().values() for k, v in r.items()}
        return [round((1000 - resources[f"bundle_group_{i}_{group.id.hex()}"]) * 1000)
                for i in range(len(group.bundle_specs))]

    pool = RewardPool(4, num_cpus=2, slot_options=placement.slot_options("reward"))
    ray.get([w.__ray_ready__.remote() for w in pool.workers], timeout=120)
    out["reward_users"] = bundle_users(placement.groups["reward"][0])
    pool.replace("reward-2.0")
    ray.get([w.__ray_ready__.remote() for w in pool.workers], timeout=120)
    deadline = time.monotonic() + 30
    while bundle_users(placement.groups["reward"][0]) != [1, 1, 1, 1] and time.monotonic() < deadline:
        time.sleep(0.2)
    out["reward_users_after_replace"] = bundle_users(placement.groups["reward"][0])
    out["reward_nodes"] = sorted({a["Address"]["NodeID"] for a in state.actors().values() if a["State"] == "ALIVE"})
    pool.shutdown()
    placement.remove()

    actors_before = len(state.actors())
    impossible = load_config(sys.argv[1], ["cluster.learner_world_size=8", "cluster.placement_timeout_s=3"])
    try:
        start_actors(impossible, "no-model-needed")
        out["refused"] = None
    except PlacementError as exc:
        out["refused"] = str(exc)
    out["actors_started"] = len(state.actors()) - actors_before
    out["states_after"] = sorted({t["state"] for t in placement_group_table().values()})
    time.sleep(1)
    out["gpus_free"] = ray.available_resources().get("GPU")

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        out["plan_address_rc"] = main(["plan", "--config", sys.argv[1], "--address", cluster.address, "--json"])
    out["plan_address"] = json.loads(printed.getvalue())
finally:
    ray.shutdown()
    cluster.shutdown()
print("RESULT " + json.dumps(out))
"""


@pytest.fixture(scope="module")
def fake_gpu_cluster():
    """The llava paper config reserved on two logical 8-GPU nodes plus a 16-CPU node, in a subprocess
    with its own Ray temp dir; then an impossible variant of it."""
    with tempfile.TemporaryDirectory(prefix="rpg", dir="/tmp") as tmp:
        env = {**os.environ, "RAY_TMPDIR": tmp, "RAY_AUTH_MODE": "disabled", "RAY_ADDRESS": ""}
        run = subprocess.run([sys.executable, "-c", FAKE_CLUSTER, PAPER[0]], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=600)
    lines = [line for line in run.stdout.splitlines() if line.startswith("RESULT ")]
    assert run.returncode == 0 and lines, run.stderr[-3000:]
    return json.loads(lines[-1][len("RESULT "):])


def test_placement_groups_request_what_plan_printed(fake_gpu_cluster, capsys):
    assert main(["plan", "--config", PAPER[0], "--json"]) == 0
    printed = {a["kind"]: a for a in json.loads(capsys.readouterr().out)["actors"]}
    groups = fake_gpu_cluster["groups"]
    for kind, a in printed.items():
        assert all(g["state"] == "CREATED" and g["strategy"] == a["strategy"] for g in groups[kind])
        per_group = 1 if kind == "rollout" else a["count"]
        assert len(groups[kind]) == a["placement_groups"] == a["count"] // per_group
        assert all(g["bundles"] == a["bundles"] * per_group for g in groups[kind])


def test_each_engine_sits_on_one_gpu_node_and_the_learner_packs(fake_gpu_cluster):
    groups, gpu_nodes = fake_gpu_cluster["groups"], set(fake_gpu_cluster["gpu_nodes"])
    assert all(len(g["nodes"]) == 1 and set(g["nodes"]) <= gpu_nodes for g in groups["rollout"])
    assert len(groups["learner"][0]["nodes"]) == 1  # 7 ranks on one node's 8 GPUs


def test_pool_actors_sit_in_their_bundles_and_a_replacement_takes_the_same_one(fake_gpu_cluster):
    assert fake_gpu_cluster["reward_users"] == [1, 1, 1, 1]
    assert fake_gpu_cluster["reward_users_after_replace"] == [1, 1, 1, 1]
    assert fake_gpu_cluster["reward_nodes"] == fake_gpu_cluster["groups"]["reward"][0]["nodes"]


def test_plan_checks_the_live_cluster(fake_gpu_cluster):
    assert fake_gpu_cluster["plan_address_rc"] == 0 and fake_gpu_cluster["plan_address"]["fits"] is True


def test_an_impossible_config_is_refused_before_any_actor_starts(fake_gpu_cluster):
    refused = fake_gpu_cluster["refused"]
    assert refused and "not placed within 3 s" in refused and "1 GPU short" in refused
    assert fake_gpu_cluster["actors_started"] == 0
    assert fake_gpu_cluster["states_after"] == ["REMOVED"] and fake_gpu_cluster["gpus_free"] == 16

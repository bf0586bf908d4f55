"""Run by tests/test_fake_autoscaling.py in a process of its own, connected to a fake autoscaling
cluster (``bench.fake_cluster``): the elastic rollout driver asks for a second engine, and the
autoscaler must launch a GPU node for it. Prints one JSON line with what happened.

The engines are light actors that report where they run and which GPU Ray gave them (a vLLM
engine would only make this slower; the training path is tested on the local cluster).
Usage: python tests/fake_autoscaling_probe.py ADDRESS (with the cluster's environment).
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ray

from actors.dispatch import REMOVED, ElasticPool, LeastLoaded
from cluster.rollout_scaling import Decision
from cluster.topology import reserve
from config import load_config
from pipelines.grpo.elastic import ElasticRollouts
from pipelines.grpo.handoff import StepRecord
from pipelines.grpo.phase_timer import PhaseTimer

CONFIG = ["cluster.rollout.num_gpus=1", "cluster.rollout.num_cpus=1", "cluster.rollout_actors=1",
          "cluster.rollout_autoscale.min=1", "cluster.rollout_autoscale.max=2", "cluster.learner.num_cpus=0.5",
          "cluster.reference.num_cpus=0.25", "cluster.reward.num_cpus=0.25", "cluster.reward_workers=1",
          "cluster.placement_timeout_s=120"]


@ray.remote(num_cpus=0)
class Engine:
    def ping(self) -> dict:
        return {"node": ray.get_runtime_context().get_node_id(), "gpus": ray.get_gpu_ids()}


class Pool(ElasticPool):
    def __init__(self, slot_options):
        self._dispatch = LeastLoaded(lambda **placement: Engine.options(num_cpus=1, num_gpus=1, **placement).remote(),
                                     1, "rollout", slot_options=slot_options, ready_method="ping")


class Script:
    def __init__(self):
        self.target = 2

    def observe(self, metrics) -> Decision:
        return Decision(self.target, f"scripted: {self.target} engines")


def alive_nodes() -> list[str]:
    return sorted(n["NodeID"] for n in ray.nodes() if n["Alive"])


def wait_for(condition, timeout_s: float, what: str) -> float:
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout_s:
            raise TimeoutError(f"{what}: not within {timeout_s:g} s; nodes {alive_nodes()}")
        time.sleep(0.2)
    return time.monotonic() - start


def main(address: str) -> dict:
    ray.init(address=address, _node_ip_address="127.0.0.1", log_to_driver=False)
    config = load_config("configs/tiny.yaml", CONFIG)
    head = alive_nodes()
    start = time.monotonic()
    placement = reserve(config)  # the first engine's GPU bundle is not on the head: a first node comes
    first_s = time.monotonic() - start
    pool = Pool(placement.slot_options("rollout"))
    first = ray.get(pool.workers[0].ping.remote(), timeout=60)
    nodes_one = alive_nodes()
    script, requests = Script(), []

    def request(bundles):
        requests.append(bundles)
        from pipelines.grpo.elastic import request_resources
        request_resources(bundles)

    elastic = ElasticRollouts(script, pool, placement, PhaseTimer(), 1, 300.0, request=request)
    record = StepRecord(step=0, metrics={}, staleness={0: 1}, rewards=[], groups=1, wait_s=1.0, learn_s=1.0)
    events = elastic(record)["rollout"]["scale_events"]
    joined_s = wait_for(lambda: pool.engines == 2 or events.extend(pool_events(elastic, record)), 120,
                        "the added engine's start")
    second = ray.get(pool.workers[1].ping.remote(), timeout=60)
    nodes_two = alive_nodes()
    script.target = 1
    events += elastic(record)["rollout"]["scale_events"]
    wait_for(lambda: any(e["event"] == REMOVED for e in events) or events.extend(pool_events(elastic, record)), 60,
             "the retired engine's removal")
    groups_after = len(placement.groups["rollout"])
    elastic.close()
    return {"head": head, "first_node_s": first_s, "first": first, "nodes_one": nodes_one, "joined_s": joined_s,
            "second": second, "nodes_two": nodes_two, "events": events, "groups_after": groups_after,
            "requests": requests}


def pool_events(elastic, record) -> list:
    """Settle through the driver's hook (the script answers the current target, so nothing else happens)."""
    return elastic(record)["rollout"]["scale_events"]


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1])), flush=True)

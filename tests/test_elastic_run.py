"""A tiny GRPO run whose rollout pool grows from 1 to 2 engines and back while it trains: the added
engine serves batches once it has started, the retired one is removed with its placement group, the
metrics record every change with its reason, and the ledger and the learner's own record show every
admitted group trained once, re-queued, or dropped with a reason (nothing lost, nothing twice).

The decisions come from a scripted policy (the real policy's rule has its own tests); it also holds
the driver after the add until the new engine has started (a vLLM engine takes tens of seconds on
these CPUs), so that a short run sees the whole cycle. The engine joins only once it has also
loaded every weight update broadcast meanwhile, which can take a few more (half-second) steps:
STEPS leaves room for that.
"""
from __future__ import annotations

import pytest
import ray
from tests_support import assert_exactly_once, tiny_grpo_config

from cluster.rollout_scaling import Decision
from config.schema import RolloutAutoscaleConfig
from pipelines.grpo.elastic import ElasticRollouts
from pipelines.grpo.metrics_log import read_metrics
from pipelines.train import train

STEPS = 12
SERVED_AT_TWO = 3  # steps observed with two engines before the script scales back down


class UpThenDown:
    """Two engines until it has seen SERVED_AT_TWO steps with two, then one."""

    def __init__(self, topology):
        self.topology, self.at_two, self.groups_seen = topology, 0, []

    def observe(self, metrics) -> Decision:
        pool = self.topology.rollout
        self.groups_seen.append(len(self.topology.placement.groups["rollout"]))
        if metrics.engines == 1 and pool.starting and not self.at_two:
            ray.get(pool.workers[-1].ping.remote(), timeout=600)  # hold the driver until it has started
        self.at_two += metrics.engines == 2
        if self.at_two >= SERVED_AT_TWO:
            return Decision(1, "down: scripted")
        return Decision(2, "up: scripted")


@pytest.fixture(scope="module")
def elastic_run(tiny_workspace, tiny_sae, ray_cluster, tmp_path_factory):
    out = tmp_path_factory.mktemp("elastic")
    config = tiny_grpo_config(tiny_workspace, out, steps=STEPS, checkpoint_every=STEPS)
    config.train.eval_samples = 0
    config.cluster.rollout_autoscale = RolloutAutoscaleConfig(min=1, max=2)
    captured, served_by = {}, []
    real = ElasticRollouts.from_config

    def scripted(config, topology, timer):
        elastic = real(config, topology, timer)
        elastic.policy = captured["policy"] = UpThenDown(topology)
        dispatch = topology.rollout.dispatch

        def recording(*args, **kwargs):
            ref, name = dispatch(*args, **kwargs)
            served_by.append(name)
            return ref, name

        topology.rollout.dispatch = recording
        return elastic

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ElasticRollouts, "from_config", staticmethod(scripted))
        train(config)
    return out, captured["policy"], served_by


def test_the_pool_grows_and_shrinks_with_every_change_and_its_reason_in_the_metrics(elastic_run):
    out, policy, served_by = elastic_run
    rows = read_metrics(out)
    engines = [r["rollout/engines"] for r in rows]
    assert engines[0] == 1 and 2 in engines and engines[-1] == 1, engines
    events = [(e["event"], e["engine"], e["reason"]) for r in rows for e in r["rollout/scale_events"]]
    assert [(kind, name) for kind, name, _ in events] == [
        ("add", "rollout-1.0"), ("joined", "rollout-1.0"), ("retire", events[2][1]), ("removed", events[2][1])]
    assert events[0][2] == "up: scripted" and events[2][2] == "down: scripted" and all(why for *_, why in events)
    assert {"rollout-0.0", "rollout-1.0"} <= set(served_by)  # the added engine really generated
    assert policy.groups_seen[0] == 1 and max(policy.groups_seen) == 2 and policy.groups_seen[-1] == 1


def test_nothing_is_lost_or_trained_twice_across_the_resizes(elastic_run):
    out, _, _ = elastic_run
    ledger = assert_exactly_once(out, STEPS)
    assert ledger.summary()["requeued_by_reason"] == {}  # a retired engine finishes its batches

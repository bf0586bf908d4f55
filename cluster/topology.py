"""Start (and stop) the four actor kinds of a GRPO run in the placement groups the config plans.

The groups are reserved first, all of them, and waited for (``cluster.placement_timeout_s``),
so a config the cluster cannot hold stops before any actor starts, naming the kind.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from cluster.local import started_here
from cluster.placement import KindPlan, PlacementError, Plan, fit, nodes_from_ray, plan
from config import Config
from models.learner_audit import FILE as LEARNER_INPUTS


@dataclass
class Placement:
    """The reserved placement groups of one run, per kind."""

    plan: Plan
    groups: dict[str, list[PlacementGroup]] = field(default_factory=dict)

    def slot_options(self, kind: str) -> list[dict] | None:
        """Ray options that put each actor of ``kind`` into its bundle (None: the kind has no group)."""
        k = self.plan.kind(kind)
        if not self.groups.get(kind):
            return None
        options = []
        for index in range(k.count):
            group, bundle = k.slot(index)
            options.append({"scheduling_strategy": PlacementGroupSchedulingStrategy(
                self.groups[kind][group], placement_group_bundle_index=bundle,
                placement_group_capture_child_tasks=k.capture)})
        return options

    def add_group(self, kind: str) -> dict:
        """Reserve one more placement group for an actor of ``kind`` (an engine added mid-run): the Ray
        options that put the actor into it. Returns at once; the actor starts once the group is placed."""
        k = self.plan.kind(kind)
        if k.per_group != 1:
            raise ValueError(f"{kind} actors share placement groups; only a kind with a group per actor can grow")
        if not k.bundles:
            return {}
        group = placement_group(list(k.bundles), strategy=k.strategy)
        self.groups.setdefault(kind, []).append(group)
        return {"scheduling_strategy": PlacementGroupSchedulingStrategy(
            group, placement_group_bundle_index=0, placement_group_capture_child_tasks=k.capture)}

    def release(self, kind: str, options: dict) -> None:
        """Free the placement group of a removed actor of ``kind`` (a rollout engine: one group each)."""
        strategy = options.get("scheduling_strategy")
        group = getattr(strategy, "placement_group", None)
        if group is not None and group in self.groups.get(kind, []):
            self.groups[kind].remove(group)
            remove_placement_group(group)

    def remove(self) -> None:
        for groups in self.groups.values():
            for group in groups:
                remove_placement_group(group)
        self.groups = {}


def reserve(config: Config, timeout_s: float | None = None) -> Placement:
    """Create every placement group of the config's plan and wait until all are placed.

    The groups asking for the most GPUs are created first (Ray places groups in order), so the
    learner's ranks get a node to themselves before the engines take theirs. Past the timeout
    the groups are removed again and PlacementError names the kinds still waiting and what the
    cluster's nodes lack for them. On a local cluster (no autoscaler can add a node) a plan its
    nodes cannot hold fails at once, naming the actor kind and its shortfall.
    """
    p = plan(config)
    if started_here():
        result = fit(p, nodes_from_ray(ray.nodes()))
        if not result.fits:
            raise PlacementError(f"the local Ray cluster can never place this run: {result.error}")
    order = sorted(((k, i, g) for k in p.kinds for i, g in enumerate(k.groups())),
                   key=lambda item: -sum(b.get("GPU", 0.0) for b in item[2]))
    created = {(k.kind, i): placement_group(g, strategy=k.strategy) for k, i, g in order}
    placement = Placement(p, {k.kind: [created[k.kind, i] for i in range(len(k.groups()))] for k in p.kinds})
    timeout_s = config.cluster.placement_timeout_s if timeout_s is None else timeout_s
    ready = {k.kind: [g.ready() for g in placement.groups[k.kind]] for k in p.kinds}
    refs = [ref for refs in ready.values() for ref in refs]
    done = set(ray.wait(refs, num_returns=len(refs), timeout=timeout_s)[0]) if refs else set()
    waiting = [k for k in p.kinds if not done.issuperset(ready[k.kind])]
    if waiting:
        placement.remove()
        raise PlacementError(_not_placed(p, waiting, timeout_s))
    return placement


def _not_placed(p: Plan, kinds: list[KindPlan], timeout_s: float) -> str:
    names = ", ".join(k.kind for k in kinds)
    result = fit(p, nodes_from_ray(ray.nodes()))
    why = result.error if not result.fits else "the nodes could hold the plan, but other work holds their resources"
    return f"placement groups of {names} not placed within {timeout_s:g} s (cluster.placement_timeout_s): {why}"


@dataclass
class Topology:
    rollout: object  # actors.rollout_pool.RolloutPool
    reference: object  # actors.reference_pool.ReferencePool
    reward: object  # actors.reward_pool.RewardPool
    learner: object  # actors.learner_group.LearnerGroup
    placement: Placement

    def stop(self) -> None:
        """Kill only the actors this run started, then free their placement groups."""
        self.rollout.shutdown()
        self.reward.shutdown()
        self.learner.shutdown()
        self.reference.shutdown()
        self.placement.remove()

    def restarts(self) -> int:
        """Actors replaced after failures, over all pools."""
        return self.rollout.restarts + self.reference.restarts + self.reward.restarts


def start_actors(config: Config, model_path: str) -> Topology:
    from actors.learner_group import LearnerGroup
    from actors.reference_pool import ReferencePool
    from actors.reward_pool import RewardPool
    from actors.rollout_pool import RolloutPool

    c = config.cluster
    placement = reserve(config)
    kind = placement.plan.kind
    tp = config.rollout.tensor_parallel_size
    engine = {"tensor_parallel_size": tp, "distributed_executor_backend": "ray"} if tp > 1 else {}
    try:
        rollout = RolloutPool(config, c.rollout_actors, num_cpus=c.rollout.num_cpus,
                              num_gpus=kind("rollout").actor_gpus, model_path=model_path, engine_args=engine,
                              max_restarts=c.max_actor_restarts, slot_options=placement.slot_options("rollout"))
        reference = ReferencePool(config, model_path, kind("reference").count, num_cpus=c.reference.num_cpus,
                                  num_gpus=c.reference.num_gpus, keep_versions=config.train.staleness + 2,
                                  max_restarts=c.max_actor_restarts, slot_options=placement.slot_options("reference"))
        reward = RewardPool(c.reward_workers, num_cpus=c.reward.num_cpus, preset=config.reward.preset,
                            ref_token=config.model.ref_token, threshold=config.reward.confidence_threshold,
                            weights=tuple(config.reward.weights), advantage_estimator=config.grpo.advantage_estimator,
                            max_restarts=c.max_actor_restarts, slot_options=placement.slot_options("reward"))
        learner = LearnerGroup(config, c.learner_world_size, model_path, num_cpus=c.learner.num_cpus,
                               num_gpus=c.learner.num_gpus, timeout_s=c.start_timeout_s,
                               rank_options=placement.slot_options("learner"),
                               inputs_log=str(Path(config.resolve_path(config.train.output)) / LEARNER_INPUTS))
        rollout.ready(c.start_timeout_s)
        reference.ready(c.start_timeout_s)
    except BaseException:
        placement.remove()  # also ends the actors started in its groups
        raise
    return Topology(rollout, reference, reward, learner, placement)

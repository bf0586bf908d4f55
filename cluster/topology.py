"""Start (and stop) the four actor kinds of a GRPO run with the resources the config asks for."""
from __future__ import annotations

from dataclasses import dataclass

from config import Config


@dataclass
class Topology:
    rollout: object  # actors.rollout_pool.RolloutPool
    reference: object  # actors.reference_pool.ReferencePool
    reward: object  # actors.reward_pool.RewardPool
    learner: object  # actors.learner_group.LearnerGroup

    def stop(self) -> None:
        """Kill only the actors this run started."""
        self.rollout.shutdown()
        self.reward.shutdown()
        self.learner.shutdown()
        self.reference.shutdown()

    def restarts(self) -> int:
        """Actors replaced after failures, over all pools."""
        return self.rollout.restarts + self.reference.restarts + self.reward.restarts


def start_actors(config: Config, model_path: str) -> Topology:
    from actors.learner_group import LearnerGroup
    from actors.reference_pool import ReferencePool
    from actors.reward_pool import RewardPool
    from actors.rollout_pool import RolloutPool

    c = config.cluster
    engine = {"tensor_parallel_size": config.rollout.tensor_parallel_size} if config.rollout.tensor_parallel_size > 1 else {}
    rollout = RolloutPool(config, c.rollout_actors, num_cpus=c.rollout.num_cpus, model_path=model_path,
                       engine_args=engine, max_restarts=c.max_actor_restarts)
    reference = ReferencePool(config, model_path, num_cpus=c.reference.num_cpus, num_gpus=c.reference.num_gpus,
                              keep_versions=config.train.staleness + 2, max_restarts=c.max_actor_restarts)
    reward = RewardPool(c.reward_workers, num_cpus=c.reward.num_cpus, preset=config.reward.preset,
                         ref_token=config.model.ref_token, threshold=config.reward.confidence_threshold,
                         weights=tuple(config.reward.weights), advantage_estimator=config.grpo.advantage_estimator,
                         max_restarts=c.max_actor_restarts)
    learner = LearnerGroup(config, c.learner_world_size, model_path, num_cpus=c.learner.num_cpus,
                           timeout_s=c.start_timeout_s)
    rollout.ready(c.start_timeout_s)
    reference.ready(c.start_timeout_s)
    return Topology(rollout, reference, reward, learner)

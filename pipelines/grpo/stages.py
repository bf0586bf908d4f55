"""The scheduler's `Stages` over the real actors: rollout pool, reference pool, reward pool, learner.

Each call returns at once with a `Handoff`: the ref of the bulk output (moves
actor to actor) and the ref of a small metadata dict (the only thing the driver
reads). Metadata comes from tiny zero-CPU tasks that read the batch in the
object store zero-copy, so the actors keep plain batch-in/batch-out methods.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import ray

from data.trajectory import LEARNER_DROPS, attach_rewards
from pipelines.grpo.handoff import Handoff
from pipelines.grpo.prompts import PromptStream

LEARNER = "learner"  # the learner group's name as a Handoff worker


@ray.remote(num_cpus=0)
def rollout_meta(batch: pa.RecordBatch) -> dict:
    versions = batch.column("weights_version").to_numpy()
    lengths = np.diff(batch.column("response_ids").offsets.to_numpy())
    return {"weights_version": int(versions.min()), "rows": batch.num_rows, "tokens": int(lengths.sum())}


@ray.remote(num_cpus=0)
def reference_meta(batch: pa.RecordBatch) -> dict:
    return {"rows": batch.num_rows}


@ray.remote(num_cpus=0, num_returns=2)
def learner_batch(scored: pa.RecordBatch, rewarded: pa.RecordBatch) -> tuple[pa.RecordBatch, dict]:
    """The rows the learner trains on (masks dropped) and the chunk's reward statistics."""
    joined = attach_rewards(scored, rewarded)
    keep = [n for n in joined.schema.names if n not in LEARNER_DROPS]
    reward = rewarded.column("reward").to_numpy(zero_copy_only=False)
    fmt = rewarded.column("format_score").to_numpy(zero_copy_only=False)
    mask = rewarded.column("mask_score").to_numpy(zero_copy_only=False)
    _, group_of = np.unique(rewarded.column("group_id").to_numpy(zero_copy_only=False), return_inverse=True)
    flat = [np.ptp(reward[group_of == g]) == 0.0 for g in range(group_of.max() + 1)] if len(reward) else []
    meta = {
        "rows": rewarded.num_rows, "reward": float(reward.mean()),
        "format": float(np.nanmean(fmt)) if np.isfinite(fmt).any() else 0.0,
        "mask": float(np.nanmean(mask)) if np.isfinite(mask).any() else 0.0,
        "errors": rewarded.num_rows - rewarded.column("error").null_count,
        "groups": len(flat), "zero_variance_groups": int(sum(flat)),
    }
    return joined.select(keep), meta


class ActorStages:
    """Prompts come from the driver's `PromptStream` (small rows); everything else stays in actors.

    Each call names the actor that runs it; ``recover`` replaces a failed one in its pool
    (rollout, reference, reward), ``kill`` ends a stalled one (the learner: the whole group).
    """

    def __init__(self, prompts: PromptStream, rollout_pool, reference_pool, reward_pool, learner):
        self.prompts, self.rollout_pool, self.reference_pool = prompts, rollout_pool, reference_pool
        self.reward_pool, self.learner = reward_pool, learner

    def rollout(self, group_ids: list[int]) -> Handoff:
        batch, samples = self.prompts.take(group_ids)
        data, worker = self.rollout_pool.dispatch(ray.put(batch))
        return Handoff(data, rollout_meta.remote(data), worker, tuple(samples))

    def reference(self, data: ray.ObjectRef) -> Handoff:
        scored, worker = self.reference_pool.dispatch(data)
        return Handoff(scored, reference_meta.remote(scored), worker)

    def reward(self, data: ray.ObjectRef) -> Handoff:
        rewarded, worker = self.reward_pool.dispatch(data)
        batch, meta = learner_batch.remote(data, rewarded)
        return Handoff(batch, meta, worker)

    def learn(self, step: int, data: list[ray.ObjectRef]) -> Handoff:
        metrics, weights = self.learner.step(data)
        return Handoff(weights, metrics[0], LEARNER, watch=tuple(metrics[1:]))

    def sync(self, weights: ray.ObjectRef, version: int) -> list[tuple[ray.ObjectRef, str]]:
        return (self.rollout_pool.broadcast_named(weights, version)
                + self.reference_pool.broadcast_named(weights, version))

    def requeue(self, samples: list[str]) -> None:
        self.prompts.requeue(samples)

    def recover(self, worker: str) -> bool:
        pool = self._pool_of(worker)
        return pool is not None and pool.replace(worker)

    def kill(self, worker: str) -> None:
        if worker == LEARNER:
            self.learner.shutdown()
        elif (pool := self._pool_of(worker)) is not None:
            pool.kill(worker)

    def _pool_of(self, worker: str):
        return next((p for p in (self.rollout_pool, self.reference_pool, self.reward_pool) if p.owns(worker)), None)

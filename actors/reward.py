"""Reward worker actor: a thin Ray shell over ``rewards.batch.reward_batch``."""

from __future__ import annotations

import pyarrow as pa
import ray

from actors.runtime import SINGLE_THREAD_ENV
from rewards.batch import reward_batch


@ray.remote(num_cpus=1, runtime_env={"env_vars": SINGLE_THREAD_ENV})
class RewardWorker:
    """Rewards trajectory batches; ``RewardWorker.options(num_cpus=...)`` sets its CPU share."""

    def reward(self, batch: pa.RecordBatch | pa.Table, **settings) -> pa.RecordBatch:
        """``reward_batch(batch, **settings)`` in the actor. Pass the batch's ObjectRef: Ray
        resolves it here, as a zero-copy view of the object store, and the caller gets a ref back."""
        return reward_batch(batch, **settings)

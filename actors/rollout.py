"""Rollout worker actor: a thin Ray shell over ``models.rollout.RolloutCore``.

Prompt batches arrive and rollout batches leave as Arrow RecordBatches by ObjectRef. The
actor is threaded, so a weight update can reach the engine while a call generates (calls
to the engine itself are serialised by ``models.interruptible.InterruptibleEngine``);
updates have threads of their own, so calls waiting for their weights (``min_version``)
can never hold every thread the update needs. A failed call leaves the actor alive.
"""
from __future__ import annotations

import pyarrow as pa
import ray

from actors.runtime import SINGLE_THREAD_ENV
from config import Config

WEIGHTS_GROUP = "weights"  # the actor's threads for weight updates (and version queries)

# In-process engine (the actor is the process); a 1 GiB KV cache on CPU holds ~0.5M tiny-model
# tokens (on GPUs vLLM sizes it by rollout.gpu_memory_utilization); one BLAS / OpenMP thread
# per actor, since more oversubscribe a shared node.
ENGINE_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1", **SINGLE_THREAD_ENV}


class Rollout:
    """The actor's methods; ``RolloutWorker`` is this class as a Ray actor."""

    def __init__(self, config: Config, model_path: str | None = None, engine_args: dict | None = None):
        from config.builders import feature_store, rollout_settings
        from models.rollout import RolloutCore

        self.core = RolloutCore(rollout_settings(config, model_path), feature_store(config), engine_args)

    def ping(self) -> bool:
        return True

    @ray.method(concurrency_group=WEIGHTS_GROUP)
    def version(self) -> int:
        return self.core.version

    def generate(self, prompt_batch: pa.RecordBatch | pa.Table, **sampling) -> pa.RecordBatch:
        """``RolloutCore.generate``; pass the prompt batch's ObjectRef."""
        return self.core.generate(prompt_batch, **sampling)

    @ray.method(concurrency_group=WEIGHTS_GROUP)
    def update_weights(self, state, version: int) -> dict[str, float]:
        """``RolloutCore.update_weights``; pass the ref of ``ray.put(pack_state(state))`` (read zero-copy)."""
        return self.core.update_weights(state, version)


# ``RolloutWorker.options(num_cpus=...)`` sets its CPU share.
ACTOR_OPTIONS = dict(num_cpus=0.5, max_concurrency=8, concurrency_groups={WEIGHTS_GROUP: 4},
                     runtime_env={"env_vars": ENGINE_ENV})
RolloutWorker = ray.remote(**ACTOR_OPTIONS)(Rollout)

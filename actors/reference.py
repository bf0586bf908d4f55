"""Reference actor: frozen reference logprobs + masks at the trajectory's weights version.

A thin Ray shell over `models.reference.ReferenceCore`; batches
arrive and leave as Arrow RecordBatches by ObjectRef.
"""
from __future__ import annotations

import pyarrow as pa
import ray

from actors.runtime import SINGLE_THREAD_ENV
from config import Config


@ray.remote(num_cpus=0.5, runtime_env={"env_vars": SINGLE_THREAD_ENV})
class Reference:
    def __init__(self, config: Config, model_path: str | None = None, keep_versions: int = 4):
        import torch

        from config.builders import build_segmenter, feature_store
        from models.reference import ReferenceCore

        torch.set_num_threads(1)
        model, _, _ = build_segmenter(config, model_path)
        self.core = ReferenceCore(model, feature_store(config), config.model.num_slots, keep_versions)

    def forward(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        return self.core.forward(batch)

    def update_weights(self, state, version: int) -> dict:
        """Keep the head weights of `version` (a state dict or a PackedState)."""
        self.core.update_weights(state, version)
        return {"version": version}

    def versions(self) -> list[int]:
        return sorted(self.core.heads)

"""Reference scorer actor: frozen reference logprobs + masks at the trajectory's weights version.

A thin Ray shell over `pipelines.reference_scoring.ReferenceScoring`; batches
arrive and leave as Arrow RecordBatches by ObjectRef.
"""
from __future__ import annotations

import pyarrow as pa
import ray

from pipelines.config import Config

SINGLE_THREAD_ENV = {name: "1" for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}


@ray.remote(num_cpus=0.5, runtime_env={"env_vars": SINGLE_THREAD_ENV})
class ReferenceScorer:
    def __init__(self, config: Config, model_path: str | None = None, keep_versions: int = 4):
        import torch

        from pipelines.modeling import build_segmenter
        from pipelines.precompute import feature_store
        from pipelines.reference_scoring import ReferenceScoring

        torch.set_num_threads(1)
        model, _, _ = build_segmenter(config, model_path)
        self.core = ReferenceScoring(model, feature_store(config), config.model.num_slots, keep_versions)

    def score(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        return self.core.score(batch)

    def update_weights(self, state, version: int) -> dict:
        """Keep the head weights of `version` (a state dict or a PackedState)."""
        self.core.update_weights(state, version)
        return {"version": version}

    def versions(self) -> list[int]:
        return sorted(self.core.heads)

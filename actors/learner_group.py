"""LearnerGroup: the driver's handle on the ZeRO-3 learner ranks.

Every call goes to all ranks (ZeRO-3 collectives need each of them) and the group
returns rank 0's answer. Batches and weights move as ObjectRefs only: ``step`` forwards
the refs it is given, and ``step`` and ``export_weights`` hand back the ref of rank 0's
export, which already lives in the object store, so the driver never holds weights.
"""
from __future__ import annotations

from collections.abc import Sequence

import ray

from actors.learner import LearnerRank
from config import Config


class LearnerGroup:
    """``world_size`` LearnerRank actors joined in one gloo process group."""

    def __init__(self, config: Config, world_size: int = 2, model_path: str | None = None,
                 num_cpus: float = 1.0, extensions_dir: str | None = None, zero: dict | None = None,
                 timeout_s: float | None = None, num_gpus: float = 0.0, rank_options: list[dict] | None = None,
                 inputs_log: str | None = None):
        """``extensions_dir``: where DeepSpeed's JIT-compiled CPU ops are cached (default:
        <cache_dir>/torch_extensions); ``zero``: overrides of the zero_optimization section;
        ``timeout_s`` bounds every blocking call (setup, checkpoints): GetTimeoutError past it;
        ``rank_options``: each rank's placement (its bundle of the group's placement group);
        ``inputs_log``: where rank 0 records the groups of each step (``models.learner_audit``)."""
        self.timeout_s = timeout_s
        self.ranks = [LearnerRank.options(num_cpus=num_cpus, num_gpus=num_gpus,
                                          **(rank_options[rank] if rank_options else {})).remote(
                          config, rank, world_size, model_path, extensions_dir, zero, inputs_log=inputs_log)
                      for rank in range(world_size)]
        master_addr, master_port = ray.get(self.ranks[0].endpoint.remote(), timeout=timeout_s)
        ray.get([r.setup.remote(master_addr, master_port) for r in self.ranks], timeout=timeout_s)

    def _all(self, method: str, *args) -> list:
        return ray.get([getattr(r, method).remote(*args) for r in self.ranks], timeout=self.timeout_s)

    def step(self, batch_refs: Sequence[ray.ObjectRef]) -> tuple[list[ray.ObjectRef], ray.ObjectRef]:
        """Start one optimiser step on the rows of all ``batch_refs``, then the export of its weights.

        Returns at once: (per-rank refs of the step's metrics, each over the whole batch;
        the ref of the exported PackedState). Only rank 0's export carries the weights.
        """
        metrics = [rank.train_step.remote(list(batch_refs)) for rank in self.ranks]
        weights = [rank.export_weights.remote() for rank in self.ranks]
        return metrics, weights[0]

    def export_weights(self) -> ray.ObjectRef:
        """Ref of the full weights (``lm.*``, ``projector.*``, ``head.*``) as a PackedState, put once by rank 0's
        return."""
        refs = [r.export_weights.remote() for r in self.ranks]
        ray.get(refs[1:], timeout=self.timeout_s)  # the other ranks return None; this surfaces their errors
        return refs[0]

    def version(self) -> int:
        return ray.get(self.ranks[0].version.remote(), timeout=self.timeout_s)

    def save_checkpoint(self, directory: str, tag: str) -> dict[str, dict]:
        """Every rank saves its shard (and RNG states); every file written, relative to ``directory``, with
        its size and SHA-256 (each rank hashes a share)."""
        return {f: entry for files in self._all("save_checkpoint", directory, tag) for f, entry in files.items()}

    def load_checkpoint(self, directory: str, tag: str) -> int:
        """Restore every rank (weights, optimizer, schedule, RNG); returns the restored version."""
        return self._all("load_checkpoint", directory, tag)[0]

    def save_model(self, directory: str) -> str:
        """Write a segrl model folder from the gathered weights; returns its path."""
        return self._all("save_model", directory)[0]

    def shutdown(self) -> None:
        """End this group's actors (only those this group started)."""
        for rank in self.ranks:
            ray.kill(rank)
        self.ranks = []

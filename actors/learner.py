"""LearnerRank: one rank of the ZeRO-3 learner, a Ray shell over ``models.learner.LearnerCore``.

The shell gives the core what Ray knows: the rendezvous (this node's address, a free
port), the GPU Ray assigned (``models.learner_backend`` turns it into device, process
group and precision), the rank's environment for DeepSpeed, and the rows of a step's
batches fetched by ObjectRef (zero-copy Arrow). Rank 0 also keeps the run's record of the
groups each step trained (``models.learner_audit``), from the rows it was given.
``actors.learner_group`` drives the ranks together.
"""
from __future__ import annotations

import os
import socket
from collections.abc import Sequence

import ray
import torch

from config import Config
from data.weight_transport import PackedState
from models.learner import LearnerCore, learner_rows
from models.learner_audit import record_step
from models.learner_backend import LearnerBackend, choose_backend

BATCH_FETCH_TIMEOUT_S = 600.0
"""A step's batches are ready when it starts; this bounds their transfer from other nodes."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


@ray.remote
class LearnerRank:
    """Rank ``rank`` of ``world_size``: builds its Segmenter copy and joins the ZeRO-3 group in ``setup``.

    ``backend`` replaces the one chosen from Ray's GPUs (tests: the bf16 path on CPU); ``inputs_log``:
    the file rank 0 records each step's groups in (none: no record).
    """

    def __init__(self, config: Config, rank: int, world_size: int, model_path: str | None = None,
                 extensions_dir: str | None = None, zero: dict | None = None, backend: LearnerBackend | None = None,
                 inputs_log: str | None = None):
        self.config, self.rank, self.world_size, self.zero, self.backend = config, rank, world_size, zero, backend
        self.inputs_log = inputs_log if rank == 0 else None
        self.model_path = model_path or config.resolve_path(config.model.name_or_path)
        self.extensions_dir = extensions_dir or os.path.join(config.resolve_path(config.paths.cache_dir),
                                                             "torch_extensions")

    def endpoint(self) -> tuple[str, int]:
        """Address for the group's rendezvous: this node's IP and a port free on it (asked of rank 0)."""
        return ray.util.get_node_ip_address(), free_port()

    def setup(self, master_addr: str, master_port: int) -> None:
        """Join the process group and wrap the model in a ZeRO-3 engine (all ranks at once).

        DeepSpeed reads the rendezvous from the environment even for one process (else it
        looks for MPI) and picks its accelerator at import, so both are set before the core imports it.
        """
        from config.builders import build_segmenter, feature_store, learner_settings

        c, settings = self.config, learner_settings(self.config)
        backend = self.backend or choose_backend(ray.get_gpu_ids(), os.environ.get("CUDA_VISIBLE_DEVICES"),
                                                 settings.dtype, settings.gradient_checkpointing, settings.zero_offload)
        os.environ.update(RANK=str(self.rank), LOCAL_RANK=str(self.rank), WORLD_SIZE=str(self.world_size),
                          MASTER_ADDR=master_addr, MASTER_PORT=str(master_port),
                          TORCH_EXTENSIONS_DIR=self.extensions_dir, **backend.env)
        torch.manual_seed(c.seed)  # identical initial heads on every rank and in every group
        model, tokenizer, _ = build_segmenter(c, self.model_path)
        self.core = LearnerCore(model, tokenizer, self.model_path, feature_store(c), settings,
                                self.rank, self.world_size, backend, self.zero)

    def train_step(self, batch_refs: Sequence[ray.ObjectRef]) -> dict[str, float]:
        """One optimiser step on all rows of ``batch_refs`` (every rank gets the same refs); whole-batch metrics."""
        rows = learner_rows(ray.get(list(batch_refs), timeout=BATCH_FETCH_TIMEOUT_S))
        metrics = self.core.train_step(rows)
        if self.inputs_log is not None:
            record_step(self.inputs_log, metrics["version"], (r["group_id"] for r in rows), len(rows))
        return metrics

    def version(self) -> int:
        return self.core.version()

    def export_weights(self) -> PackedState | None:
        """Full weights on rank 0, None elsewhere; every rank must enter."""
        return self.core.export_weights()

    def save_checkpoint(self, directory: str, tag: str) -> dict[str, dict]:
        return self.core.save_checkpoint(directory, tag)

    def load_checkpoint(self, directory: str, tag: str) -> int:
        return self.core.load_checkpoint(directory, tag)

    def save_model(self, directory: str) -> str | None:
        return self.core.save_model(directory)

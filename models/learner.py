"""The learner role's core, Ray-free: one rank of the DeepSpeed ZeRO-3 learner (GRPO + segmentation loss).

The learner actor (``actors.learner``) is a shell over ``LearnerCore``. A group of ranks
shards parameters, gradients and AdamW state with ZeRO-3, on the device, process group
and precision that ``models.learner_backend`` chose from the rank's GPUs. Every rank
gets all rows of a step and trains on its own contiguous shard; the loss of every
micro-batch is scaled by full-batch counts so that the update equals a single-process
step on the whole batch, whatever the world size.

ZeRO-3 gathers a module's parameters with a collective each time the module runs, so
every rank must call the same modules the same number of times in the same order (else
the ranks hang). The sample code is data-dependent: the projector runs once per row and
the segmentation head once per row with a reference token. ``lockstep_plan`` pads each
rank's micro-batch with zero-weight copies of real rows until all ranks run the same
number of rows with and without a reference token.
"""
from __future__ import annotations

import contextlib
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from data.features import FeatureStore
from data.integrity import describe, files_under
from data.schema import decode_mask
from data.trajectory import LEARNER_COLUMNS
from data.weight_transport import PackedState, pack_state
from models.grpo_step import LossSettings, LossTotals, learner_loss, usable
from models.learner_backend import LearnerBackend
from models.learner_checkpoint import WeightsOnlyEngine
from models.optim import build_optimizer, one_cycle, param_groups
from models.process_group import join_process_group
from models.segmenter import HeadSpec, Segmenter, save_segmenter

ZERO_DEFAULTS = {"stage": 3, "overlap_comm": False, "contiguous_gradients": True, "stage3_max_reuse_distance": 0}
"""overlap_comm stays off: unmanaged gradient accumulation (one ``step()`` after a variable
number of backwards) supports it only with ZeRO-2. stage3_max_reuse_distance 0: on every
module release ZeRO-3 scans its recorded module trace until that many parameters are
passed; the head runs once per row (thousands of module calls a step), so with the default
(1e9, never reached by small models) each release scans the whole trace and the step that
records it took 60 s instead of 2 s (64 rows, tiny config)."""
EXPORT_BUCKET_NUMEL = 1 << 26
"""Parameters gathered at once when exporting (256 MiB fp32): bounds the full copies on a rank."""


@dataclass(frozen=True)
class LearnerSettings:
    """The config's batching, optimiser and loss settings that a learner rank reads."""

    micro_batch_size: int  # real rows per micro-batch and rank
    lr: float
    lr_multipliers: Mapping[str, float]  # per param_modules role
    weight_decay: float
    betas: tuple[float, float]
    grad_clip: float
    schedule: str  # "one_cycle" or "constant"
    total_steps: int
    one_cycle_final_div: float
    warmup_fraction: float
    loss: LossSettings
    head: HeadSpec  # written beside the weights by ``save_model``
    dtype: str  # model.dtype: bf16 training on GPUs when bfloat16
    gradient_checkpointing: bool
    zero_offload: str  # models.learner_backend.ZERO_OFFLOADS


def lockstep_plan(has_ref: Sequence[bool], world_size: int, micro_batch_size: int
                  ) -> list[list[tuple[list[int], list[bool]]]]:
    """[rank][micro-batch] -> (row indices, live flags) for rows that may carry a reference token.

    Rank r takes the r-th of ``world_size`` contiguous shards (sizes differ by at most one
    when the count does not divide); each shard is cut into the same number of contiguous
    micro-batches of at most ``micro_batch_size`` real rows. A micro-batch is then padded
    with non-live copies of the first row with (without) a reference token until it has
    as many of each as the fullest rank's, so all ranks run identical module sequences.
    """
    if not has_ref:
        raise ValueError("no rows to plan")
    shards = np.array_split(np.arange(len(has_ref)), world_size)
    n_micro = -(-max(len(s) for s in shards) // micro_batch_size)
    chunks = [[c.tolist() for c in np.array_split(s, n_micro)] for s in shards]
    filler = {flag: next((i for i, h in enumerate(has_ref) if h == flag), None) for flag in (True, False)}
    plan: list[list[tuple[list[int], list[bool]]]] = [[] for _ in range(world_size)]
    for j in range(n_micro):
        need = {flag: max(sum(has_ref[i] == flag for i in chunks[r][j]) for r in range(world_size))
                for flag in (True, False)}
        for r in range(world_size):
            rows = chunks[r][j]
            pads = [filler[flag] for flag in (True, False)
                    for _ in range(need[flag] - sum(has_ref[i] == flag for i in rows))]
            plan[r].append((rows + pads, [True] * len(rows) + [False] * len(pads)))
    return plan


def learner_rows(batches: Sequence[pa.RecordBatch]) -> list[dict]:
    """The learner's columns of every row of a step's batches, in order, GT RLEs decoded.

    A batch without an ``error`` column has no errors.
    """
    rows = []
    for batch in batches:
        names = [c for c in LEARNER_COLUMNS if c in batch.schema.names]
        columns = {c: batch.column(c).to_pylist() for c in names}
        columns["gt_masks"] = [[decode_mask(rle) for rle in rles or []] for rles in columns["gt_masks"]]
        rows += [{"error": None, **{c: columns[c][i] for c in names}} for i in range(batch.num_rows)]
    return rows


def rng_states() -> dict:
    """Python, numpy and torch generator states (a rank's share of an exact resume), as tensors and
    plain values only: a checkpoint is read weights-only (``models.learner_checkpoint``)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"python": random.getstate(), "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss,
                                                     gauss), "torch": torch.get_rng_state()}


def restore_rng(states: dict) -> None:
    name, keys, pos, has_gauss, gauss = states["numpy"]
    random.setstate(states["python"])
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(states["torch"])


class LearnerCore:
    """Rank ``rank`` of ``world_size``: a ZeRO-3 engine over ``model`` and its AdamW, on ``backend``.

    Built by all ranks at once, after the process group's rendezvous and ``backend.env``
    are in the environment (DeepSpeed picks its accelerator at import). Every method but
    ``version`` runs collectives: all ranks call it. ``source``: the folder ``model`` was
    loaded from (its frozen encoders are copied by ``save_model``); ``zero``: overrides of
    ``ZERO_DEFAULTS`` and the backend's offload entries.
    """

    def __init__(self, model: Segmenter, tokenizer, source: str, features: FeatureStore, settings: LearnerSettings,
                 rank: int, world_size: int, backend: LearnerBackend, zero: Mapping | None = None):
        import deepspeed

        self.deepspeed, self.tokenizer, self.source = deepspeed, tokenizer, source
        self.store, self.settings, self.rank, self.world_size = features, settings, rank, world_size
        self.backend, self.dtype = backend, getattr(torch, backend.dtype)
        self.zero = {**ZERO_DEFAULTS, **backend.zero, **(zero or {})}
        self.ref_token_id = model.policy.ref_token_id
        if backend.gradient_checkpointing:
            model.policy.lm.gradient_checkpointing_enable()
        s = settings
        optimizer = build_optimizer(param_groups(model.param_modules(), s.lr, dict(s.lr_multipliers), s.weight_decay),
                                    tuple(s.betas))
        if s.schedule == "one_cycle":
            schedule = one_cycle(optimizer, s.total_steps, s.one_cycle_final_div, s.warmup_fraction)
        else:
            schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
        # The frozen SAE stays outside ZeRO-3, replicated: the head calls its `encode`
        # method, not its forward, and the head returns a dataclass, so ZeRO-3's hooks
        # would not re-gather the SAE weights for the backward through its activations.
        sae = getattr(model.head, "sae", None)  # READ's head has none
        if sae is not None:
            del model.head.sae
            sae.to(backend.device, self.dtype)  # the head feeds it states of the engine's dtype
        if not torch.distributed.is_initialized():
            join_process_group(backend.dist_backend)
        deepspeed.init_distributed(dist_backend=backend.dist_backend, auto_mpi_discovery=False)  # adopts the group
        self.engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=schedule,
                                               config=self._ds_config(), dist_init_required=False)
        self.engine.checkpoint_engine = WeightsOnlyEngine(self.engine.checkpoint_engine)  # never unpickle code
        if sae is not None:
            object.__setattr__(model.head, "sae", sae)  # an attribute, not a submodule: ZeRO-3 never sees it

    def _ds_config(self) -> dict:
        return {
            "train_micro_batch_size_per_gpu": self.settings.micro_batch_size,
            "gradient_accumulation_steps": 1,
            "managed_gradient_accumulation": False,  # a step's micro-batch count varies with its rows
            "gradient_clipping": self.settings.grad_clip,
            "zero_optimization": self.zero,
            "steps_per_print": 1 << 30,
            **self.backend.ds_config,
        }

    def _plan(self, rows: list[dict]) -> tuple[list[tuple[list[int], list[bool]]], dict]:
        """This rank's micro-batches and the features of the images they use, on the device in its dtype."""
        has_ref = [self.ref_token_id in r["response_ids"] for r in rows]
        plan = lockstep_plan(has_ref, self.world_size, self.settings.micro_batch_size)[self.rank]
        hashes = {rows[i]["image_hash"] for idx, _ in plan for i in idx}
        return plan, {h: {k: v.to(self.backend.device, self.dtype if v.is_floating_point() else v.dtype)
                          for k, v in self.store.get(h).items()} for h in hashes}

    def _forward_context(self) -> contextlib.ExitStack:
        """On a GPU, tensors the loss builds without a device (padded logprobs, GT masks) go there
        too; in bf16, autocast lets SAM's fp32 positional encodings meet its bf16 weights."""
        stack = contextlib.ExitStack()
        if self.backend.on_gpu:
            stack.enter_context(torch.device(self.backend.device))
        if self.dtype != torch.float32:
            stack.enter_context(torch.autocast(torch.device(self.backend.device).type, dtype=self.dtype))
        return stack

    def train_step(self, rows: list[dict]) -> dict[str, float]:
        """One optimiser step on ``rows`` (``learner_rows`` of the step; every rank gets them all).

        Returns the whole batch's metrics (reduced over ranks): loss, GRPO terms weighted
        like the loss, token-weighted clip fraction and learner-vs-rollout |Δ logprob|, the
        mean segmentation loss, Dice loss and SAE reconstruction MSE (``learner_loss``; NaN for
        a step without rows they count), counts, the gradient norm before clipping, LM lr, version.
        """
        kept = [r for r in rows if usable(r)]
        if not kept:
            raise ValueError(f"all {len(rows)} rows of the step carry an error")
        totals = LossTotals.of(kept, self.settings.loss.loss_aggregation, self.ref_token_id)
        plan, feats = self._plan(kept)
        self.engine.train()
        sums = torch.zeros(12, dtype=torch.float64)
        for idx, live in plan:
            with self._forward_context():
                loss, m = learner_loss(self.engine, [kept[i] for i in idx], feats, self.settings.loss, totals, live)
            self.engine.backward(loss * self.world_size, scale_wrt_gas=False)  # ZeRO averages over ranks
            u, t, s, d = m["pg_units"], m["tokens"], m["seg_rows"], m["dice_rows"]
            sums += torch.tensor([m["loss"], m["pg_loss"] * u, m["kl"] * u, m["clip_fraction"] * t,
                                  m["logprob_mismatch"] * t, m["seg"] * s, u, t, s, m["dice"] * d,
                                  m["sae_mse"] * s, d], dtype=torch.float64)
        self.engine.step()
        sums = sums.to(self.backend.device)  # NCCL reduces device tensors only
        torch.distributed.all_reduce(sums)
        loss, pg, kl, clip, mismatch, seg, u, t, s, dice, sae_mse, d = sums.tolist()
        return {"loss": loss, "pg_loss": pg / max(u, 1), "kl": kl / max(u, 1), "clip_fraction": clip / max(t, 1),
                "logprob_mismatch": mismatch / max(t, 1), "seg": seg / max(s, 1), "tokens": t, "seg_rows": s,
                "dice": dice / d if d else float("nan"), "sae_mse": sae_mse / s if s else float("nan"),
                "rows": len(kept), "dropped_rows": len(rows) - len(kept),
                "grad_norm": float(self.engine.get_global_grad_norm()), "lr": self.engine.get_lr()[0],
                "version": self.version()}

    def version(self) -> int:
        """Optimiser steps taken: the weights version rollouts are tagged with."""
        return int(self.engine.global_steps)

    def _export_entries(self) -> list[tuple[str, torch.Tensor]]:
        """(exported name, parameter or buffer): LM under HF names, projector, head without the SAE."""
        model = self.engine.module
        return [(f"{prefix}.{name}", tensor)
                for prefix, module in (("lm", model.policy.lm), ("projector", model.policy.projector),
                                       ("head", model.head))
                for name, tensor in module.state_dict(keep_vars=True).items()]

    def export_weights(self) -> PackedState | None:
        """Full weights on rank 0 (CPU copies in the engine's dtype, packed as raw bytes), None elsewhere.

        Parameters are gathered bucket by bucket (``EXPORT_BUCKET_NUMEL``), so no rank
        ever holds more than one bucket of full parameters besides rank 0's result. The
        result is a ``PackedState``: it enters the object store as numpy buffers, which
        receivers map zero-copy instead of unpickling tensors (bench/weight_sync.py).
        """
        entries, state = self._export_entries(), {}
        for bucket in _buckets(entries):
            params = list({id(t): t for _, t in bucket if hasattr(t, "ds_id")}.values())
            with self.deepspeed.zero.GatheredParameters(params, modifier_rank=None):
                if self.rank == 0:
                    state.update((name, t.detach().to("cpu", copy=True)) for name, t in bucket)
        return pack_state(state) if self.rank == 0 else None

    def save_checkpoint(self, directory: str, tag: str) -> dict[str, dict]:
        """DeepSpeed's checkpoint ``directory/tag`` (this rank's partitions of weights and AdamW state,
        schedule, step counter) plus this rank's RNG states.

        DeepSpeed's save ends in a barrier, so every rank's files are written by then; each
        rank then hashes its share of them. Returns that share, ``data.integrity.describe``d
        (names relative to ``directory``); the union over ranks covers every file.
        """
        self.engine.save_checkpoint(directory, tag=tag, client_state={"rng": rng_states()}, save_latest=False)
        return describe(directory, files_under(directory, tag)[self.rank::self.world_size])

    def load_checkpoint(self, directory: str, tag: str) -> int:
        """Restore a ``save_checkpoint`` (its files read weights-only); returns the restored version."""
        path, client = self.engine.load_checkpoint(directory, tag=tag)
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint {tag!r} in {directory}")
        if client and "rng" in client:
            restore_rng(client["rng"])
        return self.version()

    def save_model(self, directory: str) -> str | None:
        """A segrl model folder (servable, loadable as model.name_or_path) written by rank 0."""
        params = [p for p in self.engine.module.parameters() if hasattr(p, "ds_id")]
        with self.deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            if self.rank == 0:
                return str(save_segmenter(self.engine.module, self.settings.head, self.tokenizer, self.source,
                                          directory))
        return None


def _buckets(entries: list[tuple[str, torch.Tensor]]) -> list[list[tuple[str, torch.Tensor]]]:
    """Consecutive entries of at most EXPORT_BUCKET_NUMEL elements each (a larger tensor alone)."""
    buckets, size = [[]], 0
    for name, tensor in entries:
        numel = getattr(tensor, "ds_numel", tensor.numel())
        if buckets[-1] and size + numel > EXPORT_BUCKET_NUMEL:
            buckets.append([])
            size = 0
        buckets[-1].append((name, tensor))
        size += numel
    return buckets

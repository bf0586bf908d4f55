"""What a GRPO run records per step: metrics (JSONL + TensorBoard) and a progress bar.

Checkpoints (when, what, where) belong to ``run_checkpoints``; the log calls its hook
after logging a step, so a checkpoint never precedes the metrics of its step.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from pathlib import Path

from tqdm import tqdm

from pipelines.grpo.handoff import StepRecord
from pipelines.grpo.metrics_log import DEFAULT_LOGGERS, MetricsLog


def step_metrics(record: StepRecord, phases: dict) -> dict:
    """Flat-able dict of one step: learner terms, rewards of the chunks it trained, staleness, timings."""
    rows = sum(r["rows"] for r in record.rewards) or 1
    mean = lambda key: sum(r[key] * r["rows"] for r in record.rewards) / rows  # noqa: E731
    groups = sum(r["groups"] for r in record.rewards) or 1
    learner = record.metrics
    return {
        "reward": {"total": mean("reward"), "format": mean("format"), "mask": mean("mask")},
        "zero_variance_groups": sum(r["zero_variance_groups"] for r in record.rewards) / groups,
        "error_rows": sum(r["errors"] for r in record.rewards),
        "loss": {k: learner[k] for k in ("loss", "pg_loss", "kl", "seg", "dice") if k in learner},
        "sae_mse": learner.get("sae_mse"),
        "clip_fraction": learner.get("clip_fraction"),
        "logprob_mismatch": learner.get("logprob_mismatch"),
        "grad_norm": learner.get("grad_norm"),
        "lr": learner.get("lr"),
        "staleness": {str(k): v for k, v in sorted(record.staleness.items())},
        "rollout": {"interrupted_updates": record.interrupted_updates},
        "faults": {k: record.faults.get(k, 0) for k in ("actor_failures", "restarts", "retries", "stalls", "resumes")},
        "time": {"learn_s": record.learn_s, "learner_wait_s": record.wait_s,
                 "tokens_per_s": learner.get("tokens", 0) / max(record.learn_s, 1e-9)},
        "busy_fraction": {name: p["busy_fraction"] for name, p in phases.items() if "busy_fraction" in p},
    }


class RunLog:
    """The scheduler's `on_step`: log, show progress, then ``checkpoint(steps trained)``.

    ``checkpoint``: a ``run_checkpoints.Checkpointer``. ``start_step``: the steps a resumed
    run had already trained. ``loggers``: the metrics backends (``train.loggers``). ``hooks``:
    called with each record before it is logged; the sections they return join its metrics
    (e.g. ``elastic.ElasticRollouts``: the rollout pool's size and scale events).
    """

    def __init__(self, run_dir: Path, total_steps: int, timer, checkpoint: Callable[[int], None],
                 start_step: int = 0, loggers: Iterable[str] = DEFAULT_LOGGERS,
                 hooks: Iterable[Callable[[StepRecord], dict]] = ()):
        self.metrics = MetricsLog(run_dir, loggers, resume_after=start_step if start_step else None)
        self.bar = tqdm(total=total_steps, initial=start_step, desc="grpo", unit="step")
        self.timer, self.checkpoint, self.hooks = timer, checkpoint, list(hooks)
        self.rewards: list[float] = []
        self.started = time.perf_counter()

    def __call__(self, record: StepRecord) -> None:
        metrics = step_metrics(record, self.timer.report())
        metrics["time"]["elapsed_s"] = time.perf_counter() - self.started  # since this attempt started
        for hook in self.hooks:
            for section, values in hook(record).items():
                metrics.setdefault(section, {}).update(values)
        flat = self.metrics.log(record.step + 1, metrics)
        self.rewards.append(flat["reward/total"])
        self.bar.set_postfix(reward=f"{flat['reward/total']:.3f}", mask=f"{flat['reward/mask']:.3f}",
                             kl=f"{flat.get('loss/kl', 0):.4f}")
        self.bar.update()
        self.checkpoint(record.step + 1)

    def close(self) -> None:
        self.bar.close()
        self.metrics.close()

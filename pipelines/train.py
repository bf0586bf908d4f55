"""`segrl train` (also `python -m pipelines.train`): distributed GRPO, then evaluation.

Top-down: join or start a Ray cluster, build the prompt stream, start the four
actor kinds, restore the newest complete checkpoint when resuming, let the
asynchronous scheduler run the steps under the staleness bound (resizing the
rollout pool after each step when ``cluster.rollout_autoscale`` is set), save
the final model, evaluate it. A learner failure ends the attempt and the run resumes from
its last checkpoint (``train.max_learner_restarts`` times). The driver holds
ObjectRefs and small metadata only.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import ray
from transformers import AutoTokenizer

from cluster.local import connect
from cluster.topology import start_actors
from config import Config, dump_config, load_config
from config.builders import feature_store
from models.encoders import sam_checkpoint
from models.sam import sam_image_size
from models.segmenter import verify_model_folder
from pipelines.grpo.admission import StalenessController
from pipelines.grpo.elastic import ElasticRollouts
from pipelines.grpo.handoff import LearnerFailure
from pipelines.grpo.ledger import Ledger
from pipelines.grpo.metrics_log import require_loggers
from pipelines.grpo.prompts import PromptStream, prompt_rows
from pipelines.grpo.publish import MODEL, Publisher, after_step, publish_interval
from pipelines.grpo.resume import driver_state, restore
from pipelines.grpo.run_checkpoints import (
    Checkpointer,
    RunCheckpoint,
    latest_checkpoint,
)
from pipelines.grpo.run_folder import prepare_run_folder
from pipelines.grpo.run_log import RunLog
from pipelines.grpo.scheduler import Scheduler
from pipelines.grpo.stages import ActorStages


def train(config: Config, resume: bool | str = False, overwrite: bool = False) -> dict:
    """A run into ``train.output``: fresh (into a new or empty folder; ``overwrite`` replaces an
    earlier run's) or resumed from its newest complete checkpoint; ``resume="auto"`` resumes a
    run found there and starts one otherwise. The folder, the checkpoint and the starting model
    are checked before anything is written (``run_folder``)."""
    require_loggers(config.train.loggers)
    run_dir = Path(config.resolve_path(config.train.output))
    verify_model_folder(config.resolve_path(config.train.init_from))
    checkpoint = prepare_run_folder(run_dir, config.resolve_path(config.train.init_from), resume, overwrite)
    connect(config.cluster.address)
    (run_dir / "config.yaml").write_text(dump_config(config))
    for attempt in range(config.train.max_learner_restarts + 1):
        try:
            final, log, report, ledger = run_grpo(config, run_dir, checkpoint)
            break
        except LearnerFailure as exc:
            if attempt == config.train.max_learner_restarts:
                raise
            print(f"[segrl] {exc}; resuming from the last checkpoint "
                  f"(automatic resume {attempt + 1} of {config.train.max_learner_restarts})", flush=True)
            checkpoint = latest_checkpoint(run_dir / "checkpoints")
    reference = config.cluster.reference  # the actors are gone: evaluation takes the reference's place
    evaluation = ray.get(evaluate_checkpoint.options(num_cpus=reference.num_cpus, num_gpus=reference.num_gpus)
                         .remote(config, final, config.train.eval_samples)) if config.train.eval_samples else None
    summary = {"model": final, "eval": evaluation, "rewards": log.rewards, "admission": report.admission,
               "ledger": ledger.summary(), "phases": report.phases, "wall_s": report.wall_s}
    (run_dir / "report.json").write_text(json.dumps(summary, indent=2, default=float))
    return summary


def run_grpo(config: Config, run_dir: Path, checkpoint: RunCheckpoint | None):
    """One attempt from ``checkpoint`` (None: step 0): (final model folder, RunLog, RunReport, ledger);
    LearnerFailure ends it early."""
    model_path = config.resolve_path(config.train.init_from)
    prompts = PromptStream(load_prompts(config, model_path, config.data.train_split), config.seed)
    actors = start_actors(config, model_path)
    try:
        controller = StalenessController(config.train.staleness, config.grpo.prompts_per_step,
                                         config.train.max_in_flight, config.train.staleness_mode)
        ledger, faults = restore(checkpoint, actors, prompts, controller) if checkpoint else (Ledger(), {})
        scheduler = Scheduler(ActorStages(prompts, actors.rollout, actors.reference, actors.reward, actors.learner),
                              controller, groups_per_call=config.train.groups_per_call,
                              straggler_timeout_s=config.train.straggler_timeout_s, ledger=ledger,
                              max_retries=config.train.max_retries, stall_timeout_s=config.train.stall_timeout_s)
        scheduler.faults.update(faults)
        scheduler.faults["resumes"] = faults.get("resumes", 0) + (checkpoint is not None)
        snapshot = lambda: (driver_state(prompts, scheduler.faults), ledger)  # noqa: E731
        checkpointer = Checkpointer(run_dir / "checkpoints", config.train.checkpoint_every,
                                    config.train.keep_checkpoints, actors.learner, snapshot)
        elastic = ElasticRollouts.from_config(config, actors, scheduler.timer)
        publisher = Publisher(run_dir / MODEL, publish_interval(config.train), config.train.steps, actors.learner)
        log = RunLog(run_dir, config.train.steps, scheduler.timer, after_step(checkpointer, publisher),
                     controller.learner_version, config.train.loggers, hooks=[elastic] if elastic else [])
        scheduler.on_step = log
        try:
            report = scheduler.run(config.train.steps - controller.learner_version)
            final = actors.learner.save_model(str(run_dir / MODEL))
        finally:
            log.close()
            if elastic:
                elastic.close()
        ledger.save(run_dir / "ledger.json")
    finally:
        actors.stop()
    return final, log, report, ledger


def load_prompts(config: Config, model_path: str, split: str) -> list[dict]:
    """Prompt rows of a split, tokenized with the run's tokenizer (small metadata)."""
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    img_size = sam_image_size(config.model.sam.variant,
                              sam_checkpoint(config.model.sam.variant, config.model.sam.checkpoint, model_path))
    root = Path(config.resolve_path(config.data.root))
    return prompt_rows(root / f"{split}.parquet", tokenizer, feature_store(config), img_size,
                       config.model.ref_token, config.model.num_slots)


@ray.remote
def evaluate_checkpoint(config: Config, checkpoint: str, limit: int) -> dict:
    """Eval in a Ray task, so the driver never loads a model."""
    from pipelines.evaluate import run_eval

    return run_eval(config, checkpoint, config.data.eval_splits[0], limit)["metrics"]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    config = load_config(argv[0] if argv else "configs/tiny.yaml", argv[1:])
    print(json.dumps(train(config)["eval"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

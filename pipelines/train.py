"""`segrl train` (also `python -m pipelines.train`): distributed GRPO, then evaluation.

Top-down: join or start a Ray cluster, build the prompt stream, start the four
actor kinds, let the asynchronous scheduler run the steps under the staleness
bound, save the final model, evaluate it. The driver holds ObjectRefs and
small metadata only.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import ray
from transformers import AutoTokenizer

from cluster.local import connect
from models.sam import sam_image_size
from models.encoders import sam_checkpoint
from pipelines.admission import StalenessController
from pipelines.config import Config, dump_config, load_config
from pipelines.precompute import feature_store
from pipelines.prompts import PromptStream, prompt_rows
from pipelines.run_log import RunLog
from pipelines.scheduler import Scheduler
from pipelines.stages import ActorStages
from pipelines.topology import start_actors


def train(config: Config) -> dict:
    connect(config.cluster.address)
    run_dir = Path(config.resolve_path(config.train.output))
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(dump_config(config))
    model_path = config.resolve_path(config.train.init_from)
    prompts = PromptStream(load_prompts(config, model_path, config.data.train_split), config.seed)

    actors = start_actors(config, model_path)
    controller = StalenessController(config.train.staleness, config.grpo.prompts_per_step, config.train.max_in_flight)
    scheduler = Scheduler(ActorStages(prompts, actors.pool, actors.scorer, actors.rewards, actors.learner),
                          controller, groups_per_call=config.train.groups_per_call,
                          straggler_timeout_s=config.train.straggler_timeout_s)
    log = RunLog(run_dir, config.train.steps, config.train.checkpoint_every, actors.learner, prompts,
                 scheduler.timer)
    scheduler.on_step = log
    try:
        report = scheduler.run(config.train.steps)
        final = actors.learner.save_model(str(run_dir / "model"))
    finally:
        log.close()
        actors.stop()
    scorer = config.cluster.scorer  # the actors are gone: evaluation takes the scorer's place
    evaluation = ray.get(evaluate_checkpoint.options(num_cpus=scorer.num_cpus, num_gpus=scorer.num_gpus)
                         .remote(config, final, config.train.eval_samples))
    summary = {"model": final, "eval": evaluation, "rewards": log.rewards, "admission": report.admission,
               "phases": report.phases, "wall_s": report.wall_s}
    (run_dir / "report.json").write_text(json.dumps(summary, indent=2, default=float))
    return summary


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

"""`segrl main`: the whole job, each stage cached, then the report, its JSON and the plots."""
from __future__ import annotations

import argparse
from pathlib import Path

from config import Config
from pipelines.commands.registry import command, force_flag
from pipelines.commands.setup import cmd_make_data, cmd_make_tiny, cmd_precompute, precompute_args


def _main_args(p: argparse.ArgumentParser) -> None:
    force_flag(p)
    precompute_args(p)


@command("main", "the main job: data, tiny models, features, SAE, SFT warm start, GRPO, eval; prints a report",
         _main_args)
def cmd_main(config: Config, args: argparse.Namespace) -> None:
    from pipelines import sae_train, sft
    from pipelines.build import cached_step, grpo_params, report_lines, sft_params, step_params
    from pipelines.evaluate import table_lines
    from pipelines.grpo.reward_trend import reward_trend
    from pipelines.plot import plot_run
    from pipelines.report import change_line, checkpoints_change, write_main_report
    from pipelines.train import train

    data = cmd_make_data(config, args)
    tiny = cmd_make_tiny(config, args)
    feats = cmd_precompute(config, args)
    sae_report = cached_step("sae-train", Path(config.resolve_path(config.model.sae.path)),
                             step_params(config, "model.sae"), lambda: sae_train.run_sae_train(config), args.force)
    sft_step = sft_params(config, config)
    sft_report = cached_step("sft", Path(config.resolve_path(config.sft.output)), sft_step,
                             lambda: sft.run_sft(config), args.force)
    grpo = cached_step("train", Path(config.resolve_path(config.train.output)), grpo_params(config, sft_step),
                       lambda: train(config, overwrite=True), args.force)
    change = checkpoints_change(config, sft_report["checkpoint"], grpo["model"])
    print("\n".join(
        report_lines(config, data, tiny, feats) + sae_train.report_lines(sae_report)
        + ["val metrics (first %d samples):" % config.train.eval_samples]
        + table_lines({"after SFT": sft_report["after"], "after GRPO": grpo["eval"]})
        + [change_line(change, "GRPO - SFT"), reward_trend(grpo["rewards"]).line(),
           f"GRPO model {grpo['model']}; metrics {config.resolve_path(config.train.output)}/metrics.jsonl"]))
    print(f"report {write_main_report(config, sft_report['after'], grpo['eval'], change)}")
    print("\n".join(plot_run(config, config.resolve_path(config.train.output)).lines()))

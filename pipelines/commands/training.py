"""Commands that train and score models: SAE, SFT, GRPO, the ledger, eval, export."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from config import Config
from pipelines.commands.registry import address_flag, check_model_folder, command, positive_int, run_folder_arg


@command("sae-train", "collect layer-k states of the policy (Ray Data), train and freeze the SAE", address_flag)
def cmd_sae_train(config: Config, args: argparse.Namespace) -> dict:
    from cluster.local import connect
    from pipelines.sae_train import report_lines, run_sae_train

    connect(args.address)
    report = run_sae_train(config)
    print("\n".join(report_lines(report)))
    return report


@command("sft", "supervised warm start (format + segmentation); prints val metrics before and after")
def cmd_sft(config: Config, args: argparse.Namespace) -> dict:
    from pipelines.sft import report_lines, run_sft

    report = run_sft(config)
    print("\n".join(report_lines(report)))
    return report


def _train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--resume", metavar="RUN", help="continue the run in folder RUN from its newest complete "
                   "checkpoint (its config.yaml, plus any overrides given); train.resume=auto in the config "
                   "continues the run in train.output if there is one and starts it otherwise")
    p.add_argument("--overwrite", action="store_true", help="replace the GRPO run already in train.output (without "
                   "it, a fresh run needs a new or empty folder)")


@command("train", "distributed GRPO on Ray (rollout pool, reference actors, reward workers, ZeRO-3 learner), "
         "then eval", _train_args)
def cmd_train(config: Config, args: argparse.Namespace) -> dict:
    from pipelines.evaluate import table_lines
    from pipelines.grpo.ledger import format_summary
    from pipelines.grpo.reward_trend import reward_trend
    from pipelines.train import train

    summary = train(config, resume=True if args.resume else config.train.resume, overwrite=args.overwrite)
    print(format_summary(summary["ledger"]))
    rewards = summary["rewards"]
    if summary["eval"]:
        print("\n".join(table_lines({"after GRPO": summary["eval"]})))
    if rewards:
        print(reward_trend(rewards).line())
    print(f"model {summary['model']}")
    return summary


@command("ledger", "summarise a run's trajectory ledger: samples per state, drops and retries by reason, "
         "staleness; checks that every sample was trained at most once", run_folder_arg)
def cmd_ledger(config: Config, args: argparse.Namespace) -> None:
    from pipelines.grpo.ledger import format_summary
    from pipelines.grpo.run_checkpoints import run_ledger

    run = run_ledger(Path(args.run))
    print(f"{run.source}")
    print(format_summary(run.ledger.summary()))
    run.ledger.check(1 << 62 if run.eta is None else run.eta, batch_size=run.batch_size)
    bound = "admission-only staleness bound" if run.eta is None else f"staleness bound eta={run.eta}"
    print(f"exactly-once check: passed ({bound}, {run.batch_size} groups every step)")


def _eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", help="model folder to evaluate (default: model.name_or_path)")
    p.add_argument("--split", default=None, help="split name (default: the first of data.eval_splits)")
    p.add_argument("--limit", type=positive_int, help="evaluate only the first N samples")
    p.add_argument("--out", help="JSON file for the metrics (default: <checkpoint>/eval-<split>.json)")
    p.add_argument("--baselines", action="store_true", help="also score trivial baselines on the same samples: "
                   "refuse, a random shape, the largest shape, every coloured pixel (synthetic splits)")


@command("eval", "generate, segment and score a split: gIoU, cIoU, N-acc, T-acc, reasoning accuracy, format "
         "validity", _eval_args)
def cmd_eval(config: Config, args: argparse.Namespace) -> dict:
    from pipelines.evaluate import run_eval, table_lines

    check_model_folder(config, args.checkpoint)
    result = run_eval(config, args.checkpoint, args.split, args.limit, args.out, args.baselines)
    print("\n".join(table_lines({result["split"]: result["metrics"], **result["baselines"]})))
    print(f"saved {result['path']}")
    return result


def _export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="a model folder (make-tiny's, a run's model/) or an "
                   "SFT or GRPO run folder (its model/ is exported)")
    p.add_argument("--out", required=True, help="folder to write (new or empty)")
    p.add_argument("--overwrite", action="store_true", help="replace what --out holds")


@command("export", "write a model as one Hugging Face folder, safetensors only: the LM and the tokenizer with the "
         "reference token, projector, head, SAM, SAE, and a config describing each part", _export_args)
def cmd_export(config: Config, args: argparse.Namespace) -> Path:
    from config.builders import export_settings
    from models.export import export_model
    from models.export_format import EXPORT_CONFIG, model_folder

    source = model_folder(args.checkpoint)
    out = export_model(source, args.out, export_settings(config), args.overwrite)
    head = json.loads((out / EXPORT_CONFIG).read_text())["parts"]["head"]
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"exported {source} -> {out} ({head['kind']} head, {'trained' if head['trained'] else 'untrained'}; "
          f"{size / 2**20:.1f} MiB)")
    return out

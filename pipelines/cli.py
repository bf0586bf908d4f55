"""The `segrl` command. Each subcommand takes `--config FILE` and `key=value` overrides.

Errors a user can fix (bad config, bad data file) print one clear line and
exit with status 2, never a traceback.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from config import Config, ConfigError, dump_config, load_config
from data.schema import DataError
from pipelines.grpo.ledger import LedgerError

DEFAULT_CONFIG = "configs/tiny.yaml"
COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable]] = {}


def command(name: str, help_text: str, add_args: Callable[[argparse.ArgumentParser], None] = lambda p: None):
    """Register a subcommand: `fn(config, args)`."""

    def wrap(fn: Callable) -> Callable:
        COMMANDS[name] = (help_text, add_args, fn)
        return fn

    return wrap


@command("config", "print the resolved configuration as YAML")
def cmd_config(config: Config, args: argparse.Namespace) -> None:
    print(dump_config(config), end="")


def _plan_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--cluster", metavar="SPEC", help="check against nodes described as gpu=16,cpu=96 (totals) or "
                       "2x(gpu=8,cpu=64)+cpu=16 (per node), or a KubeRay RayCluster YAML file")
    where.add_argument("--address", help="check against the live Ray cluster at this address (its total resources)")


@command("plan", "the actors a GRPO run starts, their GPUs, CPUs, memory estimate and placement groups, and "
         "whether they fit a cluster", _plan_args)
def cmd_plan(config: Config, args: argparse.Namespace) -> dict:
    import json

    import yaml

    from cluster import placement

    p, nodes, where = placement.plan(config), None, args.cluster
    if args.cluster and Path(args.cluster).is_file():
        nodes = placement.raycluster_nodes(yaml.safe_load(Path(args.cluster).read_text()))
    elif args.cluster:
        nodes = placement.parse_cluster(args.cluster)
    elif args.address:
        import ray

        from cluster.local import connect, disconnect

        connect(args.address)
        nodes, where = placement.nodes_from_ray(ray.nodes()), f"at {args.address}"
        disconnect()
    result = None if nodes is None else placement.fit(p, nodes)
    out = placement.plan_json(p, result)
    print(json.dumps(out) if args.json else "\n".join(placement.plan_lines(p, result, where)))
    if result is not None and not result.fits:
        raise placement.PlacementError(result.error)
    return out


def _force(p: argparse.ArgumentParser) -> None:
    p.add_argument("--force", action="store_true", help="rebuild even if an up-to-date copy exists")


@command("make-data", "generate the synthetic reasoning-segmentation dataset", _force)
def cmd_make_data(config: Config, args: argparse.Namespace) -> dict:
    from pipelines.build import build_synthetic

    return build_synthetic(config, force=args.force)


@command("make-tiny", "build the tiny tokenizer, LM, vision encoder, projector and SAM", _force)
def cmd_make_tiny(config: Config, args: argparse.Namespace) -> dict:
    from pipelines.build import build_tiny

    return build_tiny(config, force=args.force)


def _address(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS or a new local cluster)")


def _precompute_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--splits", nargs="+", help="split names (default: train + eval splits)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--concurrency", type=int, default=1, help="encoder actors")
    _address(p)


@command("precompute", "cache frozen vision/SAM encoder features per image (Ray Data)", _precompute_args)
def cmd_precompute(config: Config, args: argparse.Namespace) -> dict:
    from cluster.local import connect
    from pipelines.precompute import precompute

    connect(args.address)
    report = precompute(config, args.splits, batch_size=args.batch_size, concurrency=args.concurrency)
    print("\n".join(report.lines()))
    return {"encoded": report.encoded, "cached": report.cached, "failed": len(report.failures)}


def _convert_args(p: argparse.ArgumentParser) -> None:
    from data.converters import CONVERTERS

    p.add_argument("format", choices=sorted(CONVERTERS), help="upstream dataset format")
    p.add_argument("src", help="upstream file or folder (see README: Datasets)")
    p.add_argument("--split", required=True, help="split to convert (train, val, test, testA, ...)")
    p.add_argument("--out", required=True, help="canonical Parquet file to write")
    p.add_argument("--image-root", help="folder of the images (REFER/gRefCOCO: COCO train2014)")


@command("convert", "convert ReasonSeg / RefCOCO(+/g) / gRefCOCO into the canonical schema", _convert_args)
def cmd_convert(config: Config, args: argparse.Namespace) -> None:
    from data.converters import convert
    from data.schema import read_table

    out = convert(args.format, args.src, args.split, args.out, image_root=args.image_root)
    print(f"wrote {read_table(out).num_rows} samples to {out}")


@command("sae-train", "collect layer-k states of the policy (Ray Data), train and freeze the SAE", _address)
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
                   "checkpoint (its config.yaml, plus any overrides given)")


@command("train", "distributed GRPO on Ray (rollout pool, reference actors, reward workers, ZeRO-3 learner), "
         "then eval", _train_args)
def cmd_train(config: Config, args: argparse.Namespace) -> dict:
    from pipelines.evaluate import table_lines
    from pipelines.grpo.ledger import format_summary
    from pipelines.train import train

    summary = train(config, resume=bool(args.resume))
    print(format_summary(summary["ledger"]))
    rewards = summary["rewards"]
    if summary["eval"]:
        print("\n".join(table_lines({"after GRPO": summary["eval"]})))
    if rewards:
        k = max(1, len(rewards) // 5)
        print(f"reward: first {k} steps {sum(rewards[:k]) / k:.3f} -> last {k} steps {sum(rewards[-k:]) / k:.3f}")
    print(f"model {summary['model']}")
    return summary


def _ledger_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", metavar="RUN", help="a GRPO run folder (train.output)")


@command("ledger", "summarise a run's trajectory ledger: samples per state, drops and retries by reason, "
         "staleness; checks that every sample was trained at most once", _ledger_args)
def cmd_ledger(config: Config, args: argparse.Namespace) -> None:
    from pipelines.grpo.ledger import format_summary
    from pipelines.grpo.run_checkpoints import run_ledger

    ledger, source, eta = run_ledger(Path(args.run))
    print(f"{source}")
    print(format_summary(ledger.summary()))
    ledger.check(1 << 62 if eta is None else eta)
    bound = "admission-only staleness bound" if eta is None else f"staleness bound eta={eta}"
    print(f"exactly-once check: passed ({bound})")


def _eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", help="model folder to evaluate (default: model.name_or_path)")
    p.add_argument("--split", default=None, help="split name (default: the first of data.eval_splits)")
    p.add_argument("--limit", type=int, help="evaluate only the first N samples")
    p.add_argument("--out", help="JSON file for the metrics (default: <checkpoint>/eval-<split>.json)")


@command("eval", "generate, segment and score a split: gIoU, cIoU, N-acc, T-acc, format validity", _eval_args)
def cmd_eval(config: Config, args: argparse.Namespace) -> dict:
    from pipelines.evaluate import run_eval, table_lines

    result = run_eval(config, args.checkpoint, args.split, args.limit, args.out)
    print("\n".join(table_lines({result["split"]: result["metrics"]})))
    print(f"saved {result['path']}")
    return result


def _main_args(p: argparse.ArgumentParser) -> None:
    _force(p)
    _precompute_args(p)


@command("main", "the main job: data, tiny models, features, SAE, SFT warm start, GRPO, eval; prints a report",
         _main_args)
def cmd_main(config: Config, args: argparse.Namespace) -> None:
    from pipelines import sae_train, sft
    from pipelines.build import cached_step, report_lines, step_params
    from pipelines.evaluate import table_lines
    from pipelines.train import train

    data = cmd_make_data(config, args)
    tiny = cmd_make_tiny(config, args)
    feats = cmd_precompute(config, args)
    sae_params = step_params(config, "model.sae")
    sae_report = cached_step("sae-train", Path(config.resolve_path(config.model.sae.path)), sae_params,
                             lambda: sae_train.run_sae_train(config), args.force)
    sft_params = {**step_params(config, "sft", "eval", "seg_loss", "model.head", "optim"), "sae": sae_params}
    sft_report = cached_step("sft", Path(config.resolve_path(config.sft.output)), sft_params,
                             lambda: sft.run_sft(config), args.force)
    grpo_params = {**step_params(config, "train", "grpo", "rollout", "reward", "cluster"), "sft": sft_params}
    grpo = cached_step("train", Path(config.resolve_path(config.train.output)), grpo_params,
                       lambda: train(config), args.force)
    rewards, k = grpo["rewards"], max(1, len(grpo["rewards"]) // 5)
    print("\n".join(
        report_lines(config, data, tiny, feats) + sae_train.report_lines(sae_report)
        + ["val metrics (first %d samples):" % config.train.eval_samples]
        + table_lines({"after SFT": sft_report["after"], "after GRPO": grpo["eval"]})
        + [f"reward: first {k} steps {sum(rewards[:k]) / k:.3f} -> last {k} steps {sum(rewards[-k:]) / k:.3f}",
           f"GRPO model {grpo['model']}; metrics {config.resolve_path(config.train.output)}/metrics.jsonl"]))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="segrl", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_text, add_args, _) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--config", help=f"YAML config (default: {DEFAULT_CONFIG}; with --resume, the run's)")
        add_args(p)
        p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. seed=1")
    return parser


def config_source(args: argparse.Namespace) -> tuple[str, list[str]]:
    """(config file, overrides): a resumed run reads its own config and keeps its folder."""
    resume = getattr(args, "resume", None)
    if not resume:
        return args.config or DEFAULT_CONFIG, args.overrides
    saved = Path(resume) / "config.yaml"
    if args.config is None and not saved.is_file():
        raise FileNotFoundError(f"--resume {resume}: no config.yaml there (is it a `segrl train` output folder?)")
    return args.config or str(saved), [*args.overrides, f"train.output={Path(resume).resolve()}"]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = load_config(*config_source(args))
        COMMANDS[args.command][2](config, args)
    except (ConfigError, DataError, FileNotFoundError, LedgerError) as exc:
        print(f"segrl {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

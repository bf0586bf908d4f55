"""The `segrl` command. Each subcommand takes `--config FILE` and `key=value` overrides.

Errors a user can fix (bad config, bad data file) print one clear line and
exit with status 2, never a traceback.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

from config import Config, ConfigError, dump_config, load_config
from data.integrity import IntegrityError
from data.schema import DataError
from models.export_format import ExportError
from pipelines.grpo.ledger import LedgerError
from pipelines.grpo.run_folder import RunFolderError

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
                       "2x(gpu=8,cpu=64)+cpu=16 (per node), or a KubeRay RayCluster/RayJob/RayService YAML file "
                       "(its pods at their initial replicas)")
    where.add_argument("--address", help="check against the live Ray cluster at this address (its total resources)")


@command("plan", "the actors a GRPO run starts, their GPUs, CPUs, memory estimate and placement groups, and "
         "whether they fit a cluster", _plan_args)
def cmd_plan(config: Config, args: argparse.Namespace) -> dict:
    import json

    from cluster import placement

    p, nodes, where = placement.plan(config), None, args.cluster
    if args.cluster and Path(args.cluster).is_file():
        nodes = placement.raycluster_nodes(_raycluster(Path(args.cluster)))
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


def _raycluster(path: Path) -> dict:
    """The manifest at ``path``: one YAML document of kind RayCluster, RayJob or RayService."""
    import yaml

    from cluster import placement
    from config.load import parse_yaml, yaml_problem

    try:
        manifest = parse_yaml(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"--cluster {path}: not one YAML document ({yaml_problem(exc)})") from None
    if not isinstance(manifest, dict) or manifest.get("kind") not in placement.CLUSTER_SPEC:
        raise ConfigError(f"--cluster {path}: not a KubeRay RayCluster, RayJob or RayService manifest")
    key, spec = placement.CLUSTER_SPEC[manifest["kind"]], manifest.get("spec")
    if key and not (isinstance(spec, dict) and isinstance(spec.get(key), dict)):
        raise ConfigError(f"--cluster {path}: this {manifest['kind']} has no spec.{key} (the cluster it starts)")
    return manifest


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


def positive_int(text: str) -> int:
    """An argparse type: an integer of at least 1 (``--limit -1`` would silently drop a sample)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not at least 1")
    return value


def _address(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS or a new local cluster)")


def _precompute_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--splits", nargs="+", help="split names (default: train + eval splits)")
    p.add_argument("--batch-size", type=positive_int, default=32)
    p.add_argument("--concurrency", type=positive_int, default=1, help="encoder actors")
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
    from data.converters import Limits, convert
    from data.schema import read_table

    limits = Limits(config.data.max_mask_pixels, config.data.polygon_margin)
    out = convert(args.format, args.src, args.split, args.out, image_root=args.image_root, limits=limits)
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
                   "checkpoint (its config.yaml, plus any overrides given); train.resume=auto in the config "
                   "continues the run in train.output if there is one and starts it otherwise")
    p.add_argument("--overwrite", action="store_true", help="replace the GRPO run already in train.output (without "
                   "it, a fresh run needs a new or empty folder)")


@command("train", "distributed GRPO on Ray (rollout pool, reference actors, reward workers, ZeRO-3 learner), "
         "then eval", _train_args)
def cmd_train(config: Config, args: argparse.Namespace) -> dict:
    from pipelines.evaluate import table_lines
    from pipelines.grpo.ledger import format_summary
    from pipelines.train import train

    summary = train(config, resume=True if args.resume else config.train.resume, overwrite=args.overwrite)
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


def check_model_folder(config: Config, checkpoint: str | None) -> None:
    """``--checkpoint`` (default model.name_or_path) names a folder; for the tiny family, a segrl model folder
    (make-tiny's, a run's model/, or a `segrl export` folder, which has a model folder's layout)."""
    folder = Path(checkpoint or config.resolve_path(config.model.name_or_path))
    if checkpoint is None and config.model.family != "tiny" and not folder.exists():
        return  # an upstream model named by its hub id
    if not folder.is_dir():
        raise DataError(folder, None, "--checkpoint", "no such model folder")
    if config.model.family == "tiny" and not (folder / "projector" / "config.json").is_file():
        raise DataError(folder, None, "--checkpoint", "not a segrl model folder (no projector/config.json): give "
                        "make-tiny's folder, a run's model/ or an export")


def run_config(config: Config, args: argparse.Namespace) -> Config:
    """The config of run folder ``args.run`` (its config.yaml plus the overrides) unless --config names one."""
    saved = Path(args.run) / "config.yaml"
    return load_config(str(saved), args.overrides) if args.config is None and saved.is_file() else config


def _ema_weight(text: str) -> float:
    value = float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"{text} is not in [0, 1)")
    return value


def _plot_args(p: argparse.ArgumentParser) -> None:
    _ledger_args(p)
    p.add_argument("--ema", type=_ema_weight, default=0.9, help="EMA weight of the smoothed curves, in [0, 1)")
    p.add_argument("--samples", type=int, default=6, help="val samples in the sample grids (0: no grids)")


@command("plot", "PNGs of a GRPO run in RUN/plots, each with a JSON of its numbers: reward and KL per step, val "
         "metrics after SFT vs after GRPO, staleness, phase timings, sample grids before and after GRPO", _plot_args)
def cmd_plot(config: Config, args: argparse.Namespace) -> None:
    from pipelines.plot import plot_run

    print("\n".join(plot_run(run_config(config, args), args.run, args.ema, args.samples).lines()))


def _analyze_args(p: argparse.ArgumentParser) -> None:
    _ledger_args(p)
    p.add_argument("--split", default="test", help="split the final checkpoint answers (default: test)")
    p.add_argument("--limit", type=int, default=200, help="its first N samples")
    p.add_argument("--panels", type=int, default=4, help="samples in the Figure 9 panels")
    _address(p)


@command("analyze", "SegCompass C.1/C.2 on a GRPO run (SegCompass head): SAE MSE vs Dice loss per training step, "
         "heatmap vs mask cIoU per test instance (OLS, 95% band, Pearson r, p), Figure 9 panels", _analyze_args)
def cmd_analyze(config: Config, args: argparse.Namespace) -> dict:
    from cluster.local import connect
    from pipelines.analyze import analyze_run, check_head, summary_lines
    from pipelines.precompute import precompute

    config = run_config(config, args)
    check_head(config, Path(args.run))
    connect(args.address)
    precompute(config, [args.split])
    analysis = analyze_run(config, args.run, args.split, args.limit, args.panels)
    print("\n".join(summary_lines(analysis)))
    return analysis


def _ablate_args(p: argparse.ArgumentParser) -> None:
    from pipelines.ablate import ABLATIONS

    p.add_argument("--variant", action="append", choices=list(ABLATIONS), metavar="NAME", dest="variants",
                   help="run this variant (repeatable; default: all): "
                   + "; ".join(f"{name}: {a.description}" for name, a in ABLATIONS.items()).replace("%", "%%"))
    p.add_argument("--seed", action="append", type=int, dest="seeds", metavar="N",
                   help="run at this seed (repeatable; default: the config's seed)")
    _force(p)


@command("ablate", "GRPO variants (no segmentation loss, no format score, staleness 0, READ head) beside the "
         "default, from SFT starts of the same seeds, same steps; prints a table", _ablate_args)
def cmd_ablate(config: Config, args: argparse.Namespace) -> dict:
    from pipelines.ablate import ABLATIONS, markdown_table, run_ablations

    check_model_folder(config, None)
    out = run_ablations(args.config or DEFAULT_CONFIG, args.overrides, args.variants or list(ABLATIONS),
                        args.seeds or [config.seed], args.force)
    print("\n".join(markdown_table(out["results"])))
    print(f"saved {out['path']}")
    return out


def _port(text: str) -> int:
    value = positive_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"{text} is not a TCP port (1..65535)")
    return value


def _serve_args(p: argparse.ArgumentParser) -> None:
    which = p.add_mutually_exclusive_group()
    which.add_argument("--checkpoint", help="model folder to serve (default: model.name_or_path)")
    which.add_argument("--follow", metavar="RUN", help="serve the newest complete model of GRPO run folder RUN, "
                       "swapping in each new one without a restart")
    p.add_argument("--host", help="HTTP bind address (default: serve.host, 127.0.0.1)")
    p.add_argument("--port", type=_port, help="HTTP port (default: serve.port, 8000)")
    p.add_argument("--write-config", metavar="FILE", help="also write the Serve config (serve deploy, RayService)")
    _address(p)


def listening_as_asked(config: Config, args: argparse.Namespace) -> Config:
    """The config with --host/--port, where given, in its serve section."""
    config = config.model_copy(deep=True)
    for key in ("host", "port"):
        if getattr(args, key) is not None:
            setattr(config.serve, key, getattr(args, key))
    return config


@command("serve", "serve a trained model over HTTP with Ray Serve: POST /v1/segment, GET /healthz, a web page at /",
         _serve_args)
def cmd_serve(config: Config, args: argparse.Namespace) -> None:
    from pipelines.serve.run import serve_forever

    if args.follow is None:
        check_model_folder(config, args.checkpoint)
    elif not Path(args.follow).is_dir():
        raise DataError(Path(args.follow), None, "--follow", "no such run folder")
    elif args.config is None and (Path(args.follow) / "config.yaml").is_file():
        config = load_config(str(Path(args.follow) / "config.yaml"), args.overrides)  # the run's head, SAE, paths
    serve_forever(listening_as_asked(config, args), args.checkpoint, args.follow, args.address, args.write_config)


def _serve_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", help="model folder the replicas load, as they see it (default: "
                   "model.name_or_path); not looked at here: it may exist only in the cluster's pods")
    p.add_argument("--host", help="HTTP bind address (default: serve.host, 127.0.0.1; 0.0.0.0 in a pod)")
    p.add_argument("--port", type=_port, help="HTTP port (default: serve.port, 8000)")
    p.add_argument("--weights-version", type=positive_int, default=1, help="the version answers name (default 1); "
                   "raise it with each new folder: running replicas load a folder only under a new version")
    p.add_argument("--output", "-o", metavar="FILE", help="write the YAML here (default: standard output)")


@command("serve-config", "write the Serve config `segrl serve --checkpoint` deploys (for `serve deploy` or a KubeRay "
         "RayService's serveConfigV2) without starting anything", _serve_config_args)
def cmd_serve_config(config: Config, args: argparse.Namespace) -> str:
    from pipelines.serve.run import checkpoint_serve_config, serve_config_text

    text = serve_config_text(checkpoint_serve_config(listening_as_asked(config, args), args.checkpoint,
                                                     args.weights_version))
    if args.output:
        Path(args.output).write_text(text)
    else:
        print(text, end="")
    return text


def _main_args(p: argparse.ArgumentParser) -> None:
    _force(p)
    _precompute_args(p)


@command("main", "the main job: data, tiny models, features, SAE, SFT warm start, GRPO, eval; prints a report",
         _main_args)
def cmd_main(config: Config, args: argparse.Namespace) -> None:
    from pipelines import sae_train, sft
    from pipelines.build import cached_step, grpo_params, report_lines, sft_params, step_params
    from pipelines.evaluate import table_lines
    from pipelines.plot import plot_run
    from pipelines.report import write_main_report
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
    rewards, k = grpo["rewards"], max(1, len(grpo["rewards"]) // 5)
    print("\n".join(
        report_lines(config, data, tiny, feats) + sae_train.report_lines(sae_report)
        + ["val metrics (first %d samples):" % config.train.eval_samples]
        + table_lines({"after SFT": sft_report["after"], "after GRPO": grpo["eval"]})
        + [f"reward: first {k} steps {sum(rewards[:k]) / k:.3f} -> last {k} steps {sum(rewards[-k:]) / k:.3f}",
           f"GRPO model {grpo['model']}; metrics {config.resolve_path(config.train.output)}/metrics.jsonl"]))
    print(f"report {write_main_report(config, sft_report['after'], grpo['eval'])}")
    print("\n".join(plot_run(config, config.resolve_path(config.train.output)).lines()))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="segrl", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_text, add_args, _) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text.replace("%", "%%"), description=help_text)  # help is %-formatted
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
    except (ConfigError, DataError, ExportError, FileNotFoundError, LedgerError, IntegrityError, RunFolderError,
            IsADirectoryError, NotADirectoryError, PermissionError) as exc:
        cause = getattr(exc, "cause", exc)  # raised in a Ray task or actor: its own error, not Ray's traceback
        print(f"segrl {args.command}: error: {cause}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

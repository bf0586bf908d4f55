"""Commands that look at finished runs: plots, SegCompass's analyses, the ablation table."""
from __future__ import annotations

import argparse
from pathlib import Path

from config import Config
from pipelines.commands.registry import (
    DEFAULT_CONFIG,
    address_flag,
    check_model_folder,
    command,
    force_flag,
    run_config,
    run_folder_arg,
)


def _ema_weight(text: str) -> float:
    value = float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"{text} is not in [0, 1)")
    return value


def _plot_args(p: argparse.ArgumentParser) -> None:
    run_folder_arg(p)
    p.add_argument("--ema", type=_ema_weight, default=0.9, help="EMA weight of the smoothed curves, in [0, 1)")
    p.add_argument("--samples", type=int, default=6, help="val samples in the sample grids (0: no grids)")


@command("plot", "PNGs of a GRPO run in RUN/plots, each with a JSON of its numbers: reward and KL per step, val "
         "metrics after SFT vs after GRPO, staleness, phase timings, sample grids before and after GRPO", _plot_args)
def cmd_plot(config: Config, args: argparse.Namespace) -> None:
    from pipelines.plot import plot_run

    print("\n".join(plot_run(run_config(config, args), args.run, args.ema, args.samples).lines()))


def _analyze_args(p: argparse.ArgumentParser) -> None:
    run_folder_arg(p)
    p.add_argument("--split", default="test", help="split the final checkpoint answers (default: test)")
    p.add_argument("--limit", type=int, default=200, help="its first N samples")
    p.add_argument("--panels", type=int, default=4, help="samples in the Figure 9 panels")
    address_flag(p)


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
    force_flag(p)


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

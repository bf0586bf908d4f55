"""GRPO's sanity check: does the run learn prompts it sees again and again, and does it carry over?

Every step of the main job samples new prompts, so a flat reward curve cannot tell a loop that
does not learn from a policy whose lessons do not carry to new prompts. Here GRPO trains on the
first K training prompts only, from the main job's SFT model: ``grpo.prompts_per_step`` = K, so
every step samples a group for each of the K prompts and the two windows of the reward curve
score the same prompts. It runs once per variant (the config as it is, and without the
segmentation loss, whose gradient outweighs the policy gradient's on the tiny policy). Greedy
eval before and after, on the K prompts and on val, shows what was learnt and how much of it
carries over. Prints the machine.
Run: ``python bench/grpo_memorize.py [--config FILE] [--prompts K] [--steps N] [--val N] [key=value ...]``
(after ``segrl main``: its SFT model, dataset and feature cache; runs go to ``{runs_dir}/memorize``).
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
from dataclasses import replace
from pathlib import Path

# Run as a script, sys.path[0] is bench/; the packages live one level up.
_ROOT = Path(__file__).resolve().parent.parent
if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path[0] = str(_ROOT)

from config import Config, load_config  # noqa: E402
from data.schema import read_samples, resolve_image, write_samples  # noqa: E402
from pipelines.grpo.reward_trend import RewardTrend, reward_trend  # noqa: E402

SPLIT = "memorize"
VARIANTS = {"default": (), "no-seg-loss": ("seg_loss.seg_coef=0",)}
HEADERS = ("K gIoU", "K reason", "val gIoU", "val reason")  # the K prompts, then val


def prompt_split(train_file: Path, k: int, folder: Path) -> Path:
    """The first ``k`` samples of ``train_file`` as split ``SPLIT`` in ``folder``; image paths made
    absolute, so the split reads the same images (and the same cached features) from anywhere."""
    samples = read_samples(train_file)
    if not 0 < k <= len(samples):
        raise ValueError(f"--prompts must lie in [1, {len(samples)}] (the samples of {train_file}), got {k}")
    chosen = [replace(s, image_path=str(resolve_image(train_file, s.image_path).resolve())) for s in samples[:k]]
    return write_samples(chosen, folder / f"{SPLIT}.parquet")


def variant_config(config_path: str, overrides: list[str], variant: tuple[str, ...], folder: Path, k: int,
                   steps: int, name: str) -> Config:
    """GRPO on the K prompts: each step one group per prompt, ``steps`` steps, no eval of its own."""
    return load_config(config_path, [*overrides, f"data.root={folder}", f"data.train_split={SPLIT}",
                                     f"grpo.prompts_per_step={k}", f"train.steps={steps}",
                                     f"optim.total_steps={steps}", "train.eval_samples=0",
                                     f"train.output={folder / name}", *variant])


def scores(config: Config, prompts: Config, checkpoint: str, n_val: int, out: Path) -> dict[str, dict]:
    """Greedy metrics of ``checkpoint`` on the K prompts and on val's first ``n_val`` samples."""
    from pipelines.evaluate import run_eval

    return {"prompts": run_eval(prompts, checkpoint, SPLIT, None, str(out / "eval-prompts.json"))["metrics"],
            "val": run_eval(config, checkpoint, "val", n_val, str(out / "eval-val.json"))["metrics"]}


def row(label: str, trend: RewardTrend | None, metrics: dict[str, dict]) -> str:
    reward = (f"{trend.first:.3f} -> {trend.last:.3f} ({trend.change:+.3f} ± {trend.change_se:.3f})"
              if trend else "")
    cells = "".join(f"{metrics[part][key]:11.3f}" for part in ("prompts", "val") for key in ("giou", "reasoning_acc"))
    return f"{label:12s} {reward:32s}{cells}"


def run(config_path: str, overrides: list[str], k: int, steps: int, n_val: int) -> dict:
    """Every variant's reward trend and scores, with the SFT start's scores under ``"sft"``."""
    from pipelines.train import train

    config = load_config(config_path, overrides)
    folder = Path(config.resolve_path("{runs_dir}")) / SPLIT
    prompt_split(Path(config.resolve_path(config.data.root)) / f"{config.data.train_split}.parquet", k, folder)
    start = config.resolve_path(config.train.init_from)
    results = {"sft": {"scores": scores(config, variant_config(config_path, overrides, (), folder, k, steps, "sft"),
                                        start, n_val, folder / "sft")}}
    for name, variant in VARIANTS.items():
        grpo = variant_config(config_path, overrides, variant, folder, k, steps, name)
        summary = train(grpo, overwrite=True)
        results[name] = {"trend": reward_trend(summary["rewards"]),
                         "scores": scores(config, grpo, summary["model"], n_val, folder / name)}
    return results


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/tiny.yaml")
    parser.add_argument("--prompts", type=int, default=16, help="training prompts GRPO sees (default 16)")
    parser.add_argument("--steps", type=int, default=40, help="GRPO steps per variant (default 40)")
    parser.add_argument("--val", type=int, default=200, help="val samples scored (default 200)")
    parser.add_argument("overrides", nargs="*", help="config key=value overrides")
    args = parser.parse_args(argv)
    results = run(args.config, args.overrides, args.prompts, args.steps, args.val)
    import torch

    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads")
    print(f"GRPO on the first {args.prompts} training prompts only, {args.steps} steps (every step: each prompt once)")
    print(f"{'':12s} {'reward first -> last (change)':32s}" + "".join(f"{h:>11}" for h in HEADERS))
    for label, result in results.items():
        print(row(label, result.get("trend"), result["scores"]))
    return results


if __name__ == "__main__":
    main()

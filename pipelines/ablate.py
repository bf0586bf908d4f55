"""`segrl ablate`: GRPO variants from the same kind of SFT start, same seeds, same steps.

Each variant is a set of config overrides in a registry (``ABLATIONS``) applied to GRPO;
its SFT start is the default's at the same seed, except for a variant that changes the
segmentation head, which needs an SFT start of its own, trained with the same overrides.
Every stage is cached like the main job's (``cached_step``): the default variant at the
config's own seed *is* the main job's SFT and GRPO runs, so after `segrl main` it costs
nothing, and a rerun only reads the reports. Other runs go to ``{runs_dir}/ablate/``.
The table compares each variant's val metrics after GRPO and its mean training reward
(first fifth of the steps vs last fifth) with the default's at the same seed.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from config import Config, load_config
from data.atomic import write_atomic
from data.schema import DataError
from pipelines.build import cached_step, grpo_params, sft_params
from pipelines.grpo.reward_trend import reward_trend
from pipelines.report import checkpoints_change


@dataclass(frozen=True)
class Ablation:
    name: str
    overrides: tuple[str, ...]
    description: str
    own_sft: bool = False  # the overrides change what SFT trains


ABLATIONS: dict[str, Ablation] = {}


def register_ablation(ablation: Ablation) -> Ablation:
    if ablation.name in ABLATIONS:
        raise ValueError(f"ablation {ablation.name!r} is already registered")
    ABLATIONS[ablation.name] = ablation
    return ablation


register_ablation(Ablation("default", (), "the config as it is"))
register_ablation(Ablation("no-seg-loss", ("seg_loss.seg_coef=0",),
                           "GRPO without the segmentation loss (SegCompass trains both jointly)"))
register_ablation(Ablation("no-format-score", ("reward.weights=[0.0, 1.0]",), "reward = mask score only"))
register_ablation(Ablation("staleness-0", ("train.staleness=0",),
                           "eta = 0: every response trains the step of the weights that sampled it"))
register_ablation(Ablation("read-head", ("model.head.kind=read",),
                           "READ's similarity-as-points head instead of SegCompass's slot head", own_sft=True))


def variant_config(config_path: str | None, base_overrides: list[str], ablation: Ablation, seed: int,
                   base_seed: int) -> Config:
    """The variant's config: the base plus its overrides, its seed, and its own folders unless it is
    the main job's own run (the default variant at the config's seed)."""
    extra = [*ablation.overrides, f"seed={seed}"]
    if ablation.own_sft or seed != base_seed:
        head = "read" if ablation.own_sft else "default"
        extra += [f"sft.output={{runs_dir}}/ablate/sft-{head}-s{seed}",
                  f"train.init_from={{runs_dir}}/ablate/sft-{head}-s{seed}/model"]
    if ablation.name != "default" or seed != base_seed:
        extra.append(f"train.output={{runs_dir}}/ablate/{ablation.name}-s{seed}")
    return load_config(config_path, [*base_overrides, *extra])


def sft_start_config(config_path: str | None, base_overrides: list[str], ablation: Ablation, seed: int,
                     base_seed: int) -> Config:
    """The config SFT runs with for ``ablation``: its own where it changes the head, else the default's."""
    own = ablation if ablation.own_sft else ABLATIONS["default"]
    return variant_config(config_path, base_overrides, own, seed, base_seed)


def run_variant(config: Config, sft_config: Config, base: Config, force: bool) -> dict:
    """SFT (cached, from ``sft_config``) then GRPO (cached) for one variant; the SAE is the base
    config's, a frozen part."""
    from pipelines import sft
    from pipelines.train import train

    sft_step = sft_params(sft_config, base)
    sft_report = cached_step("sft", Path(sft_config.resolve_path(sft_config.sft.output)), sft_step,
                             lambda: sft.run_sft(sft_config), force)
    grpo = cached_step("train", Path(config.resolve_path(config.train.output)), grpo_params(config, sft_step),
                       lambda: train(config, overwrite=True), force)
    trend = reward_trend(grpo["rewards"])
    change = checkpoints_change(config, sft_report["checkpoint"], grpo["model"])
    return {"sft": sft_report["after"], "grpo": grpo["eval"], "giou_change_se": change.get("giou", {}).get("se"),
            "reward_first": trend.first, "reward_last": trend.last, "reward_change_se": trend.change_se,
            "steps": len(grpo["rewards"]),
            "wall_s": grpo.get("wall_s"),
            "run": config.resolve_path(config.train.output)}


def previous_results(path: Path) -> dict[str, dict[str, dict]]:
    """The rows earlier `segrl ablate` calls wrote to ``path`` ({} without the file). Read before any
    run, so a file that cannot be kept fails the call at once, not after hours of training."""
    if not path.exists():
        return {}
    try:
        results = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DataError(path, None, None, f"not valid JSON ({exc}); move it aside to start a new table") from None
    if not isinstance(results, dict) or not all(isinstance(by_seed, dict) for by_seed in results.values()):
        raise DataError(path, None, None, "does not hold {variant: {seed: result}}; move it aside to start a new table")
    return results


def run_ablations(config_path: str | None, base_overrides: list[str], names: list[str], seeds: list[int],
                  force: bool = False) -> dict:
    """Every (variant, seed) result, written to ``{runs_dir}/ablate/ablations.json`` beside the rows
    earlier calls wrote there (a row this call measures again is replaced)."""
    unknown = [n for n in names if n not in ABLATIONS]
    if unknown:
        raise ValueError(f"unknown ablation(s) {unknown}; known: {', '.join(ABLATIONS)}")
    base = load_config(config_path, base_overrides)
    path = Path(base.resolve_path("{runs_dir}")) / "ablate" / "ablations.json"
    results = previous_results(path)
    for seed in seeds:
        for name in names:
            ablation = ABLATIONS[name]
            config = variant_config(config_path, base_overrides, ablation, seed, base.seed)
            sft_config = sft_start_config(config_path, base_overrides, ablation, seed, base.seed)
            print(f"ablate: {name}, seed {seed}", flush=True)
            results.setdefault(name, {})[str(seed)] = run_variant(config, sft_config, base, force)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(results, indent=2, default=float))
    return {"results": results, "path": str(path)}


COLUMNS = (("gIoU", "giou"), ("cIoU", "ciou"), ("N-acc", "n_acc"), ("T-acc", "t_acc"), ("reason", "reasoning_acc"))


def markdown_table(results: dict[str, dict[str, dict]]) -> list[str]:
    """One row per (variant, seed): val after GRPO, its gIoU change over its own SFT start (± its paired
    standard error where both evaluations recorded per-sample scores), and the
    training reward's first-fifth and last-fifth means with the change's standard error (rows
    written before it was recorded show the means alone)."""
    head = "| variant | seed | " + " | ".join(c for c, _ in COLUMNS) + " | gIoU vs SFT | reward first → last |"
    lines = [head, "|" + "---|" * (len(COLUMNS) + 4)]
    for name, by_seed in results.items():
        for seed, r in by_seed.items():
            cells = " | ".join(f"{r['grpo'].get(key, float('nan')):.3f}" for _, key in COLUMNS)
            gain = f"{r['grpo']['giou'] - r['sft']['giou']:+.3f}"
            if r.get("giou_change_se") is not None:
                gain += f" ± {r['giou_change_se']:.3f}"
            trend = f"{r['reward_first']:.3f} → {r['reward_last']:.3f}"
            if "reward_change_se" in r:
                trend += f" ({r['reward_last'] - r['reward_first']:+.3f} ± {r['reward_change_se']:.3f})"
            lines.append(f"| {name} | {seed} | {cells} | {gain} | {trend} |")
    return lines

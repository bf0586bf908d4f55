"""`segrl plot RUN`: see a GRPO run learn. PNGs in RUN/plots, each beside the JSON of its numbers.

- rewards: reward (total, format, mask) and KL per step (metrics.jsonl), raw and EMA-smoothed;
- val_metrics: val metrics before and after SFT (the SFT run's report.json, beside the model
  folder ``train.init_from`` names) and after GRPO (RUN/report.json);
- staleness: how many groups trained at each staleness (steps behind the learner);
- phases: busy and idle seconds per phase of the run (RUN/report.json), learner time per step;
- samples_before_grpo / samples_after_grpo: the first val samples answered by the GRPO start
  and by RUN/model: image, GT, predicted mask, heatmap and the answer.

A figure whose inputs are missing is skipped with the reason; metrics.jsonl is required.
Drawn with matplotlib's Agg canvas (no display, no global pyplot state).
"""
from __future__ import annotations

import json
import math
import textwrap
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from config import Config
from pipelines.grpo.metrics_log import read_metrics
from rewards import SegMetrics
from rewards.stats import ema

EMA_WEIGHT = 0.9
REWARD_SERIES = ("reward/total", "reward/format", "reward/mask", "loss/kl")
VAL_METRICS = ("format_valid", "giou", "ciou", "n_acc", "t_acc", "reasoning_acc", "mask_reward")
SAMPLES = 6


@dataclass
class PlotReport:
    folder: Path
    written: list[str] = field(default_factory=list)  # figure names, each a .png and a .json
    skipped: dict[str, str] = field(default_factory=dict)  # figure name -> why

    def lines(self) -> list[str]:
        out = [f"plots in {self.folder}: {', '.join(self.written) or 'none'}"]
        return out + [f"  skipped {name}: {why}" for name, why in self.skipped.items()]


def new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Figure, data, folder: Path, name: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    fig.savefig(folder / f"{name}.png", dpi=100)
    (folder / f"{name}.json").write_text(json.dumps(data, indent=2, default=float))


def finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def overlay(ax, image: np.ndarray, mask: np.ndarray | None, title: str, color: tuple[float, float, float]) -> None:
    """The image with ``mask`` tinted in ``color`` and the rest dimmed, so a mask shows on any colour
    (the bare image for None)."""
    ax.imshow(image)
    if mask is not None:
        tint = np.zeros((*mask.shape, 4))
        tint[~mask] = (0.0, 0.0, 0.0, 0.6)
        tint[mask] = (*color, 0.35)
        ax.imshow(tint)
    ax.set_title(title, fontsize=8)
    ax.axis("off")


def heat(ax, image: np.ndarray, values: np.ndarray | None, title: str) -> None:
    """``values`` over the image (stretched to it), or the bare image when there are none."""
    ax.imshow(image)
    if values is not None:
        h, w = image.shape[:2]
        ax.imshow(values, cmap="jet", alpha=0.55, extent=(-0.5, w - 0.5, h - 0.5, -0.5), interpolation="nearest")
    ax.set_title(title, fontsize=8)
    ax.axis("off")


def text_panel(ax, text: str, width: int = 44) -> None:
    wrapped = "\n".join(textwrap.fill(line, width) for line in text.splitlines())
    ax.text(0.0, 1.0, wrapped, va="top", ha="left", fontsize=6.5, family="monospace")
    ax.axis("off")


# ---------------------------------------------------------------- the figures' numbers


def reward_data(rows: list[dict], weight: float) -> dict:
    """Per series the steps where it is a finite number, its values there and their EMA."""
    series = {}
    for name in REWARD_SERIES:
        points = [(r["step"], r[name]) for r in rows if finite(r.get(name))]
        if points:
            steps, values = zip(*points)
            series[name] = {"step": list(steps), "value": list(values), "ema": ema(values, weight).tolist()}
    return {"ema_weight": weight, "series": series}


def val_data(config: Config, run_dir: Path) -> dict:
    """Val metrics by stage: before/after SFT (its run folder's report.json) and after GRPO."""
    stages = {}
    sft_report = Path(config.resolve_path(config.train.init_from)).parent / "report.json"
    if sft_report.is_file():
        sft = json.loads(sft_report.read_text())
        stages.update({f"{when} SFT": sft[when] for when in ("before", "after") if sft.get(when)})
    grpo_report = run_dir / "report.json"
    grpo_eval = json.loads(grpo_report.read_text()).get("eval") if grpo_report.is_file() else None
    if grpo_eval:
        stages["after GRPO"] = grpo_eval
    metrics = [m for m in VAL_METRICS if any(finite(s.get(m)) for s in stages.values())]
    return {"metrics": metrics, "stages": {stage: {m: s.get(m) for m in metrics} for stage, s in stages.items()},
            "sources": {"sft": str(sft_report), "grpo": str(grpo_report)}}


def staleness_data(rows: list[dict]) -> dict:
    """Groups trained at each staleness, summed over the steps (metrics.jsonl's staleness/<k>)."""
    counts: dict[int, int] = {}
    for row in rows:
        for key, value in row.items():
            if key.startswith("staleness/") and finite(value):
                k = int(key.split("/", 1)[1])
                counts[k] = counts.get(k, 0) + int(value)
    return {"staleness": sorted(counts), "groups": [counts[k] for k in sorted(counts)]}


def phase_data(rows: list[dict], report: dict | None) -> dict:
    per_step = [(r["step"], r["time/learn_s"], r.get("time/learner_wait_s", 0.0)) for r in rows
                if finite(r.get("time/learn_s"))]
    steps, learn, wait = (list(c) for c in zip(*per_step)) if per_step else ([], [], [])
    phases = {name: {"busy_s": p["busy_s"], "idle_s": p["idle_s"]}
              for name, p in (report or {}).get("phases", {}).items() if "busy_s" in p}
    return {"phases": phases, "wall_s": (report or {}).get("wall_s"), "step": steps, "learn_s": learn,
            "learner_wait_s": wait}


def view_record(view) -> dict:
    """What a sample grid shows, as numbers: the answer, pixel counts and IoUs against the GT."""
    scores = {}
    for name, pred in (("mask", view.mask), ("heatmap", view.heat_mask)):
        scores[f"{name}_iou"] = SegMetrics().add(pred, view.gt, view.ignore) if pred is not None else None
        scores[f"{name}_pixels"] = int(pred.sum()) if pred is not None else 0
    return {"sample_id": view.sample_id, "question": view.question, "answer": view.answer,
            "has_target": view.has_target, "answered_with_mask": view.mask is not None,
            "gt_pixels": int(view.gt.sum()), **scores}


# ---------------------------------------------------------------- drawing


def draw_rewards(data: dict) -> Figure:
    series = data["series"]
    fig = new_figure(4.0 * len(series), 3.2)
    for ax, (name, s) in zip(np.atleast_1d(fig.subplots(1, len(series))), series.items()):
        ax.plot(s["step"], s["value"], color="tab:blue", alpha=0.3, lw=1, label="per step")
        ax.plot(s["step"], s["ema"], color="tab:blue", lw=2, label=f"EMA {data['ema_weight']}")
        ax.set(title=name, xlabel="step")
        ax.grid(alpha=0.3)
    fig.axes[0].legend(fontsize=8)
    return fig


def draw_val(data: dict) -> Figure:
    fig = new_figure(1.2 * len(data["metrics"]) + 2, 3.5)
    ax = fig.subplots()
    width = 0.8 / len(data["stages"])
    for i, (stage, values) in enumerate(data["stages"].items()):
        x = np.arange(len(data["metrics"])) + i * width
        bars = ax.bar(x, [values[m] if finite(values[m]) else 0.0 for m in data["metrics"]], width, label=stage)
        ax.bar_label(bars, fmt="%.2f", fontsize=6)
    ax.set_xticks(np.arange(len(data["metrics"])) + 0.4 - width / 2, data["metrics"])
    ax.set(ylim=(0, 1.1), title="val metrics")
    ax.legend(fontsize=8)
    return fig


def draw_staleness(data: dict) -> Figure:
    fig = new_figure(4.0, 3.2)
    ax = fig.subplots()
    ax.bar([str(k) for k in data["staleness"]], data["groups"], color="tab:purple")
    ax.set(title="staleness of trained groups", xlabel="learner version - rollout version", ylabel="groups")
    return fig


def draw_phases(data: dict) -> Figure:
    fig = new_figure(10.0, 3.5)
    left, right = fig.subplots(1, 2)
    names = list(data["phases"])
    busy = [data["phases"][n]["busy_s"] for n in names]
    left.barh(names, busy, color="tab:green", label="busy")
    left.barh(names, [data["phases"][n]["idle_s"] for n in names], left=busy, color="lightgray", label="idle")
    left.set(title=f"phases (wall {data['wall_s'] or float('nan'):.0f} s)", xlabel="seconds")
    left.legend(fontsize=8, loc="lower right")
    right.plot(data["step"], data["learn_s"], label="learner step")
    right.plot(data["step"], data["learner_wait_s"], label="learner waits for data")
    right.set(title="per step", xlabel="step", ylabel="seconds")
    right.legend(fontsize=8)
    return fig


def draw_samples(views: list, title: str) -> Figure:
    fig = new_figure(12.0, 2.2 * len(views))
    grid = np.atleast_2d(fig.subplots(len(views), 5))
    for row, view in zip(grid, views):
        overlay(row[0], view.image, None, view.sample_id, (0, 0, 0))
        overlay(row[1], view.image, view.gt, "GT", (1.0, 0.85, 0.0))
        overlay(row[2], view.image, view.mask, "mask" if view.mask is not None else "no mask (refused)",
                (0.9, 0.1, 0.1))
        heat(row[3], view.image, view.heatmap, "heatmap")
        text_panel(row[4], f"Q: {view.question}\nA: {view.answer}")
    fig.suptitle(title)
    return fig


# ---------------------------------------------------------------- the command


def plot_run(config: Config, run_dir: str | Path, ema_weight: float = EMA_WEIGHT, samples: int = SAMPLES) -> PlotReport:
    """Write RUN/plots; ``config`` is the run's (its config.yaml); ``samples`` 0 skips the sample grids."""
    run_dir = Path(run_dir)
    rows = read_metrics(run_dir)
    if not rows:
        raise FileNotFoundError(f"{run_dir}: no metrics.jsonl rows (a `segrl train` folder, with jsonl in "
                                f"train.loggers?)")
    report_path = run_dir / "report.json"
    report = json.loads(report_path.read_text()) if report_path.is_file() else None
    out = PlotReport(run_dir / "plots")

    def emit(name: str, data, draw: Callable[..., Figure], *args, missing: str | None = None) -> None:
        if missing:
            out.skipped[name] = missing
            return
        save_figure(draw(*args), data, out.folder, name)
        out.written.append(name)

    rewards = reward_data(rows, ema_weight)
    emit("rewards", rewards, draw_rewards, rewards,
         missing=None if rewards["series"] else "metrics.jsonl has no reward/KL values")
    val = val_data(config, run_dir)
    emit("val_metrics", val, draw_val, val, missing=None if val["stages"] else "no SFT or GRPO report with val metrics")
    stale = staleness_data(rows)
    emit("staleness", stale, draw_staleness, stale,
         missing=None if stale["groups"] else "metrics.jsonl has no staleness counts")
    phases = phase_data(rows, report)
    emit("phases", phases, draw_phases, phases,
         missing=None if phases["phases"] else f"no phase timings ({report_path} missing)")
    if samples:
        from pipelines.sample_views import sample_views

        split = config.data.eval_splits[0]
        for name, checkpoint in (("samples_before_grpo", Path(config.resolve_path(config.train.init_from))),
                                 ("samples_after_grpo", run_dir / "model")):
            if not (checkpoint / "config.json").is_file():
                out.skipped[name] = f"no model folder at {checkpoint}"
                continue
            views = sample_views(config, checkpoint, split, samples)
            emit(name, {"checkpoint": str(checkpoint), "split": split, "samples": [view_record(v) for v in views]},
                 draw_samples, views, f"{name.replace('_', ' ')}: {checkpoint}")
    return out

"""`segrl analyze RUN`: SegCompass's correlation analyses (supplementary C.1) and visualisations (C.2).

- Figure 8 left: one point per training step (batch) of the run: the frozen SAE's
  reconstruction MSE of the layer-k reference states (x) against the batch's Dice loss (y),
  both logged by the learner (metrics.jsonl ``sae_mse`` and ``loss/dice``).
- Figure 8 right: one point per test instance with a target that the final checkpoint
  (RUN/model) answered with a mask: cIoU of the heatmap against the GT (x) and of the
  predicted mask against the GT (y). For one instance cIoU is its IoU; the heatmap is merged
  and thresholded like the mask (logit 0), both in the image frame (``pipelines.evaluate``).
- Each panel: the OLS line, the 95% confidence band of the mean, Pearson's r and p.
- Figure 9: per test sample the instruction, image, activation of the reference token's SAE
  features over the image tokens, heatmap, predicted mask and GT.

Writes RUN/analysis/{fig8_correlation,fig9_panels}.png and analysis.json (points, fits). Only
the SegCompass head has an SAE and Q-V heatmaps: for another head the command says so.
"""
from __future__ import annotations

import json
import textwrap
from pathlib import Path

import numpy as np

from config import Config, ConfigError
from pipelines.grpo.metrics_log import read_metrics
from pipelines.plot import finite, heat, new_figure, overlay, text_panel
from pipelines.sample_views import SampleView, sample_views
from rewards import SegMetrics
from rewards.stats import ols_fit

TRAIN_X, TRAIN_Y = "sae_mse", "loss/dice"
MIN_POINTS = 3
PANELS = 4


def check_head(config: Config, run_dir: Path) -> None:
    kind = config.model.head.kind
    if kind != "segcompass":
        raise ConfigError(f"{run_dir}: model.head.kind is '{kind}'; segrl analyze needs the SegCompass head "
                          f"(its SAE concepts and Q-V heatmaps), which '{kind}' does not have")


def correlation(x: list[float], y: list[float], x_name: str, y_name: str, unit: str) -> dict:
    """Points and their OLS fit (or why there is none) for one Figure 8 panel."""
    out = {"x_name": x_name, "y_name": y_name, "unit": unit, "x": x, "y": y, "n": len(x)}
    if len(x) < MIN_POINTS or np.ptp(x) == 0:
        out["missing"] = f"{len(x)} {unit}s with both values, needs {MIN_POINTS} with varying {x_name}"
        return out
    out["fit"] = ols_fit(x, y).to_json()
    return out


def training_points(rows: list[dict]) -> dict:
    points = [(r[TRAIN_X], r[TRAIN_Y]) for r in rows if finite(r.get(TRAIN_X)) and finite(r.get(TRAIN_Y))]
    x, y = (list(c) for c in zip(*points)) if points else ([], [])
    panel = correlation(x, y, "SAE reconstruction MSE", "Dice loss", "training step")
    if not points:
        panel["missing"] = (f"metrics.jsonl has no steps with {TRAIN_X} and {TRAIN_Y} (the learner logs them for "
                            f"the SegCompass head; runs trained before they were logged have none)")
    return panel


def instance_points(views: list[SampleView]) -> dict:
    """Figure 8 right from the views: instances with a target that got a mask; the others counted."""
    x, y, ids = [], [], []
    for v in views:
        if v.has_target and v.mask is not None:
            x.append(SegMetrics().add(v.heat_mask, v.gt, v.ignore))
            y.append(SegMetrics().add(v.mask, v.gt, v.ignore))
            ids.append(v.sample_id)
    panel = correlation(x, y, "heatmap cIoU", "mask cIoU", "test instance")
    panel["sample_ids"] = ids
    panel["left_out"] = {"no_target": sum(not v.has_target for v in views),
                         "no_mask": sum(v.has_target and v.mask is None for v in views)}
    return panel


def draw_correlations(panels: list[dict]):
    fig = new_figure(10.0, 4.0)
    for ax, panel in zip(fig.subplots(1, len(panels)), panels):
        ax.scatter(panel["x"], panel["y"], s=12, alpha=0.6)
        fit = panel.get("fit")
        if fit:
            xs = np.asarray(fit["band_x"])
            ax.plot(xs, fit["slope"] * xs + fit["intercept"], color="tab:red", lw=2, label="OLS")
            ax.fill_between(xs, fit["band_lo"], fit["band_hi"], color="tab:red", alpha=0.2,
                            label=f"{fit['level']:.0%} CI of the mean")
            ax.set_title(f"r = {fit['r']:.3f}, p = {fit['p']:.2g}, n = {fit['n']}", fontsize=9)
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, textwrap.fill(f"no fit: {panel['missing']}", 50), ha="center", va="center",
                    fontsize=8, transform=ax.transAxes)
            ax.set(xticks=[], yticks=[])
        ax.set(xlabel=panel["x_name"], ylabel=panel["y_name"])
        ax.grid(alpha=0.3)
    return fig


def draw_panels(views: list[SampleView]):
    fig = new_figure(14.0, 2.4 * len(views))
    for row, v in zip(np.atleast_2d(fig.subplots(len(views), 6)), views):
        text_panel(row[0], f"{v.question}\n\n-> {v.answer}", width=30)
        overlay(row[1], v.image, None, v.sample_id, (0, 0, 0))
        heat(row[2], v.image, v.concepts, "SAE activation (image tokens)")
        heat(row[3], v.image, v.heatmap, "Q-V heatmap")
        overlay(row[4], v.image, v.mask, "predicted mask", (0.9, 0.1, 0.1))
        overlay(row[5], v.image, v.gt, "GT", (1.0, 0.85, 0.0))
    return fig


def summary_lines(analysis: dict) -> list[str]:
    lines = []
    for label, key in (("Figure 8 left (per training step): SAE MSE vs Dice loss", "training"),
                       ("Figure 8 right (per test instance): heatmap cIoU vs mask cIoU", "instances")):
        panel = analysis[key]
        fit = panel.get("fit")
        detail = (f"r = {fit['r']:.3f}, p = {fit['p']:.3g}, n = {fit['n']}, slope = {fit['slope']:.3g}" if fit
                  else f"no fit: {panel['missing']}")
        lines.append(f"{label}: {detail}")
    return lines + [f"figures and numbers in {analysis['folder']}"]


def analyze_run(config: Config, run_dir: str | Path, split: str = "test", limit: int = 200,
                panels: int = PANELS) -> dict:
    """Both Figure 8 panels and the Figure 9 panels of RUN (``config``: the run's own config).

    The test split's features must be in the cache (`segrl analyze` fills it first).
    """
    run_dir = Path(run_dir)
    check_head(config, run_dir)
    checkpoint = run_dir / "model"
    if not (checkpoint / "config.json").is_file():
        raise FileNotFoundError(f"{run_dir}: no final model folder ({checkpoint}); has the run finished?")
    views = sample_views(config, checkpoint, split, limit)
    folder = run_dir / "analysis"
    folder.mkdir(parents=True, exist_ok=True)
    analysis = {"run": str(run_dir), "checkpoint": str(checkpoint), "split": split, "samples": len(views),
                "folder": str(folder), "training": training_points(read_metrics(run_dir)),
                "instances": instance_points(views)}
    shown = [v for v in views if v.has_target and v.mask is not None][:panels]
    analysis["panels"] = [{"sample_id": v.sample_id, "question": v.question, "answer": v.answer} for v in shown]
    draw_correlations([analysis["training"], analysis["instances"]]).savefig(folder / "fig8_correlation.png", dpi=100)
    if shown:
        draw_panels(shown).savefig(folder / "fig9_panels.png", dpi=100)
    (folder / "analysis.json").write_text(json.dumps(analysis, indent=2, default=float))
    return analysis

"""The main job's summary as one JSON file, `<work_dir>/report.json`.

What SFT and GRPO reached on val, and GRPO's change over SFT on the same samples
with its standard error (from the two checkpoints' `eval-<split>.json`), beside how
good the parts they stand on are: the frozen tiny SAM (box-prompted IoU, from
make-tiny's `tiny.json`) and the SAE (L0 and explained variance on held-out
states, from its `metrics.json`). A figure whose source does not record it is null
rather than a guess.
"""
from __future__ import annotations

import json
from pathlib import Path

from data.atomic import write_atomic
from rewards.stats import paired_change

REPORT = "report.json"
PAIRED_SCORES = {"giou": "iou", "reasoning_acc": "reasoning"}
"""Metric -> the per-sample score whose mean it is (gIoU: the mean IoU; reasoning accuracy)."""


def _read_json(path: Path) -> dict:
    """A JSON object, or {} where the file is missing or holds something else."""
    try:
        data = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def _number(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def eval_change(before: str | Path, after: str | Path) -> dict:
    """{metric: {"change", "se", "n"}} of two evaluations' ``eval-<split>.json`` files over the samples both
    scored (see ``PAIRED_SCORES``); {} where a file is missing or predates per-sample scores."""
    scores = [_read_json(Path(path)).get("per_sample") for path in (before, after)]
    if not all(isinstance(s, dict) and s for s in scores):
        return {}
    out = {}
    for metric, key in PAIRED_SCORES.items():
        pairs = [{k: v[key] for k, v in s.items() if isinstance(v, dict) and key in v} for s in scores]
        if any(k in pairs[1] for k in pairs[0]):
            out[metric] = paired_change(*pairs).to_json()
    return out


def checkpoints_change(config, before: str | Path, after: str | Path) -> dict:
    """``eval_change`` of two checkpoint folders' evaluations on the config's first eval split."""
    from models.segmenter import eval_file

    split = config.data.eval_splits[0]
    return eval_change(eval_file(before, split), eval_file(after, split))


def change_line(change: dict, label: str) -> str:
    """One line of ``eval_change``'s result, e.g. "GRPO - SFT ...: gIoU +0.012 ± 0.008, ..."."""
    if not change:
        return f"{label}: no per-sample scores to pair (an evaluation written before they were recorded)"
    parts = [f"{name} {c['change']:+.3f} ± {c['se']:.3f}" for name, c in
             (("gIoU", change.get("giou")), ("reasoning", change.get("reasoning_acc"))) if c]
    n = max(c["n"] for c in change.values())
    return f"{label} on the same {n} samples (paired, ± standard error): " + ", ".join(parts)


def main_report(sft_metrics: dict, grpo_metrics: dict, model_dir: str | Path, sae_dir: str | Path,
                grpo_vs_sft: dict | None = None) -> dict:
    """{"sft", "grpo", "grpo_vs_sft", "sam_box_iou", "sae": {"l0", "explained_variance"}} from the stages'
    val metrics, their paired change (``eval_change``) and the model and SAE folders."""
    sam = _read_json(Path(model_dir) / "tiny.json").get("sam")
    sae = _read_json(Path(sae_dir) / "metrics.json")
    return {
        "sft": sft_metrics,
        "grpo": grpo_metrics,
        "grpo_vs_sft": grpo_vs_sft or {},
        "sam_box_iou": _number(sam.get("box_iou")) if isinstance(sam, dict) else None,
        "sae": {key: _number(sae.get(key)) for key in ("l0", "explained_variance")},
    }


def write_main_report(config, sft_metrics: dict, grpo_metrics: dict, grpo_vs_sft: dict | None = None) -> Path:
    """Write `main_report` for `config`'s folders to `<work_dir>/report.json`; returns its path."""
    report = main_report(sft_metrics, grpo_metrics, config.resolve_path(config.model.name_or_path),
                         config.resolve_path(config.model.sae.path), grpo_vs_sft)
    path = Path(config.resolve_path("{work_dir}")) / REPORT
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(report, indent=2))
    return path

"""The main job's summary as one JSON file, `<work_dir>/report.json`.

What SFT and GRPO reached on val, beside how good the parts they stand on are:
the frozen tiny SAM (box-prompted IoU, from make-tiny's `tiny.json`) and the SAE
(L0 and explained variance on held-out states, from its `metrics.json`). A figure
whose source does not record it is null rather than a guess.
"""
from __future__ import annotations

import json
from pathlib import Path

from data.atomic import write_atomic

REPORT = "report.json"


def _read_json(path: Path) -> dict:
    """A JSON object, or {} where the file is missing or holds something else."""
    try:
        data = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def _number(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def main_report(sft_metrics: dict, grpo_metrics: dict, model_dir: str | Path, sae_dir: str | Path) -> dict:
    """{"sft", "grpo", "sam_box_iou", "sae": {"l0", "explained_variance"}} from the stages' val metrics and
    the model and SAE folders."""
    sam = _read_json(Path(model_dir) / "tiny.json").get("sam")
    sae = _read_json(Path(sae_dir) / "metrics.json")
    return {
        "sft": sft_metrics,
        "grpo": grpo_metrics,
        "sam_box_iou": _number(sam.get("box_iou")) if isinstance(sam, dict) else None,
        "sae": {key: _number(sae.get(key)) for key in ("l0", "explained_variance")},
    }


def write_main_report(config, sft_metrics: dict, grpo_metrics: dict) -> Path:
    """Write `main_report` for `config`'s folders to `<work_dir>/report.json`; returns its path."""
    report = main_report(sft_metrics, grpo_metrics, config.resolve_path(config.model.name_or_path),
                         config.resolve_path(config.model.sae.path))
    path = Path(config.resolve_path("{work_dir}")) / REPORT
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(report, indent=2))
    return path

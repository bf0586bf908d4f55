"""`segrl plot`: on a fake run folder (metrics.jsonl + reports), every figure's PNG is written and its JSON
holds the numbers recomputed here from what the folder says; sample grids on the tiny workspace."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread
from tests_support import overrides_for

import pipelines.evaluate as evaluate_module
from config import dump_config, load_config
from data.schema import read_samples
from pipelines.cli import main
from pipelines.grpo.metrics_log import MetricsLog
from pipelines.plot import plot_run

SFT = {"before": {"giou": 0.1, "ciou": 0.0, "n_acc": 1.0, "t_acc": 0.0, "format_valid": 0.0, "count": 8},
       "after": {"giou": 0.4, "ciou": 0.5, "n_acc": 0.5, "t_acc": 0.75, "format_valid": 1.0, "count": 8}}
GRPO_EVAL = {"giou": 0.55, "ciou": 0.6, "n_acc": 0.75, "t_acc": 0.875, "format_valid": 1.0, "reasoning_acc": 0.5,
             "count": 8}
PHASES = {"rollout": {"busy_s": 30.0, "idle_s": 10.0, "busy_fraction": 0.75},
          "learn": {"busy_s": 12.5, "idle_s": 27.5, "busy_fraction": 0.3125}}


def fake_run(root: Path, steps: int = 12) -> tuple[Path, list[dict]]:
    """An SFT folder with its report and a GRPO folder with metrics.jsonl (written by the real sink) and a report."""
    (root / "sft").mkdir(parents=True)
    (root / "sft" / "report.json").write_text(json.dumps(SFT))
    run = root / "grpo"
    rng = np.random.default_rng(0)
    log, logged = MetricsLog(run, ["jsonl"]), []
    for step in range(1, steps + 1):
        metrics = {"reward": {"total": float(rng.normal(0.4 + 0.02 * step, 0.05)), "format": float(rng.uniform()),
                              "mask": float(rng.uniform())},
                   "loss": {"kl": float(rng.uniform()) if step % 4 else float("nan")},  # NaN steps leave the curve
                   "staleness": {str(step % 3): 4, **({"0": 4} if step % 3 else {})},
                   "time": {"learn_s": 1.0 + step, "learner_wait_s": 0.5}}
        logged.append({"step": step, **log.log(step, metrics)})
    log.close()
    (run / "report.json").write_text(json.dumps({"eval": GRPO_EVAL, "phases": PHASES, "wall_s": 40.0}))
    return run, logged


def hand_ema(values: list[float], weight: float) -> list[float]:
    out = [values[0]]
    for v in values[1:]:
        out.append(weight * out[-1] + (1 - weight) * v)
    return out


def fake_config(root: Path):
    return load_config("configs/tiny.yaml", [f"paths.work_dir={root / 'work'}", f"train.init_from={root}/sft/model",
                                             f"train.output={root}/grpo"])


def read(run: Path, name: str) -> dict:
    png = run / "plots" / f"{name}.png"
    assert png.stat().st_size > 1000 and imread(png).shape[2] == 4  # a real RGBA image
    return json.loads((run / "plots" / f"{name}.json").read_text())


def test_plot_writes_each_figure_with_the_numbers_behind_it(tmp_path):
    run, logged = fake_run(tmp_path)
    report = plot_run(fake_config(tmp_path), run, ema_weight=0.8, samples=0)
    assert report.written == ["rewards", "val_metrics", "staleness", "phases"] and not report.skipped

    rewards = read(run, "rewards")
    assert rewards["ema_weight"] == 0.8 and set(rewards["series"]) == {"reward/total", "reward/format", "reward/mask",
                                                                        "loss/kl"}
    for name, series in rewards["series"].items():
        kept = [(row["step"], row[name]) for row in logged if np.isfinite(row[name])]
        assert series["step"] == [s for s, _ in kept] and series["value"] == [v for _, v in kept]
        assert series["ema"] == pytest.approx(hand_ema([v for _, v in kept], 0.8), abs=1e-12)
    assert len(rewards["series"]["loss/kl"]["step"]) == 9 and 4 not in rewards["series"]["loss/kl"]["step"]

    val = read(run, "val_metrics")
    assert list(val["stages"]) == ["before SFT", "after SFT", "after GRPO"]
    assert val["stages"]["after SFT"]["giou"] == 0.4 and val["stages"]["after GRPO"]["ciou"] == 0.6
    assert "reasoning_acc" in val["metrics"] and val["stages"]["before SFT"]["reasoning_acc"] is None

    stale = read(run, "staleness")
    expected: dict[int, int] = {}
    for row in logged:
        for key, value in row.items():
            if key.startswith("staleness/"):
                expected[int(key.split("/")[1])] = expected.get(int(key.split("/")[1]), 0) + value
    assert dict(zip(stale["staleness"], stale["groups"])) == expected == {0: 4 * 12, 1: 16, 2: 16}

    phases = read(run, "phases")
    assert phases["phases"] == {k: {"busy_s": v["busy_s"], "idle_s": v["idle_s"]} for k, v in PHASES.items()}
    assert phases["step"] == list(range(1, 13)) and phases["learn_s"] == [1.0 + s for s in range(1, 13)]


def test_plot_skips_what_is_missing_and_needs_metrics(tmp_path, capsys):
    run, _ = fake_run(tmp_path, steps=3)
    (run / "report.json").unlink()
    report = plot_run(fake_config(tmp_path), run, samples=2)
    assert report.written == ["rewards", "val_metrics", "staleness"]
    assert "report.json" in report.skipped["phases"] and "no model folder" in report.skipped["samples_after_grpo"]
    assert list(read(run, "val_metrics")["stages"]) == ["before SFT", "after SFT"]
    (tmp_path / "empty").mkdir()
    assert main(["plot", str(tmp_path / "empty"), "--samples", "0"]) == 2
    assert "no metrics.jsonl rows" in capsys.readouterr().err


def test_cli_plot_reads_the_runs_own_config(tmp_path, capsys):
    run, _ = fake_run(tmp_path)
    (run / "config.yaml").write_text(dump_config(fake_config(tmp_path)))
    assert main(["plot", str(run), "--samples", "0", "--ema", "0.5"]) == 0
    assert "val_metrics" in capsys.readouterr().out  # the SFT report was found through the saved init_from
    assert read(run, "rewards")["ema_weight"] == 0.5


def test_sample_grids_before_and_after_grpo(tiny_workspace, tiny_features, tiny_sae, tmp_path, monkeypatch):
    """A GRPO start (make-tiny's folder) and a saved segmenter as RUN/model, every answer "<SEG>"."""
    from config.builders import build_segmenter, head_spec
    from models.segmenter import save_segmenter

    config = load_config("configs/tiny.yaml", overrides_for(tiny_workspace["config"]) + [
        f"train.init_from={tiny_workspace['tiny']['path']}", f"train.output={tmp_path}/grpo"])
    model, tokenizer, _ = build_segmenter(config)
    run, _ = fake_run(tmp_path / "folders", steps=2)
    save_segmenter(model, head_spec(config), tokenizer, tiny_workspace["tiny"]["path"], run / "model")
    answer = tokenizer("<think>the shape</think> <SEG>", add_special_tokens=False)["input_ids"]
    monkeypatch.setattr(evaluate_module, "generate", lambda policy, tok, embeds, n: [answer] * len(embeds))
    report = plot_run(config, run, samples=3)
    assert {"samples_before_grpo", "samples_after_grpo"} <= set(report.written)
    samples = read_samples(Path(config.resolve_path(config.data.root)) / "val.parquet")[:3]
    for name in ("samples_before_grpo", "samples_after_grpo"):
        grid = read(run, name)
        assert [s["sample_id"] for s in grid["samples"]] == [s.sample_id for s in samples]
        for shown, sample in zip(grid["samples"], samples):
            assert shown["answer"] == "<think>the shape</think> <SEG>" and shown["answered_with_mask"]
            assert shown["gt_pixels"] == int(sample.gt_stack.any(0).sum())
            assert shown["has_target"] == (not sample.no_target)
            assert 0 <= shown["mask_pixels"] <= sample.height * sample.width
            if shown["has_target"]:
                assert 0.0 <= shown["mask_iou"] <= 1.0
            else:  # no target: IoU is 1 only for an empty mask
                assert shown["mask_iou"] == (1.0 if shown["mask_pixels"] == 0 else 0.0)

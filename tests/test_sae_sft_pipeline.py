"""sae-train and sft drivers on the tiny workspace: they run, save, and reload; the tiny config's SAE is sparse."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from config.builders import build_segmenter
from models.sae_io import load_sae, load_sae_metrics
from pipelines.evaluate import run_eval
from pipelines.sae_train import report_lines as sae_lines
from pipelines.sft import report_lines as sft_lines
from pipelines.sft import run_sft


def test_sae_train_saves_a_frozen_sae_that_beats_its_start(tiny_workspace, tiny_sae):
    config = tiny_workspace["config"]
    sae = load_sae(config.resolve_path(config.model.sae.path))
    assert sae.d_in == config.model.tiny.lm.hidden_size
    assert sae.d_sae == config.model.sae.expansion * sae.d_in and sae.layer == config.model.sae.layer
    first, last = tiny_sae["initial"], tiny_sae["epochs"][-1]
    assert last["val_mse"] < first["mse"] and last["val_explained_variance"] > first["explained_variance"]
    metrics = load_sae_metrics(config.resolve_path(config.model.sae.path))
    assert metrics["l0"] == last["val_l0"] <= config.model.sae.k
    assert metrics["dead_fraction"] == last["val_dead_fraction"] and metrics["val_states"] == tiny_sae["val_states"]
    lines = "\n".join(sae_lines(tiny_sae))
    assert "explained variance" in lines and "L0" in lines and "dead features" in lines


@pytest.fixture(scope="module")
def default_sae(default_world):
    """configs/tiny.yaml's SAE as the main job trains it (states of the first max_samples training samples,
    every sae default)."""
    return load_sae_metrics(default_world.resolve_path(default_world.model.sae.path))


def test_tiny_config_sae_is_sparse_faithful_and_alive(default_sae):
    """Held out: at most 32 active features per state, 80% of the variance kept, at most 10% never firing
    (ReLU + L1 at A.2's settings gave L0 559 of 1,024)."""
    assert default_sae["val_states"] > 4000
    assert default_sae["l0"] <= 32
    assert default_sae["explained_variance"] >= 0.8
    assert default_sae["dead_fraction"] <= 0.1


def test_sft_runs_saves_and_reloads(tiny_workspace, tiny_sae, tmp_path):
    config = tiny_workspace["config"].model_copy(deep=True)
    config.sft.epochs, config.sft.batch_size, config.sft.eval_samples = 1, 8, 8
    config.eval.max_new_tokens = 24
    config.sft.output = str(tmp_path / "sft")
    report = run_sft(config, progress=False)
    steps = [json.loads(line) for line in (tmp_path / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert len(steps) == report["steps"] == 5  # 40 samples / batch 8
    assert all(s["ce"] > 0 and s["grad_norm"] > 0 for s in steps)
    for tag in ("before", "after"):
        assert {"giou", "ciou", "n_acc", "t_acc", "format_valid"} <= set(report[tag])
    ckpt = Path(report["checkpoint"])
    scored = json.loads((ckpt / "eval-val.json").read_text())  # the "after" eval, as `segrl eval` writes one
    assert scored["metrics"] == report["after"] and len(scored["per_sample"]) == 8
    assert np.mean([s["iou"] for s in scored["per_sample"].values()]) == pytest.approx(report["after"]["giou"])
    assert (np.mean([s["reasoning"] for s in scored["per_sample"].values()])
            == pytest.approx(report["after"]["reasoning_acc"]))
    assert (ckpt / "head" / "model.safetensors").is_file() and (ckpt / "projector").is_dir()
    assert ((ckpt / "sam" / "sam.pt").read_bytes()
            == (Path(tiny_workspace["tiny"]["path"]) / "sam" / "sam.pt").read_bytes())
    reloaded, _, _ = build_segmenter(config, str(ckpt))
    trained, _, _ = build_segmenter(config, str(ckpt))
    for (name, a), (_, b) in zip(reloaded.state_dict().items(), trained.state_dict().items()):
        assert torch.equal(a, b), name
    start, _, _ = build_segmenter(config)
    assert not torch.equal(start.head.codebook.weight, reloaded.head.codebook.weight)
    assert "gIoU" in "\n".join(sft_lines(report))
    result = run_eval(config, str(ckpt), "val", limit=4)
    saved = json.loads(Path(result["path"]).read_text())
    assert saved["metrics"]["count"] == 4 and saved["split"] == "val" and len(saved["samples"]) == 4

"""`segrl eval`: generation length from the config, READ's per-image threshold search (no Ray)."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from tests_support import overrides_for

import pipelines.evaluate as evaluate_module
from config import load_config
from config.builders import feature_store
from data.features import content_hash
from data.schema import read_samples, resolve_image
from data.synthetic import sft_target
from models.encoders import FrozenEncoders
from pipelines.evaluate import THRESHOLD_METRICS, run_eval, table_lines, threshold_search

N_ITEMS = 6


@pytest.fixture(scope="module")
def read_config(tiny_workspace, tmp_path_factory):
    """kind=read (no SAE to train) on the tiny workspace; the first val images encoded here."""
    tmp = tmp_path_factory.mktemp("eval")
    c = load_config("configs/tiny.yaml", overrides_for(tiny_workspace["config"]) + [
        "model.head.kind=read", f"model.sae.path={tmp}/no-sae", f"paths.cache_dir={tmp}/cache"])
    split = Path(c.resolve_path(c.data.root)) / "val.parquet"
    encoders = FrozenEncoders(c.model.family, c.resolve_path(c.model.name_or_path), c.model.sam.variant, None)
    store = feature_store(c)
    paths = [resolve_image(split, s.image_path) for s in read_samples(split)[:N_ITEMS]]
    for path, feats in zip(paths, encoders([np.asarray(Image.open(p).convert("RGB")) for p in paths])):
        store.put(content_hash(path), feats)
    return c


def spy_generate(monkeypatch, answer=None) -> list[tuple[int, int]]:
    """Record (max_new_tokens, longest response) of each generate call; ``answer`` replaces the model's."""
    calls, real = [], evaluate_module.generate

    def spy(policy, tokenizer, embeds, max_new_tokens):
        out = real(policy, tokenizer, embeds, max_new_tokens) if answer is None else [answer] * len(embeds)
        calls.append((max_new_tokens, max(len(r) for r in out)))
        return out

    monkeypatch.setattr(evaluate_module, "generate", spy)
    return calls


def test_eval_generates_up_to_the_configured_length(read_config, monkeypatch, tmp_path):
    calls = spy_generate(monkeypatch)
    run_eval(read_config, split="val", limit=N_ITEMS, out=str(tmp_path / "a.json"))
    assert {cap for cap, _ in calls} == {read_config.data.max_response_length} == {96}  # tiny: as before
    short = read_config.model_copy(deep=True)
    short.eval.max_new_tokens = 5
    calls.clear()
    run_eval(short, split="val", limit=N_ITEMS, out=str(tmp_path / "b.json"))
    assert calls == [(5, 5)]  # the untrained tiny LM runs to the cap


def test_read_eval_reports_the_threshold_search_beside_giou(read_config, monkeypatch, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(read_config.resolve_path(read_config.model.name_or_path))
    sample = next(s for s in read_samples(Path(read_config.resolve_path(read_config.data.root)) / "val.parquet")
                  if not s.no_target)
    answer = tokenizer(sft_target(sample, read_config.model.ref_token), add_special_tokens=False)["input_ids"]
    spy_generate(monkeypatch, answer)  # every answer has a <SEG>: the head decodes a mask
    metrics = run_eval(read_config, split="val", limit=N_ITEMS, out=str(tmp_path / "m.json"))["metrics"]
    fixed, best, similarity = (metrics[k] for k in THRESHOLD_METRICS)
    assert 0 <= fixed <= best <= 1 and 0 <= similarity <= 1
    header = table_lines({"val": metrics})[0]
    assert "gIoU" in header and "tgt@t*" in header and "sim@t*" in header
    assert "tgt@t*" not in table_lines({"val": {k: v for k, v in metrics.items() if k not in THRESHOLD_METRICS}})[0]


def _item(gt: np.ndarray, ignore: np.ndarray | None = None):
    h, w = gt.shape
    return SimpleNamespace(sample=SimpleNamespace(height=h, width=w, gt_stack=gt[None], ignore_mask=ignore),
                           sam_input_size=(h, w))


def test_threshold_search_hand_values():
    # 4x4 image = SAM's frame = the low-res frame: no resizing. GT: the top-left 2x2 block.
    gt = np.zeros((4, 4), bool)
    gt[:2, :2] = True
    probs = np.full((4, 4), 0.1, np.float32)
    probs[:2, :2] = 0.4  # below 0.5 (IoU 0 there), perfect at any threshold in (0.1, 0.4]
    sim = np.full((4, 4), 0.2, np.float32)
    sim[:2, :2], sim[3, 3] = 0.9, 0.95  # best: t <= 0.9 takes the block + one pixel, IoU 4/5
    head = SimpleNamespace(mask_logits=torch.logit(torch.from_numpy(probs))[None], heatmaps=torch.from_numpy(sim)[None])
    assert threshold_search(head, _item(gt), 4) == pytest.approx((0.0, 1.0, 0.8), abs=1e-6)
    ignore = np.zeros((4, 4), bool)
    ignore[3, 3] = True  # the stray pixel no longer counts
    assert threshold_search(head, _item(gt, ignore), 4) == pytest.approx((0.0, 1.0, 1.0), abs=1e-6)
    assert threshold_search(None, _item(gt), 4) == (0.0, 0.0, 0.0)  # a refusal finds nothing

"""`segrl eval`: generation length from the config, READ's per-image threshold search, reasoning accuracy,
the trivial baselines beside the model, and the main job's report.json (no Ray)."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from tests_support import overrides_for

import pipelines.evaluate as evaluate_module
from config import load_config
from config.builders import feature_store
from data.features import content_hash
from data.schema import read_samples, resolve_image
from data.synthetic import NO_TARGET_ANSWER, random_scene, sft_target
from models.encoders import FrozenEncoders
from pipelines.baselines import BASELINES, baseline_metrics, largest_shape, shapes, split_baselines
from pipelines.evaluate import THRESHOLD_METRICS, run_eval, table_lines, threshold_search
from pipelines.report import change_line, eval_change, main_report

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


def _val_samples(config):
    return read_samples(Path(config.resolve_path(config.data.root)) / "val.parquet")[:N_ITEMS]


def answer_each(monkeypatch, texts: list[str], tokenizer) -> None:
    """The i-th prompt of the split gets ``texts[i]`` as its answer (one generate call: N_ITEMS < batch size)."""
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    monkeypatch.setattr(evaluate_module, "generate", lambda policy, tok, embeds, n: ids[:len(embeds)])


def test_reasoning_accuracy_counts_answers_that_settle_on_exactly_the_targets(read_config, monkeypatch, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(read_config.resolve_path(read_config.model.name_or_path))
    samples, ref = _val_samples(read_config), read_config.model.ref_token
    answer_each(monkeypatch, [sft_target(s, ref) for s in samples], tokenizer)
    torch.manual_seed(0)  # the folder has no head weights: both evals build the same fresh head
    metrics = run_eval(read_config, split="val", limit=N_ITEMS, out=str(tmp_path / "own.json"))["metrics"]
    assert metrics["reasoning_acc"] == 1.0
    assert metrics["guided_giou"] == pytest.approx(metrics["giou"])  # its answers are the reference ones
    guided = metrics["guided_giou"]
    refusal = f"<think>The question asks for it. There is no star in the image.</think> {NO_TARGET_ANSWER}"
    answer_each(monkeypatch, [refusal] * N_ITEMS, tokenizer)
    torch.manual_seed(0)
    metrics = run_eval(read_config, split="val", limit=N_ITEMS, out=str(tmp_path / "refuse.json"))["metrics"]
    assert metrics["reasoning_acc"] == pytest.approx(np.mean([s.no_target for s in samples]))
    assert metrics["giou"] == pytest.approx(np.mean([s.no_target for s in samples]))
    assert metrics["guided_giou"] == pytest.approx(guided)  # what the model answers does not change it
    own, refused = (json.loads((tmp_path / f"{name}.json").read_text())["per_sample"] for name in ("own", "refuse"))
    assert list(refused) == [s.sample_id for s in samples]
    assert [refused[s.sample_id] for s in samples] == [{"reasoning": float(s.no_target), "iou": float(s.no_target)}
                                                       for s in samples]
    assert all(own[s.sample_id]["reasoning"] == 1.0 for s in samples)
    change = eval_change(tmp_path / "own.json", tmp_path / "refuse.json")
    assert change["reasoning_acc"]["change"] == pytest.approx(metrics["reasoning_acc"] - 1.0)
    assert change["giou"]["change"] == pytest.approx(metrics["giou"] - np.mean([own[k]["iou"] for k in own]))
    assert change["giou"]["n"] == N_ITEMS
    assert "reason" in table_lines({"val": metrics})[0] and "guided" in table_lines({"val": metrics})[0]


def test_eval_prints_the_baselines_beside_the_model(read_config, monkeypatch, tmp_path):
    spy_generate(monkeypatch, [])  # empty answers: the model refuses everything, as the refuse baseline
    result = run_eval(read_config, split="val", limit=N_ITEMS, out=str(tmp_path / "b.json"), baselines=True)
    assert list(result["baselines"]) == list(BASELINES)
    refuse = result["baselines"]["refuse"]
    assert {k: refuse[k] for k in ("giou", "ciou", "n_acc", "t_acc")} == {
        k: result["metrics"][k] for k in ("giou", "ciou", "n_acc", "t_acc")}
    assert json.loads((tmp_path / "b.json").read_text())["baselines"] == result["baselines"]
    lines = table_lines({"val": result["metrics"], **result["baselines"]})
    assert [line.split()[0] for line in lines[1:]] == ["val", "refuse", "rand", "largest", "all"]


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_shapes_are_read_off_the_pixels_exactly(seed):
    scene = random_scene(np.random.default_rng(seed), 64)
    found = shapes(scene.image)
    truth = {s.mask.tobytes() for s in scene.shapes}
    assert len(found) == len(scene.shapes) and {m.tobytes() for m in found} == truth
    assert largest_shape(scene.image, np.random.default_rng(0)).sum() == max(s.mask.sum() for s in scene.shapes)


def test_baseline_hand_values():
    """Two samples on one scene: a false premise and 'every shape'. Refusing is right only on the first;
    every coloured pixel is exactly right on the second, and on the first adds its pixels to cIoU's union."""
    from data.schema import Sample

    scene = random_scene(np.random.default_rng(7), 64)
    common = {"image_id": "i", "image_path": "i.png", "height": 64, "width": 64, "question": "q", "split": "val",
              "dataset": "synthetic"}
    samples = [Sample(sample_id="a", no_target=True, **common),
               Sample(sample_id="b", masks=[s.mask for s in scene.shapes], **common)]
    out = baseline_metrics(samples, [scene.image, scene.image])
    assert out["refuse"]["giou"] == 0.5 and out["refuse"]["n_acc"] == 1.0 and out["refuse"]["t_acc"] == 0.0
    assert out["all colour"]["giou"] == out["all colour"]["ciou"] == 0.5
    largest = max(s.mask.sum() for s in scene.shapes) / sum(s.mask.sum() for s in scene.shapes)
    assert out["largest"]["giou"] == pytest.approx(largest / 2) and out["largest"]["t_acc"] == 1.0


def test_baselines_need_a_synthetic_split(tmp_path):
    from data.schema import DataError, Sample, write_samples

    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "i.png")
    write_samples([Sample(sample_id="r0", image_id="i", image_path="i.png", height=8, width=8, question="q",
                          split="val", dataset="refcoco", no_target=True)], tmp_path / "val.parquet")
    with pytest.raises(DataError, match="r0.*dataset.*synthetic"):
        split_baselines(tmp_path / "val.parquet")


def test_main_report_reads_the_model_and_sae_folders_and_nulls_what_is_missing(tmp_path):
    model, sae = tmp_path / "model", tmp_path / "sae"
    model.mkdir(), sae.mkdir()
    (model / "tiny.json").write_text(json.dumps({"spec": {}}))  # a make-tiny folder from before SAM pretraining
    report = main_report({"giou": 0.5, "reasoning_acc": 0.7}, {"giou": 0.6}, model, sae)
    assert report == {"sft": {"giou": 0.5, "reasoning_acc": 0.7}, "grpo": {"giou": 0.6}, "grpo_vs_sft": {},
                      "sam_box_iou": None, "sae": {"l0": None, "explained_variance": None}}
    (model / "tiny.json").write_text(json.dumps({"sam": {"box_iou": 0.91, "point_iou": 0.8}}))
    (sae / "metrics.json").write_text(json.dumps({"l0": 32.0, "explained_variance": 0.96, "mse": 1e-3}))
    report = main_report({}, {}, model, sae)
    assert report["sam_box_iou"] == 0.91 and report["sae"] == {"l0": 32.0, "explained_variance": 0.96}


def _eval_file(path: Path, per_sample: dict) -> Path:
    path.write_text(json.dumps({"metrics": {}, "per_sample": per_sample}))
    return path


def test_eval_change_pairs_the_samples_both_evaluations_scored(tmp_path):
    before = _eval_file(tmp_path / "a.json", {"s0": {"iou": 0.2, "reasoning": 0.0},
                                              "s1": {"iou": 0.6, "reasoning": 1.0},
                                              "s2": {"iou": 1.0, "reasoning": 1.0}, "only-a": {"iou": 0.0}})
    after = _eval_file(tmp_path / "b.json", {"s0": {"iou": 0.8, "reasoning": 1.0},
                                             "s1": {"iou": 0.6, "reasoning": 1.0},
                                             "s2": {"iou": 0.9}, "only-b": {"iou": 1.0}})
    change = eval_change(before, after)
    d = np.array([0.6, 0.0, -0.1])
    assert change["giou"] == pytest.approx({"change": d.mean(), "se": d.std(ddof=1) / np.sqrt(3), "n": 3})
    assert change["reasoning_acc"] == pytest.approx({"change": 0.5, "se": 0.5, "n": 2})
    line = change_line(change, "GRPO - SFT")
    assert line == "GRPO - SFT on the same 3 samples (paired, ± standard error): gIoU +0.167 ± 0.219, " \
                   "reasoning +0.500 ± 0.500"
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"metrics": {}}))  # written before per-sample scores were recorded
    assert eval_change(old, after) == {} and eval_change(tmp_path / "missing.json", after) == {}
    assert "no per-sample scores" in change_line({}, "GRPO - SFT")
    model, sae = tmp_path / "model", tmp_path / "sae"
    model.mkdir(), sae.mkdir()
    assert main_report({}, {}, model, sae, change)["grpo_vs_sft"] == change

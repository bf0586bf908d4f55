"""`segrl analyze` (SegCompass C.1/C.2): the statistics core against known answers and properties, the
learner's per-step SAE MSE and Dice loss, and the analysis of a run folder (points, fits, panels)."""
from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats as scipy_stats
from tests_support import overrides_for

import pipelines.evaluate as evaluate_module
from config import ConfigError, load_config
from data.schema import read_samples
from pipelines.analyze import TRAIN_X, TRAIN_Y, analyze_run
from pipelines.evaluate import run_eval
from pipelines.grpo.metrics_log import MetricsLog, flatten
from pipelines.grpo.run_log import step_metrics
from rewards.stats import ema, ols_fit

finite = st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False)

# ---------------------------------------------------------------- statistics core


def test_ols_known_answer():
    """x 1..5, y 2 4 5 4 5: slope 0.6, intercept 2.2, r² 0.6, SSE 2.4, band at x̄ = 3: 4 ± t(.975, 3)·√(0.8/5)."""
    fit = ols_fit([1, 2, 3, 4, 5], [2, 4, 5, 4, 5], grid_points=5)
    assert fit.slope == pytest.approx(0.6) and fit.intercept == pytest.approx(2.2)
    assert fit.r == pytest.approx(math.sqrt(0.6)) and fit.n == 5 and fit.band_x == [1, 2, 3, 4, 5]
    assert fit.p == pytest.approx(0.1240, abs=1e-4)  # two-sided t-test of r with 3 degrees of freedom
    half = 3.182446305284263 * 0.4
    assert (fit.band_lo[2], fit.band_hi[2]) == pytest.approx((4.0 - half, 4.0 + half))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(finite, finite), min_size=3, max_size=40, unique_by=lambda p: p[0]))
def test_ols_matches_scipy_and_its_band_brackets_the_line(points):
    x, y = (np.array(c) for c in zip(*points))
    if np.ptp(x) < 1e-3:
        return
    fit = ols_fit(x, y)
    ref = scipy_stats.linregress(x, y)
    scale = 1 + np.abs(y).max()
    assert fit.slope * np.ptp(x) == pytest.approx(ref.slope * np.ptp(x), abs=1e-6 * scale)
    assert fit.intercept == pytest.approx(ref.intercept, abs=1e-6 * scale * (1 + np.abs(x).max()))
    if np.ptp(y) > 0 and np.isfinite(ref.rvalue):
        assert fit.r == pytest.approx(ref.rvalue, abs=1e-6) and fit.p == pytest.approx(ref.pvalue, abs=1e-6)
    grid = np.array(fit.band_x)
    line = fit.slope * grid + fit.intercept
    lo, hi = np.array(fit.band_lo), np.array(fit.band_hi)
    tol = 1e-6 * scale
    assert np.all(lo <= line + tol) and np.all(line <= hi + tol)
    assert np.allclose(hi - line, line - lo, atol=tol)  # symmetric about the fitted mean
    width = hi - lo
    assert width.argmin() == np.abs(grid - x.mean()).argmin() or np.ptp(width) < tol  # narrowest at x̄


@settings(max_examples=60, deadline=None)
@given(finite, finite, st.lists(finite, min_size=3, max_size=30, unique=True))
def test_ols_recovers_an_exact_line_with_no_band(slope, intercept, xs):
    x = np.array(xs)
    if np.ptp(x) < 1e-2:
        return
    fit = ols_fit(x, slope * x + intercept)
    scale = 1 + abs(slope) * np.abs(x).max() + abs(intercept)
    assert fit.slope == pytest.approx(slope, abs=1e-6 * scale / np.ptp(x))
    assert np.allclose(fit.band_hi, fit.band_lo, atol=1e-6 * scale)


def test_ols_refuses_what_it_cannot_fit():
    with pytest.raises(ValueError, match="at least 3 points"):
        ols_fit([1, 2], [1, 2])
    with pytest.raises(ValueError, match="x is constant"):
        ols_fit([1, 1, 1], [1, 2, 3])
    assert math.isnan(ols_fit([1, 2, 3], [5, 5, 5]).r)  # constant y: a flat line, no correlation


@settings(max_examples=80, deadline=None)
@given(st.lists(finite, min_size=1, max_size=50), st.floats(0, 0.99))
def test_ema_closed_form_and_bounds(values, weight):
    out = ema(values, weight)
    n = len(values) - 1
    closed = weight ** n * values[0] + (1 - weight) * sum(weight ** (n - k) * values[k] for k in range(1, n + 1))
    assert out[-1] == pytest.approx(closed, abs=1e-6 * (1 + max(map(abs, values))))
    assert min(values) - 1e-9 <= out.min() and out.max() <= max(values) + 1e-9
    assert np.array_equal(ema(values, 0.0), np.array(values, dtype=float))
    assert np.allclose(ema([values[0]] * 5, weight), values[0])
    with pytest.raises(ValueError):
        ema(values, 1.0)


# ---------------------------------------------------------------- what the learner logs for Figure 8 (left)


def test_learner_logs_the_batchs_sae_mse_and_dice_loss(tiny_workspace, tiny_sae):
    import torch

    from config.builders import build_segmenter, feature_store, loss_settings
    from data.features import content_hash
    from data.loader import SegDataset
    from data.schema import resolve_image
    from data.synthetic import sft_target
    from models.grpo_step import learner_loss
    from models.prompt import prompt_ids

    config = tiny_workspace["config"]
    torch.manual_seed(0)
    model, tokenizer, img_size = build_segmenter(config)
    split = Path(config.resolve_path(config.data.root)) / "train.parquet"
    data, ref = SegDataset(split, feature_store(config), img_size), config.model.ref_token
    items = [it for it in (data[i] for i in range(len(data))) if not it.sample.no_target][:3]
    rows = []
    for item in items:
        response = tokenizer(sft_target(item.sample, ref), add_special_tokens=False)["input_ids"]
        rows.append({"prompt_ids": prompt_ids(tokenizer, item.sample.question, ref), "response_ids": response,
                     "image_hash": content_hash(resolve_image(split, item.sample.image_path)),
                     "gt_masks": [(m >= 0.5).numpy() for m in item.gt_lowres], "advantage": 0.0, "error": None,
                     "rollout_logprobs": [0.0] * len(response), "ref_logprobs": [0.0] * len(response)})
    live = [True, True, False]  # the padding row counts in neither mean
    _, metrics = learner_loss(model, rows, data.store, loss_settings(config), live=live)
    with torch.no_grad():
        out, heads = model([r["prompt_ids"] for r in rows], [it.vision for it in items],
                           [r["response_ids"] for r in rows], [it.sam_embedding for it in items])
    sae = model.head.sae
    mse, dice = [], []
    for i in (0, 1):
        x = out.layer_ref_hidden[i]
        mse.append(float(((sae(x)[0] - x) ** 2).mean()))
        p, g = torch.sigmoid(heads[i].mask_logits[0]), torch.as_tensor(np.stack(rows[i]["gt_masks"]).any(0)).float()
        dice.append(float(1 - (2 * (p * g).sum() + 1) / (p.sum() + g.sum() + 1)))
    assert metrics["dice_rows"] == 2 and metrics["seg_rows"] == 2
    assert metrics["sae_mse"] == pytest.approx(np.mean(mse), rel=1e-4) and metrics["sae_mse"] > 0
    assert metrics["dice"] == pytest.approx(np.mean(dice), rel=1e-4) and 0 < metrics["dice"] < 1


def test_step_metrics_carry_the_learner_values_under_the_names_analyze_reads():
    record = SimpleNamespace(rewards=[], metrics={"loss": 1.0, "dice": 0.25, "sae_mse": 0.125}, staleness={},
                             interrupted_updates=0, faults={}, learn_s=1.0, wait_s=0.0)
    flat = flatten(step_metrics(record, {}))
    assert flat[TRAIN_X] == 0.125 and flat[TRAIN_Y] == 0.25


# ---------------------------------------------------------------- the analysis of a run folder


@pytest.fixture(scope="module")
def analysis_run(tiny_workspace, tiny_features, tiny_sae, tmp_path_factory):
    """A run folder: RUN/model (the tiny segmenter, saved), metrics.jsonl with a known SAE MSE -> Dice line."""
    import torch

    from config.builders import build_segmenter, head_spec
    from models.segmenter import save_segmenter

    config = load_config("configs/tiny.yaml", overrides_for(tiny_workspace["config"]))
    run = tmp_path_factory.mktemp("analyze") / "grpo"
    model, tokenizer, _ = build_segmenter(config)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # an untrained head's heatmaps are all background: perturb it so they vary
        for param in model.param_modules()["slot_mapper"].parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.5)
    save_segmenter(model, head_spec(config), tokenizer, tiny_workspace["tiny"]["path"], run / "model")
    rng = np.random.default_rng(1)
    x = rng.uniform(0.01, 0.05, 20)
    y = 0.2 + 8.0 * x + rng.normal(0, 0.02, 20)
    log = MetricsLog(run, ["jsonl"])
    for step, (mse, dice) in enumerate(zip(x, y), 1):
        log.log(step, {"loss": {"dice": dice if step != 5 else float("nan")}, "sae_mse": mse})
    log.close()
    return config, run, tokenizer, (np.delete(x, 4), np.delete(y, 4))


def test_analyze_fits_both_panels_and_draws_figure_9(analysis_run, monkeypatch, tmp_path):
    config, run, tokenizer, (x, y) = analysis_run
    answer = tokenizer("<think>the shape</think> <SEG>", add_special_tokens=False)["input_ids"]
    monkeypatch.setattr(evaluate_module, "generate", lambda policy, tok, embeds, n: [answer] * len(embeds))
    limit = 10
    analysis = analyze_run(config, run, "test", limit, panels=3)
    saved = json.loads((run / "analysis" / "analysis.json").read_text())
    assert saved["training"] == analysis["training"]  # JSON keeps the floats exactly
    for name in ("fig8_correlation.png", "fig9_panels.png"):
        assert (run / "analysis" / name).stat().st_size > 1000

    left = saved["training"]  # the NaN step is left out
    assert left["x"] == pytest.approx(list(x)) and left["y"] == pytest.approx(list(y)) and left["n"] == 19
    slope, intercept = np.polyfit(x, y, 1)
    assert left["fit"]["slope"] == pytest.approx(slope) and left["fit"]["intercept"] == pytest.approx(intercept)
    assert left["fit"]["r"] == pytest.approx(np.corrcoef(x, y)[0, 1]) and left["fit"]["p"] < 1e-6

    samples = read_samples(Path(config.resolve_path(config.data.root)) / "test.parquet")[:limit]
    targets = [s.sample_id for s in samples if not s.no_target]
    right = saved["instances"]
    assert right["sample_ids"] == targets and right["left_out"] == {"no_target": limit - len(targets), "no_mask": 0}
    assert all(0 <= v <= 1 for v in right["x"] + right["y"])
    # the mask cIoUs are the evaluation's: its gIoU over the same answers, less the no-target samples' share
    metrics = run_eval(config, str(run / "model"), "test", limit, str(tmp_path / "eval.json"))["metrics"]
    no_target = limit - len(targets)
    assert sum(right["y"]) == pytest.approx(metrics["giou"] * limit - (metrics["n_acc"] * no_target if no_target
                                                                       else 0.0))
    assert np.ptp(right["x"]) > 0 and right["fit"]["n"] == len(targets)
    assert right["fit"]["slope"] == pytest.approx(np.polyfit(right["x"], right["y"], 1)[0])
    assert right["fit"]["r"] == pytest.approx(np.corrcoef(right["x"], right["y"])[0, 1])
    assert [p["sample_id"] for p in saved["panels"]] == targets[:3]


def test_analyze_needs_the_segcompass_head(analysis_run):
    config, run, _, _ = analysis_run
    read = config.model_copy(deep=True)
    read.model.head.kind = "read"
    with pytest.raises(ConfigError, match="needs the SegCompass head"):
        analyze_run(read, run)

"""The learner's loss on trajectory rows: IS correction and exact micro-batch accumulation.

A fake segmenter with fixed logprob leaves stands in for the model, so the values are
hand-computable and no tiny workspace is needed.
"""
import math
from types import SimpleNamespace

import pytest
import torch
from torch.nn import functional as F

from models.grpo_step import AGGREGATION_UNITS, LossSettings, LossTotals, learner_loss
from models.losses import AGGREGATIONS, grpo_loss


class FakeSegmenter:
    """Fixed per-row logprob leaves (row i has prompt_ids [i]); no reference token, so no heads."""

    def __init__(self, logprobs: list[list[float]]):
        self.leaves = [torch.tensor(lp, requires_grad=True) for lp in logprobs]

    def __call__(self, prompts, vision, responses, sam, sam_input_sizes):
        width = max(len(r) for r in responses)
        logprobs = torch.stack([F.pad(self.leaves[p[0]], (0, width - len(self.leaves[p[0]]))) for p in prompts])
        mask = torch.tensor([[t < len(r) for t in range(width)] for r in responses])
        return SimpleNamespace(logprobs=logprobs, response_mask=mask), [None] * len(prompts)


FEATURES = {"img": {"vision": None, "sam": None, "sam_input_size": torch.tensor([64, 64])}}
SEG = {"seg_coef": 1.0, "dice_weight": 1.0, "bce_weight": 1.0, "conf_weight": 0.2}


def math_log(probs: list[float]) -> list[float]:
    return [math.log(p) for p in probs]


def _rows(learner: list[list[float]], rollout: list[list[float]], advantages: list[float],
          ref: list[list[float]] | None = None) -> list[dict]:
    """Trajectory rows; the reference's logprobs default to the learner's (KL 0)."""
    return [dict(prompt_ids=[i], response_ids=[7] * len(lp), rollout_logprobs=math_log(r), ref_logprobs=math_log(q),
                 advantage=a, image_hash="img", error=None)
            for i, (lp, r, q, a) in enumerate(zip(learner, rollout, ref or learner, advantages))]


def _settings(is_correction: bool, aggregation: str = "seq_mean_group_mean", policy_loss: str = "grpo_clip",
              kl_coef: float = 0.0) -> LossSettings:
    return LossSettings(0.2, None, kl_coef, "k3", policy_loss, aggregation, 1, SEG, is_correction, 2.0, None, 8)


LEARNER = [[0.5, 0.4], [0.3]]  # π_θ of each response's tokens
ROLLOUT = [[0.1, 0.4], [0.6]]  # what the engine reported: ratios 5, 1 and 0.5


@pytest.mark.parametrize("is_correction", [True, False])
def test_learner_loss_is_correction_matches_hand_computation(is_correction):
    model = FakeSegmenter([math_log(p) for p in LEARNER])
    loss, metrics = learner_loss(model, _rows(LEARNER, ROLLOUT, [1.0, -1.0]), FEATURES, _settings(is_correction))
    loss.backward()
    if is_correction:
        # clip anchored to π_θ (ratio 1); weights min(π_θ/π_rollout, 2) = 2, 1, 0.5 scale −A
        pg, grads, clip = ((-2.0 - 1.0) / 2 + 0.5) / 2, ([-2 / 4, -1 / 4], [0.5 / 2]), 0.0
    else:
        # clip anchored to the rollout: ratio 5 (A > 0) stops at 1.2, ratio 0.5 (A < 0) at 0.8
        pg, grads, clip = ((-1.2 - 1.0) / 2 + 0.8) / 2, ([0.0, -1 / 4], [0.0]), 2 / 3
    assert loss.item() == pytest.approx(pg, rel=1e-5) and metrics["pg_loss"] == pytest.approx(pg, rel=1e-5)
    assert metrics["clip_fraction"] == pytest.approx(clip)
    for leaf, expected in zip(model.leaves, grads):
        assert leaf.grad.tolist() == pytest.approx(expected, rel=1e-5, abs=1e-7)


def test_is_correction_off_is_the_plain_loss_anchored_to_the_rollout():
    model = FakeSegmenter([math_log(p) for p in LEARNER])
    rows = _rows(LEARNER, ROLLOUT, [1.0, -1.0])
    loss, _ = learner_loss(model, rows, FEATURES, _settings(False, kl_coef=0.2))
    logp = torch.tensor([math_log(LEARNER[0]), math_log(LEARNER[1]) + [0.0]])
    old = torch.tensor([math_log(ROLLOUT[0]), math_log(ROLLOUT[1]) + [0.0]])
    mask = torch.tensor([[1, 1], [1, 0]])
    plain, _ = grpo_loss(logp, old, logp.clone(), torch.tensor([1.0, -1.0]), mask, kl_coef=0.2)
    assert loss.item() == pytest.approx(plain.item(), rel=1e-6)


def test_every_aggregation_has_a_micro_batch_weighting():
    assert set(AGGREGATION_UNITS) == set(AGGREGATIONS.names())


@pytest.mark.parametrize("policy_loss", ["grpo_clip", "grpo_dual_clip"])
@pytest.mark.parametrize("is_correction", [True, False])
@pytest.mark.parametrize("aggregation", AGGREGATIONS.names())
def test_micro_batch_losses_sum_to_the_full_batch_loss(aggregation, is_correction, policy_loss):
    gen = torch.Generator().manual_seed(0)
    lengths = [3, 1, 5, 2, 4]
    learner = [(0.1 + 0.8 * torch.rand(n, generator=gen)).tolist() for n in lengths]
    rollout = [(0.1 + 0.8 * torch.rand(n, generator=gen)).tolist() for n in lengths]
    rows = _rows(learner, rollout, [1.0, -0.5, 2.0, -1.5, 0.3], ref=[r[::-1] for r in rollout])
    settings = _settings(is_correction, aggregation, policy_loss, kl_coef=0.2)
    model = FakeSegmenter([math_log(p) for p in learner])
    full, _ = learner_loss(model, rows, FEATURES, settings)
    totals = LossTotals.of(rows, aggregation, ref_token_id=-1)
    chunks = [rows[i:i + 2] for i in range(0, len(rows), 2)]
    parts = [learner_loss(model, chunk + rows[:1], FEATURES, settings, totals, [True] * len(chunk) + [False])[0]
             for chunk in chunks]  # each with a non-live padding row
    assert torch.allclose(sum(parts), full, rtol=1e-5)

"""GRPO objective (eq. 10–11), KL estimators and the segmentation losses."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from models.losses import (
    AGGREGATIONS,
    KL_ESTIMATORS,
    dice_loss,
    grpo_loss,
    segmentation_loss,
    truncated_is_weights,
)
from models.losses.kl import K3_LOG_RATIO_CLAMP, LOW_VAR_KL_MAX
from rewards.registry import Registry

LN2 = math.log(2.0)


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


# ------------------------------------------------------------------ KL estimators


def test_kl_estimators_hand_values():
    # π_θ = 0.5, π_ref = 0.25: log π_θ/π_ref = ln 2, eq. 11's ratio π_ref/π_θ = 0.5
    logp, ref = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])
    assert KL_ESTIMATORS.get("k1")(logp, ref).item() == pytest.approx(LN2)
    assert KL_ESTIMATORS.get("k2")(logp, ref).item() == pytest.approx(0.5 * LN2**2)
    assert KL_ESTIMATORS.get("k3")(logp, ref).item() == pytest.approx(0.5 - math.log(0.5) - 1)
    assert KL_ESTIMATORS.get("low_var_kl")(logp, ref).item() == pytest.approx(0.5 - math.log(0.5) - 1)
    same = torch.tensor([-0.1, -2.0, -7.5])
    for name in KL_ESTIMATORS.names():
        assert torch.equal(KL_ESTIMATORS.get(name)(same, same.clone()), torch.zeros(3))


def test_k3_clamps_log_ratio_before_exp():
    logp = torch.tensor([-40.0, 0.0], requires_grad=True)
    ref = torch.tensor([0.0, -40.0])  # log π_ref/π_θ = +40 and −40
    kl = KL_ESTIMATORS.get("k3")(logp, ref)
    c = K3_LOG_RATIO_CLAMP
    assert kl.tolist() == pytest.approx([math.exp(c) - c - 1, math.exp(-c) + c - 1], rel=1e-6)
    kl.sum().backward()
    assert logp.grad.tolist() == [0.0, 0.0]  # outside the clamp: no KL gradient
    # the released code's low_var_kl caps the estimate itself
    kl = KL_ESTIMATORS.get("low_var_kl")(torch.tensor([-15.0, 0.0]), torch.tensor([0.0, -1.0]))
    assert kl[0].item() == LOW_VAR_KL_MAX
    assert kl[1].item() == pytest.approx(math.exp(-1.0) + 1.0 - 1.0)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.floats(-30, 0), st.floats(-30, 0)), min_size=1, max_size=16))
def test_k3_and_k2_are_non_negative(pairs):
    for dtype in (torch.float32, torch.float64):
        logp = torch.tensor([p for p, _ in pairs], dtype=dtype)
        ref = torch.tensor([r for _, r in pairs], dtype=dtype)
        assert (KL_ESTIMATORS.get("k3")(logp, ref) >= 0).all()
        assert (KL_ESTIMATORS.get("k2")(logp, ref) >= 0).all()
        assert (KL_ESTIMATORS.get("low_var_kl")(logp, ref) >= 0).all()


# ------------------------------------------------------------------ GRPO loss

# Two responses, two token slots; the second response has one token (slot [1, 1] is padding).
MASK = torch.tensor([[1, 1], [1, 0]])
RATIOS = [[1.1, 1.5], [0.5, 1.0]]  # π_θ / π_old
REF_OVER_THETA = [[1.0, 2.0], [0.5, 1.0]]  # π_ref / π_θ
ADV = torch.tensor([1.0, -1.0])


def _batch(pad: float = 0.0):
    """logprobs, old, ref with the hand-picked ratios; ``pad`` goes into the padding slot."""
    logp = torch.log(torch.tensor([[0.5, 0.4], [0.3, 0.2]]))
    old = logp - torch.log(torch.tensor(RATIOS))
    ref = logp + torch.log(torch.tensor(REF_OVER_THETA))
    for t in (logp, old, ref):
        t[1, 1] = pad
    return logp.requires_grad_(), old, ref


def _k3(r: float) -> float:
    return r - math.log(r) - 1


def test_grpo_loss_matches_hand_computation():
    logp, old, ref = _batch()
    loss, metrics = grpo_loss(logp, old, ref, ADV, MASK, clip_ratio=0.2, kl_coef=0.2)
    # response 0 (A = +1): −min(1.1, 1.1) and −min(1.5, clip → 1.2); response 1 (A = −1): −min(−0.5, −0.8)
    pg = ((-1.1 - 1.2) / 2 + 0.8) / 2
    kl = ((_k3(1.0) + _k3(2.0)) / 2 + _k3(0.5)) / 2
    assert metrics["pg_loss"] == pytest.approx(pg, rel=1e-5)
    assert metrics["kl"] == pytest.approx(kl, rel=1e-5)
    assert loss.item() == pytest.approx(pg + 0.2 * kl, rel=1e-5)
    assert metrics["loss"] == pytest.approx(loss.item())
    assert metrics["clip_fraction"] == pytest.approx(2 / 3)  # tokens [0, 1] and [1, 0]
    assert metrics["ratio_mean"] == pytest.approx((1.1 + 1.5 + 0.5) / 3, rel=1e-5)
    assert metrics["ratio_max"] == pytest.approx(1.5, rel=1e-5)
    assert metrics["is_weight_mean"] == 1.0


def test_token_mean_aggregation_weighs_every_token_once():
    logp, old, ref = _batch()
    _, metrics = grpo_loss(logp, old, ref, ADV, MASK, kl_coef=0.2, aggregation="token_mean")
    assert metrics["pg_loss"] == pytest.approx((-1.1 - 1.2 + 0.8) / 3, rel=1e-5)
    assert metrics["kl"] == pytest.approx((_k3(1.0) + _k3(2.0) + _k3(0.5)) / 3, rel=1e-5)


@pytest.mark.parametrize(
    "advantage, ratio, clipped",
    [
        (1.0, 1.5, True),  # pushed up past 1 + ε: no more gain
        (1.0, 0.5, False),  # below 1 − ε but the gradient still raises it
        (-1.0, 0.5, True),  # pushed down past 1 − ε
        (-1.0, 1.5, False),  # above 1 + ε: the gradient still lowers it
        (1.0, 1.1, False),  # inside the trust region
    ],
)
def test_clipping_removes_the_gradient_only_on_the_favoured_side(advantage, ratio, clipped):
    logp = torch.tensor([[math.log(0.5)]], requires_grad=True)
    old = logp.detach() - math.log(ratio)
    loss, metrics = grpo_loss(logp, old, None, torch.tensor([advantage]), torch.ones(1, 1), kl_coef=0.0)
    loss.backward()
    assert metrics["clip_fraction"] == float(clipped)
    # d(−r·A)/d log π_θ = −r·A when the unclipped branch is active
    expected = 0.0 if clipped else -ratio * advantage
    assert logp.grad.item() == pytest.approx(expected, rel=1e-5, abs=0.0)


def test_clip_higher_widens_the_upper_bound_only():
    logp = torch.tensor([[math.log(0.5)]], requires_grad=True)
    old = logp.detach() - math.log(1.25)
    _, sym = grpo_loss(logp, old, None, torch.tensor([1.0]), torch.ones(1, 1), kl_coef=0.0)
    _, high = grpo_loss(logp, old, None, torch.tensor([1.0]), torch.ones(1, 1), kl_coef=0.0,
                        policy_loss="grpo_clip_higher", clip_ratio_high=0.28)
    assert sym["clip_fraction"] == 1.0 and sym["pg_loss"] == pytest.approx(-1.2)
    assert high["clip_fraction"] == 0.0 and high["pg_loss"] == pytest.approx(-1.25)
    with pytest.raises(ValueError, match="grpo_clip_higher"):
        grpo_loss(logp, old, None, torch.tensor([1.0]), torch.ones(1, 1), kl_coef=0.0, clip_ratio_high=0.28)


def test_dr_grpo_aggregation_divides_each_response_sum_by_the_max_length():
    logp, old, ref = _batch()
    _, metrics = grpo_loss(logp, old, ref, ADV, MASK, kl_coef=0.2, aggregation="seq_mean_token_sum_norm",
                           max_response_length=4)
    assert metrics["pg_loss"] == pytest.approx(((-1.1 - 1.2) / 4 + 0.8 / 4) / 2, rel=1e-5)
    assert metrics["kl"] == pytest.approx(((_k3(1.0) + _k3(2.0)) / 4 + _k3(0.5) / 4) / 2, rel=1e-5)
    mask = MASK.clone()
    mask[1] = 0  # a response without tokens is left out of the mean
    _, metrics = grpo_loss(logp, old, ref, ADV, mask, kl_coef=0.0, aggregation="seq_mean_token_sum_norm",
                           max_response_length=4)
    assert metrics["pg_loss"] == pytest.approx((-1.1 - 1.2) / 4, rel=1e-5)
    with pytest.raises(ValueError, match="max_length"):
        grpo_loss(logp, old, ref, ADV, MASK, aggregation="seq_mean_token_sum_norm")


@pytest.mark.parametrize(
    "advantage, ratio, loss, clipped",
    [
        (-1.0, 4.0, 3.0, True),  # A < 0 and r > c: the loss stops at c·|A|, no gradient
        (-1.0, 2.5, 2.5, False),  # below c: the plain surrogate −r·A
        (-1.0, 0.5, 0.8, True),  # the ordinary clip still applies
        (1.0, 4.0, -1.2, True),  # A > 0: grpo_clip's bound
        (1.0, 1.1, -1.1, False),
    ],
)
def test_dual_clip_caps_negative_advantage_losses_at_c(advantage, ratio, loss, clipped):
    logp = torch.tensor([[math.log(0.5)]], requires_grad=True)
    old = logp.detach() - math.log(ratio)
    out, metrics = grpo_loss(logp, old, None, torch.tensor([advantage]), torch.ones(1, 1), kl_coef=0.0,
                             policy_loss="grpo_dual_clip", dual_clip_c=3.0)
    out.backward()
    assert metrics["pg_loss"] == pytest.approx(loss, rel=1e-5)
    assert metrics["clip_fraction"] == float(clipped)
    assert logp.grad.item() == pytest.approx(0.0 if clipped else -ratio * advantage, rel=1e-5, abs=0.0)
    _, default = grpo_loss(logp, old, None, torch.tensor([advantage]), torch.ones(1, 1), kl_coef=0.0,
                           policy_loss="grpo_dual_clip")
    assert default["pg_loss"] == metrics["pg_loss"]  # c defaults to 3


def test_dual_clip_options_are_checked():
    logp, old = torch.zeros(1, 1), torch.zeros(1, 1)
    with pytest.raises(ValueError, match="grpo_clip has no dual clip"):
        grpo_loss(logp, old, None, torch.tensor([1.0]), torch.ones(1, 1), kl_coef=0.0, dual_clip_c=3.0)
    with pytest.raises(ValueError, match="dual_clip_c must be > 1"):
        grpo_loss(logp, old, None, torch.tensor([1.0]), torch.ones(1, 1), kl_coef=0.0,
                  policy_loss="grpo_dual_clip", dual_clip_c=1.0)


@pytest.mark.parametrize("pad", [1e30, -1e30, float("inf"), float("nan")])
@pytest.mark.parametrize("aggregation", AGGREGATIONS.names())
def test_masked_tokens_contribute_nothing(pad, aggregation):
    gen = torch.Generator().manual_seed(0)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]])
    clean = -torch.rand(4, 5, generator=gen) * 3
    old, ref = clean - 0.1 * torch.randn(4, 5, generator=gen), clean + 0.3 * torch.randn(4, 5, generator=gen)
    weights = 0.5 + torch.rand(4, 5, generator=gen)
    adv = torch.tensor([0.7, -1.2, 2.0, -0.3])

    def run(fill):
        def dirty(t):
            return torch.where(mask.bool(), t, torch.full_like(t, fill))
        logp = dirty(clean).requires_grad_()
        loss, metrics = grpo_loss(logp, dirty(old), dirty(ref), adv, mask, is_weights=dirty(weights),
                                  aggregation=aggregation, max_response_length=5)
        loss.backward()
        return loss, metrics, logp.grad

    loss0, metrics0, grad0 = run(0.0)
    loss1, metrics1, grad1 = run(pad)
    assert torch.isfinite(loss1) and torch.isfinite(grad1).all()
    assert loss1.item() == loss0.item() and metrics1 == metrics0
    assert torch.equal(grad1, grad0)
    assert (grad1[~mask.bool()] == 0).all()


def test_response_without_tokens_is_left_out_of_the_sequence_mean():
    logp, old, ref = _batch()
    mask = MASK.clone()
    mask[1] = 0
    _, metrics = grpo_loss(logp, old, ref, ADV, mask, kl_coef=0.0)
    assert metrics["pg_loss"] == pytest.approx((-1.1 - 1.2) / 2, rel=1e-5)


def test_truncated_is_weights_values():
    behaviour = torch.log(torch.tensor([[0.1, 0.4, 0.3]]))
    proximal = torch.log(torch.tensor([[0.3, 0.2, 1e-30]]))
    mask = torch.tensor([[1, 1, 0]])
    weights = truncated_is_weights(behaviour, proximal, cap=2.0, mask=mask)
    # π_prox/π_behav = 3 → capped at 2; 0.5 stays; the masked token gets 0
    assert weights.tolist()[0] == pytest.approx([2.0, 0.5, 0.0])
    assert truncated_is_weights(behaviour, proximal, cap=5.0)[0, 0].item() == pytest.approx(3.0, rel=1e-6)
    with pytest.raises(ValueError, match="cap"):
        truncated_is_weights(behaviour, proximal, cap=0.0)


def test_is_weights_scale_the_policy_term_only_and_carry_no_gradient():
    logp, old, ref = _batch()
    _, plain = grpo_loss(logp, old, ref, ADV, MASK)
    weights = torch.full((2, 2), 2.0, requires_grad=True)
    loss, weighted = grpo_loss(logp, old, ref, ADV, MASK, is_weights=weights)
    assert weighted["pg_loss"] == pytest.approx(2 * plain["pg_loss"], rel=1e-6)
    assert weighted["kl"] == plain["kl"]
    assert weighted["is_weight_mean"] == 2.0
    loss.backward()
    assert weights.grad is None and logp.grad is not None


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"kl_estimator": "k4"}, r"unknown KL estimator 'k4'; known: k1, k2, k3, low_var_kl"),
        ({"policy_loss": "ppo"}, r"unknown policy loss 'ppo'; known: grpo_clip, grpo_clip_higher, grpo_dual_clip"),
        ({"aggregation": "sum"},
         r"unknown loss aggregation 'sum'; known: seq_mean_group_mean, seq_mean_token_sum_norm, token_mean"),
        ({"clip_ratio": 1.5}, r"clip_ratio must lie in \(0, 1\)"),
        ({"old_logprobs": torch.zeros(2, 1)}, "old_logprobs has shape"),
        ({"advantages": torch.zeros(2, 2)}, r"advantages must be \[B\]"),
        ({"ref_logprobs": None}, "ref_logprobs is required"),
    ],
)
def test_grpo_loss_rejects_bad_input(kwargs, message):
    logp, old, ref = _batch()
    args = {"logprobs": logp, "old_logprobs": old, "ref_logprobs": ref, "advantages": ADV, "response_mask": MASK}
    with pytest.raises(ValueError, match=message):
        grpo_loss(**{**args, **kwargs})


def test_registry_rejects_duplicates_and_lists_names():
    registry = Registry("thing")
    registry.register("b")(len)
    registry.register("a")(len)
    assert registry.names() == ("a", "b") and "a" in registry
    with pytest.raises(ValueError, match="already registered"):
        registry.register("a")(len)
    with pytest.raises(ValueError, match="unknown thing 'c'; known: a, b"):
        registry.get("c")


# ------------------------------------------------------------------ segmentation


def _masks() -> torch.Tensor:
    """Two disjoint 8×8 objects."""
    gt = torch.zeros(2, 8, 8)
    gt[0, :3, :3] = 1
    gt[1, 4:, 5:] = 1
    return gt


def _logits_for(masks: torch.Tensor, scale: float = 8.0) -> torch.Tensor:
    return scale * (2 * masks - 1)


def test_dice_and_bce_hand_values():
    logits = torch.zeros(1, 2, 2)  # σ = 0.5 everywhere
    target = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])
    # Σpg = 0.5, Σp = 2, Σg = 1: 1 − (2·0.5 + 1) / (2 + 1 + 1)
    assert dice_loss(logits, target).item() == pytest.approx(0.5)
    conf = torch.tensor([1.0])
    loss, metrics = segmentation_loss(logits, target, conf, seg_coef=0.3, dice_weight=2.0, bce_weight=0.5,
                                      conf_weight=0.2)
    assert metrics["dice"] == pytest.approx(0.5) and metrics["bce"] == pytest.approx(LN2)
    assert metrics["conf"] == pytest.approx(softplus(-1.0))
    assert loss.item() == pytest.approx(0.3 * (2.0 * 0.5 + 0.5 * LN2) + 0.2 * softplus(-1.0), rel=1e-6)


def test_perfect_prediction_beats_a_wrong_one():
    gt = _masks()
    slots = torch.cat([_logits_for(gt), torch.full((1, 8, 8), -8.0)])
    right, _ = segmentation_loss(slots, gt, torch.tensor([8.0, 8.0, -8.0]))
    wrong, _ = segmentation_loss(-slots, gt, torch.tensor([-8.0, -8.0, 8.0]))
    assert right.item() < 0.05 < wrong.item()
    single, _ = segmentation_loss(_logits_for(gt[:1]), gt[:1])
    shifted, _ = segmentation_loss(_logits_for(gt[1:]), gt[:1])
    assert single.item() < shifted.item()


def test_hungarian_loss_is_invariant_to_slot_order():
    gen = torch.Generator().manual_seed(3)
    logits, conf = torch.randn(4, 8, 8, generator=gen), torch.randn(4, generator=gen)
    gt = _masks()
    base, metrics = segmentation_loss(logits, gt, conf)
    for perm in ([3, 2, 1, 0], [1, 3, 0, 2]):
        permuted, _ = segmentation_loss(logits[perm], gt, conf[perm])
        assert permuted.item() == pytest.approx(base.item(), rel=1e-6)
    assert metrics["num_matched"] == 2.0


def test_confidence_targets_follow_the_match():
    gt = _masks()
    # slot 2 draws object 0, slot 0 object 1, slot 1 is empty
    logits = torch.stack([_logits_for(gt[1]), torch.full((8, 8), -8.0), _logits_for(gt[0])])
    conf = torch.tensor([2.0, -1.0, 3.0])
    _, metrics = segmentation_loss(logits, gt, conf)
    expected = (softplus(-2.0) + softplus(-1.0) + softplus(-3.0)) / 3  # targets 1, 0, 1
    assert metrics["conf"] == pytest.approx(expected, rel=1e-6)


def test_no_target_pushes_every_confidence_to_zero_and_skips_mask_loss():
    logits = torch.randn(3, 8, 8, requires_grad=True)
    conf = torch.tensor([2.0, -1.0, 0.5], requires_grad=True)
    loss, metrics = segmentation_loss(logits, torch.zeros(0, 8, 8), conf)
    assert metrics["dice"] == metrics["bce"] == metrics["num_matched"] == 0.0
    assert metrics["conf"] == pytest.approx((softplus(2.0) + softplus(-1.0) + softplus(0.5)) / 3, rel=1e-6)
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits)) and (conf.grad > 0).all()


def test_single_object_path():
    gt = _masks()
    logits = torch.zeros(1, 8, 8, requires_grad=True)
    # no object: BCE against an empty mask only
    loss, metrics = segmentation_loss(logits, torch.zeros(0, 8, 8), torch.tensor([1.0]))
    assert metrics["dice"] == 0.0 and metrics["bce"] == pytest.approx(LN2)
    assert metrics["conf"] == pytest.approx(softplus(1.0))
    loss.backward()
    assert (logits.grad > 0).all()  # every pixel pushed towards empty
    # several objects: the one slot learns their union
    union = gt.amax(dim=0, keepdim=True)
    both, _ = segmentation_loss(logits, gt)
    direct, _ = segmentation_loss(logits, union)
    assert both.item() == direct.item()


def test_gradients_reach_matched_mask_logits_and_confidences_only_where_supervised():
    gt = _masks()
    logits = torch.stack([_logits_for(gt[1], 1.0), torch.randn(8, 8), _logits_for(gt[0], 1.0)]).requires_grad_()
    conf = torch.zeros(3, requires_grad=True)
    loss, _ = segmentation_loss(logits, gt, conf)
    loss.backward()
    assert logits.grad[[0, 2]].abs().sum() > 0 and torch.equal(logits.grad[1], torch.zeros(8, 8))
    assert conf.grad.tolist() == pytest.approx([-0.5 / 3, 0.5 / 3, -0.5 / 3])  # (σ(0) − target) / K


def test_segmentation_loss_rejects_bad_shapes():
    with pytest.raises(ValueError, match="gt_masks must be"):
        segmentation_loss(torch.zeros(2, 8, 8), torch.zeros(1, 4, 4))
    with pytest.raises(ValueError, match="confidence_logits must be"):
        segmentation_loss(torch.zeros(2, 8, 8), torch.zeros(1, 8, 8), torch.zeros(3))
    with pytest.raises(ValueError, match="mask_logits must be"):
        segmentation_loss(torch.zeros(8, 8), torch.zeros(1, 8, 8))


def test_total_loss_is_one_backward_into_policy_and_head():
    logp, old, ref = _batch()
    mask_logits = torch.zeros(2, 8, 8, requires_grad=True)
    conf = torch.zeros(2, requires_grad=True)
    grpo, _ = grpo_loss(logp, old, ref, ADV, MASK)
    seg, _ = segmentation_loss(mask_logits, _masks()[:1], conf, seg_coef=0.3, conf_weight=0.2)
    (grpo + seg).backward()
    assert logp.grad.abs().sum() > 0 and mask_logits.grad.abs().sum() > 0 and conf.grad.abs().sum() > 0

"""soft_iou, pairwise_soft_iou, multi_object_score and score_group: goldens, properties, contract."""

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from rewards import multi_object_score, pairwise_soft_iou, score_group, soft_iou

PRESETS = ["paper", "segcompass-code"]


def row(*values, dtype=np.float32):
    """A 1×W mask: golden cases are easiest to compute by hand on one row of pixels."""
    return np.array([values], dtype=dtype)


# ---------------------------------------------------------------- soft_iou goldens


def test_soft_iou_hand_computed():
    # Σpg = 0.5, Σp = 1.5, Σg = 1 → 0.5 / (1.5 + 1 − 0.5) = 0.25
    assert soft_iou(row(0.5, 1.0, 0.0), row(1, 0, 0, dtype=bool)) == pytest.approx(0.25)
    # Σpg = 0.6 + 0.6, Σp = 1.2, Σg = 3 → 1.2 / 3
    assert soft_iou(row(0.6, 0.6, 0.0), row(1, 1, 1, dtype=bool)) == pytest.approx(0.4)


def test_soft_iou_empty_cases():
    empty = np.zeros((3, 3), bool)
    full = np.ones((3, 3), bool)
    assert soft_iou(np.zeros((3, 3)), empty) == 1.0
    assert soft_iou(np.zeros((3, 3)), full) == 0.0
    assert soft_iou(np.full((3, 3), 0.1), empty) == 0.0


def test_soft_iou_perfect_binary_prediction_is_exactly_one():
    gt = np.zeros((256, 256), bool)
    gt[10:200, 30:90] = True
    assert soft_iou(gt.astype(np.float32), gt) == 1.0
    assert soft_iou(gt.astype(np.float64), gt.astype(np.uint8)) == 1.0


def test_soft_iou_accepts_bool_int_and_float64():
    gt = row(1, 1, 0, 0, dtype=bool)
    for pred in (row(1, 0, 0, 1, dtype=bool), row(1, 0, 0, 1, dtype=np.int64), row(1, 0, 0, 1)):
        assert soft_iou(pred, gt) == pytest.approx(1 / 3)


def test_pairwise_soft_iou_matrix():
    gt = np.stack([row(1, 1, 0, 0), row(0, 0, 1, 0)])
    pred = np.stack([row(1, 1, 1, 0), row(1, 0, 0, 0), row(0, 0, 0, 0)])
    expected = [[2 / 3, 1 / 3], [1 / 2, 0.0], [0.0, 0.0]]
    np.testing.assert_allclose(pairwise_soft_iou(pred, gt), expected, rtol=1e-6)


# ------------------------------------------------------- multi-object goldens

# GT X = pixels {0, 1}, Y = pixel {2}. Slot A = {0, 1, 2}, slot B = {0}.
# IoU: A-X 2/3, A-Y 1/3, B-X 1/2, B-Y 0. Greedy (A-X, B-Y) totals 2/3; the optimum
# (A-Y, B-X) totals 5/6, so the Hungarian match must beat greedy.
GT_XY = np.stack([row(1, 1, 0, 0), row(0, 0, 1, 0)])
SLOTS_AB = np.stack([row(1, 1, 1, 0), row(1, 0, 0, 0)])


@pytest.mark.parametrize(
    "pred, conf, gt, paper, code",
    [
        (SLOTS_AB, [1.0, 1.0], GT_XY, 5 / 12, 5 / 12),
        # Three kept slots, one GT matched perfectly: paper ignores surplus slots,
        # the released code divides by max(K', G) = 3.
        (np.stack([row(1, 1, 0, 0), row(0, 0, 0, 0), row(0, 0, 1, 1)]), [1, 1, 1],
         GT_XY[:1], 1.0, 1 / 3),
        # One slot for two GT: paper averages the single matched pair, code divides by 2.
        (SLOTS_AB[:1] * 0 + GT_XY[:1], [0.9], GT_XY, 1.0, 0.5),
        # Released code's own case 3: IoU 0.6 and 0.2 kept, third slot dropped → 0.4.
        (np.stack([row(0.6, 0.6, 0, 0), row(0, 0, 0.2, 0), row(0.3, 0.3, 0.3, 0.3)]),
         [0.9, 0.8, 0.1], np.stack([row(1, 1, 0, 0), row(0, 0, 1, 0)]), 0.4, 0.4),
        # Every slot dropped and no GT: both empty → 1.
        (SLOTS_AB, [0.2, 0.3], GT_XY[:0], 1.0, 1.0),
        # Every slot dropped, GT present → 0.
        (SLOTS_AB, [0.2, 0.3], GT_XY, 0.0, 0.0),
        # Slots kept, no GT → 0.
        (SLOTS_AB, [0.7, 0.3], GT_XY[:0], 0.0, 0.0),
    ],
)
def test_multi_object_goldens(pred, conf, gt, paper, code):
    conf = np.asarray(conf, np.float32)
    assert multi_object_score(pred, conf, gt) == pytest.approx(paper)
    assert multi_object_score(pred, conf, gt, preset="segcompass-code") == pytest.approx(code)


def test_threshold_keeps_confidence_equal_to_it():
    conf = np.array([0.5, 0.4999], np.float32)
    assert multi_object_score(SLOTS_AB, conf, GT_XY[:1]) == pytest.approx(2 / 3)
    assert multi_object_score(SLOTS_AB, conf, GT_XY[:1], threshold=0.3) == pytest.approx(2 / 3)
    assert multi_object_score(SLOTS_AB, conf, GT_XY[:1], threshold=0.6) == 0.0


def test_no_slots_at_all():
    empty = np.zeros((0, 1, 4), np.float32)
    assert multi_object_score(empty, np.zeros(0), GT_XY[:0]) == 1.0
    assert multi_object_score(empty, np.zeros(0), GT_XY) == 0.0


def test_score_group_matches_per_response_scores_across_blocks():
    # 64×128 masks with 8×4 slots span several matmul blocks and a partial tail block.
    rng = np.random.default_rng(0)
    pred = rng.random((8, 4, 64, 130), dtype=np.float32)
    conf = rng.random((8, 4)).astype(np.float32)
    gt = rng.random((3, 64, 130)) > 0.6
    for preset in PRESETS:
        group = score_group(pred, conf, gt, preset=preset)
        one_by_one = [multi_object_score(p, c, gt, preset=preset) for p, c in zip(pred, conf)]
        np.testing.assert_allclose(group, one_by_one, rtol=1e-6)
        np.testing.assert_allclose(group, naive_scores(pred, conf, gt, preset), atol=1e-5)


# ----------------------------------------------------------------- properties


def naive_scores(pred, conf, gt, preset, threshold=0.5):
    """Brute-force oracle: float64 soft IoU per pair, best injective match by enumeration."""
    out = []
    for slots, confidences in zip(pred, conf):
        kept = [s.astype(np.float64) for s, c in zip(slots, confidences) if c >= threshold]
        if not kept or not len(gt):
            out.append(1.0 if not kept and not len(gt) else 0.0)
            continue
        iou = [[np.sum(p * g) / (p.sum() + g.sum() - np.sum(p * g)) if p.sum() + g.sum() else 1.0
                for g in gt.astype(np.float64)] for p in kept]
        small, big = sorted((len(kept), len(gt)))
        best = max(
            sum(iou[i][j] if len(kept) <= len(gt) else iou[j][i] for i, j in enumerate(perm))
            for perm in itertools.permutations(range(big), small)
        )
        out.append(best / (small if preset == "paper" else big))
    return np.array(out)


@st.composite
def groups(draw, max_responses=3):
    """A small group: R responses × K slots, G GT masks, H×W pixels."""
    r = draw(st.integers(1, max_responses))
    k, g = draw(st.integers(0, 4)), draw(st.integers(0, 4))
    h, w = draw(st.integers(1, 4)), draw(st.integers(1, 5))
    probs = st.floats(0, 1, width=32)
    pred = draw(hnp.arrays(np.float32, (r, k, h, w), elements=probs))
    conf = draw(hnp.arrays(np.float32, (r, k), elements=probs))
    gt = draw(hnp.arrays(np.bool_, (g, h, w)))
    return pred, conf, gt


SETTINGS = settings(max_examples=80, deadline=None)


@SETTINGS
@given(groups(), st.sampled_from(PRESETS))
def test_matches_brute_force_oracle_and_lies_in_unit_interval(group, preset):
    pred, conf, gt = group
    scores = score_group(pred, conf, gt, preset=preset)
    assert np.all((scores >= 0) & (scores <= 1))
    np.testing.assert_allclose(scores, naive_scores(pred, conf, gt, preset), atol=1e-5)


@SETTINGS
@given(groups(max_responses=1), st.sampled_from(PRESETS), st.randoms(use_true_random=False))
def test_permuting_slots_and_gt_changes_nothing(group, preset, rnd):
    pred, conf, gt = group
    slot_order = rnd.sample(range(pred.shape[1]), pred.shape[1])
    gt_order = rnd.sample(range(gt.shape[0]), gt.shape[0])
    before = multi_object_score(pred[0], conf[0], gt, preset=preset)
    after = multi_object_score(pred[0][slot_order], conf[0][slot_order], gt[gt_order], preset=preset)
    assert after == pytest.approx(before, abs=1e-6)


@SETTINGS
@given(groups(max_responses=1), st.sampled_from(PRESETS), st.floats(0, 1))
def test_perfect_prediction_scores_one(group, preset, low_conf):
    _, _, gt = group
    # One confident slot per GT mask, plus sub-threshold junk slots.
    junk = np.full((2,) + gt.shape[1:], 0.7, np.float32)
    pred = np.concatenate([gt.astype(np.float32), junk])
    conf = np.array([1.0] * len(gt) + [low_conf * 0.49] * 2, np.float32)
    assert multi_object_score(pred, conf, gt, preset=preset) == 1.0


@SETTINGS
@given(groups(max_responses=1), st.sampled_from(PRESETS), st.data())
def test_slots_below_threshold_change_nothing(group, preset, data):
    pred, conf, gt = group
    dropped = conf[0] < 0.5
    replaced = pred.copy()
    replaced[0][dropped] = data.draw(
        hnp.arrays(np.float32, replaced[0][dropped].shape, elements=st.floats(0, 1, width=32))
    )
    before = multi_object_score(pred[0], conf[0], gt, preset=preset)
    assert multi_object_score(replaced[0], conf[0], gt, preset=preset) == before
    removed = multi_object_score(pred[0][~dropped], conf[0][~dropped], gt, preset=preset)
    assert removed == pytest.approx(before, abs=1e-6)


@SETTINGS
@given(groups(max_responses=1))
def test_released_code_never_scores_above_paper(group):
    pred, conf, gt = group
    paper = multi_object_score(pred[0], conf[0], gt, preset="paper")
    code = multi_object_score(pred[0], conf[0], gt, preset="segcompass-code")
    assert code <= paper + 1e-12


@SETTINGS
@given(groups(max_responses=1))
def test_single_object_score_is_soft_iou(group):
    pred, _, gt = group
    if pred.shape[1] and gt.shape[0]:
        one = np.ones(1, np.float32)
        expected = soft_iou(pred[0, 0], gt[0])
        assert multi_object_score(pred[0, :1], one, gt[:1]) == pytest.approx(expected, abs=1e-6)


# ------------------------------------------------------------------- contract

P = np.full((2, 3, 3), 0.5, np.float32)
C = np.array([0.9, 0.1], np.float32)
G = np.zeros((1, 3, 3), bool)


def with_value(array, value):
    out = array.astype(np.float64)
    out.flat[-1] = value
    return out


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(pred_probs=P[:, :2]), "gt_masks has spatial shape"),
        (dict(confidences=C[:1]), "confidences must have shape"),
        (dict(pred_probs=P[0]), "pred_probs must have 3 dimensions"),
        (dict(confidences=C[:, None]), "confidences must have 1 dimensions"),
        (dict(gt_masks=G[0]), "gt_masks must have 3 dimensions"),
        (dict(pred_probs=with_value(P, np.nan)), "pred_probs contains NaN"),
        (dict(pred_probs=with_value(P, 1.5)), r"pred_probs must lie in \[0, 1\]"),
        (dict(pred_probs=with_value(P, -0.1)), r"pred_probs must lie in \[0, 1\]"),
        (dict(pred_probs=with_value(P, np.inf)), r"pred_probs must lie in \[0, 1\]"),
        (dict(confidences=with_value(C, np.nan)), "confidences contains NaN"),
        (dict(confidences=with_value(C, 2.0)), r"confidences must lie in \[0, 1\]"),
        (dict(gt_masks=with_value(G, 0.5)), "gt_masks must contain only 0 and 1"),
        (dict(gt_masks=with_value(G, np.nan)), "gt_masks must contain only 0 and 1"),
        (dict(pred_probs=P.astype(np.complex64)), "pred_probs must hold bools or real"),
        (dict(pred_probs=P.astype(object)), "pred_probs must hold bools or real"),
        (dict(confidences=["a", "b"]), "confidences must hold bools or real"),
        (dict(confidences=[[0.1], [0.2, 0.3]]), "confidences is not array-like"),
        (dict(threshold=float("nan")), "threshold must be finite"),
        (dict(threshold=True), "threshold must be a real number"),
        (dict(threshold=1.5), "threshold must be <= 1.0"),
        (dict(preset="nope"), "known presets: paper, segcompass-code"),
    ],
)
def test_contract_violations_raise_naming_the_argument(kwargs, message):
    args = dict(pred_probs=P, confidences=C, gt_masks=G)
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        multi_object_score(**args)


def test_invalid_value_in_a_dropped_slot_still_raises():
    pred = P.copy()
    pred[1, 0, 0] = np.nan  # slot 1 has confidence 0.1, below threshold
    with pytest.raises(ValueError, match="pred_probs contains NaN"):
        multi_object_score(pred, C, G)


def test_negative_zero_is_a_valid_probability():
    pred = P.copy()
    pred[0, 0, 0] = -0.0
    assert 0.0 <= multi_object_score(pred, C, G) <= 1.0


def test_nan_in_a_later_block_of_a_big_group_raises():
    pred = np.zeros((8, 4, 64, 130), np.float32)
    pred[7, 3, 63, 129] = np.nan
    with pytest.raises(ValueError, match="pred_probs contains NaN"):
        score_group(pred, np.ones((8, 4)), np.zeros((1, 64, 130), bool))


@pytest.mark.parametrize(
    "args, message",
    [
        ((row(0.5, 0.5), row(1, 0, 0, dtype=bool)), "pred has shape"),
        ((row(0.5, 0.5)[0], row(1, 0, dtype=bool)[0]), "pred must have 2 dimensions"),
        ((row(0.5, 0.5), row(1, 2)), "gt must contain only 0 and 1"),
        ((row(0.5, np.nan), row(1, 0)), "pred contains NaN"),
    ],
)
def test_soft_iou_contract(args, message):
    with pytest.raises(ValueError, match=message):
        soft_iou(*args)


def test_score_group_contract():
    with pytest.raises(ValueError, match=r"confidences must have shape \(1, 2\)"):
        score_group(P[None], C[None, :1], G)
    with pytest.raises(ValueError, match="pred_probs must have 4 dimensions"):
        score_group(P, C[None], G)


def test_mask_score_is_soft_iou_for_one_slot_and_one_object_else_the_matched_score():
    from rewards import mask_score

    gt = np.zeros((1, 4, 4))
    gt[0, :2] = 1
    pred = np.full((1, 4, 4), 0.5)
    assert mask_score(pred, np.array([0.1]), gt) == pytest.approx(soft_iou(pred[0], gt[0]))  # no gate with K = G = 1
    assert mask_score(pred, np.array([1.0]), np.zeros((0, 4, 4))) == 0.0  # a committed mask on no target
    assert mask_score(np.zeros((2, 4, 4)), np.zeros(2), np.zeros((0, 4, 4))) == 1.0
    two = np.concatenate([gt, 1 - gt])
    assert mask_score(two, np.ones(2), two) == pytest.approx(multi_object_score(two, np.ones(2), two))

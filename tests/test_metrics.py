"""SegMetrics: hand-computed goldens for every convention, merging, contract."""

import math

import numpy as np
import pytest

from rewards import SegMetrics


def mask(*rows):
    """A bool mask from strings: '#' is foreground, '.' background."""
    return np.array([[c == "#" for c in r] for r in rows])


EMPTY = mask("....", "....")


def test_single_target_sample():
    meter = SegMetrics()
    # GT 4 px, prediction 4 px, 2 shared → I = 2, U = 6.
    iou = meter.add(mask("##..", "##.."), mask(".##.", ".##."))
    assert iou == pytest.approx(1 / 3)
    s = meter.summary()
    assert set(s) == {"giou", "ciou", "n_acc", "t_acc", "count"}
    assert s["giou"] == pytest.approx(1 / 3) and s["ciou"] == pytest.approx(1 / 3)
    assert s["t_acc"] == 1.0 and s["count"] == 1
    assert math.isnan(s["n_acc"])  # no no-target sample seen


@pytest.mark.parametrize("empty_empty_iou", [1.0, 0.0])
def test_empty_prediction_on_no_target_sample(empty_empty_iou):
    meter = SegMetrics(empty_empty_iou=empty_empty_iou)
    meter.add(EMPTY, EMPTY)
    meter.add(None, EMPTY)  # declined to segment: also an empty prediction
    s = meter.summary()
    assert s["giou"] == empty_empty_iou  # LISA/GSVA 1.0, Seg-Zero 0.0
    assert s["ciou"] == empty_empty_iou  # Σ union = 0: the convention decides
    assert s["n_acc"] == 1.0 and math.isnan(s["t_acc"]) and s["count"] == 2


@pytest.mark.parametrize("empty_empty_iou, giou", [(1.0, (1 / 3 + 0 + 1) / 3), (0.0, (1 / 3) / 3)])
def test_prediction_on_no_target_sample_enlarges_union(empty_empty_iou, giou):
    meter = SegMetrics(empty_empty_iou)
    meter.add(mask("##..", "##.."), mask(".##.", ".##."))  # I 2, U 6
    meter.add(mask("#...", "#..."), EMPTY)  # false positive: I 0, U 2, IoU 0
    meter.add(None, EMPTY)  # correct rejection: U 0
    s = meter.summary()
    assert s["giou"] == pytest.approx(giou)
    assert s["ciou"] == pytest.approx(2 / 8)  # not 2/6: the false positive's area counts
    assert s["n_acc"] == pytest.approx(1 / 2)
    assert s["t_acc"] == 1.0


def test_none_prediction_on_target_sample_adds_gt_area():
    meter = SegMetrics()
    meter.add(mask("##..", "##.."), mask("##..", "##.."))  # I 4, U 4
    assert meter.add(None, mask("..##", "....")) == 0.0  # I 0, U 2
    s = meter.summary()
    assert s["giou"] == pytest.approx(0.5)
    assert s["ciou"] == pytest.approx(4 / 6)
    assert s["t_acc"] == pytest.approx(0.5)


def test_ignore_pixels_count_in_neither_intersection_nor_union():
    pred = mask("###.", "#...")
    gt = mask("##..", "##..")
    ignore = mask("..##", "..##")  # hides the prediction's pixel at (0, 2)
    meter = SegMetrics()
    # Without ignore: I 3, U 5. With it: I 3, U 4.
    assert meter.add(pred, gt, ignore=ignore) == pytest.approx(3 / 4)
    assert meter.summary()["ciou"] == pytest.approx(3 / 4)


def test_prediction_only_on_ignored_pixels_is_an_empty_prediction():
    meter = SegMetrics()
    meter.add(mask("...#", "...."), EMPTY, ignore=mask("...#", "...."))
    s = meter.summary()
    assert s["giou"] == 1.0 and s["n_acc"] == 1.0 and s["ciou"] == 1.0


def test_n_acc_and_t_acc():
    meter = SegMetrics()
    target = mask("#...", "....")
    meter.add(target, target)  # target, predicted: T hit
    meter.add(EMPTY, target)  # target, predicted empty: T miss
    meter.add(None, target)  # target, declined: T miss
    meter.add(target, target)  # T hit
    meter.add(None, EMPTY)  # no target, declined: N hit
    meter.add(target, EMPTY)  # no target, predicted: N miss
    meter.add(EMPTY, EMPTY)  # N hit
    s = meter.summary()
    assert s["t_acc"] == pytest.approx(2 / 4)
    assert s["n_acc"] == pytest.approx(2 / 3)
    assert s["count"] == 7


def test_multi_object_samples_are_compared_as_merged_masks():
    pred = np.stack([mask("#...", "...."), mask(".#..", "....")])
    gt = np.stack([mask("##..", "...."), mask("....", "...#"), mask("#...", "....")])
    meter = SegMetrics()
    # merged pred {(0,0), (0,1)}; merged GT {(0,0), (0,1), (1,3)} → 2 / 3
    assert meter.add(pred, gt) == pytest.approx(2 / 3)
    assert meter.add(None, np.zeros((0, 2, 4), bool)) == 1.0  # G = 0 is a no-target sample


def test_merging_meters_equals_one_meter_over_all_samples():
    rng = np.random.default_rng(0)
    samples = []
    for i in range(40):
        gt = rng.random((6, 7)) < (0.0 if i % 4 == 0 else 0.3)
        pred = None if i % 5 == 0 else rng.random((6, 7)) < 0.3
        ignore = rng.random((6, 7)) < 0.1 if i % 3 == 0 else None
        samples.append((pred, gt, ignore))
    for eei in (1.0, 0.0):
        whole, left, right = SegMetrics(eei), SegMetrics(eei), SegMetrics(eei)
        for i, sample in enumerate(samples):
            whole.add(*sample)
            (left if i < 17 else right).add(*sample)
        merged = left.merge(right).summary()
        expected = whole.summary()
        assert merged.keys() == expected.keys()
        assert merged["count"] == expected["count"] == 40
        for key in ("giou", "ciou", "n_acc", "t_acc"):
            assert merged[key] == pytest.approx(expected[key], rel=1e-12)
        assert left.summary()["count"] == 17  # inputs unchanged


def test_merge_contract():
    with pytest.raises(ValueError, match="different empty_empty_iou"):
        SegMetrics(1.0).merge(SegMetrics(0.0))
    with pytest.raises(ValueError, match="other must be a SegMetrics"):
        SegMetrics().merge({})


def test_empty_meter_summary():
    s = SegMetrics().summary()
    assert s["count"] == 0
    assert all(math.isnan(s[k]) for k in ("giou", "ciou", "n_acc", "t_acc"))


@pytest.mark.parametrize(
    "args, message",
    [
        ((EMPTY.astype(np.uint8), EMPTY), "pred_mask must have dtype bool"),
        ((EMPTY, EMPTY.astype(float)), "gt_mask must have dtype bool"),
        ((EMPTY, [[True]]), "gt_mask must be a numpy bool array"),
        ((EMPTY[0], EMPTY[0]), r"gt_mask must be \[H, W\] or \[N, H, W\]"),
        ((EMPTY[:, :3], EMPTY), "pred_mask has shape"),
        ((EMPTY, EMPTY, EMPTY[:1]), "ignore has shape"),
        ((EMPTY, EMPTY, EMPTY.astype(int)), "ignore must have dtype bool"),
    ],
)
def test_add_contract(args, message):
    with pytest.raises(ValueError, match=message):
        SegMetrics().add(*args)


@pytest.mark.parametrize("value", [1.5, -0.1, float("nan"), "1"])
def test_empty_empty_iou_contract(value):
    with pytest.raises(ValueError, match="empty_empty_iou"):
        SegMetrics(value)

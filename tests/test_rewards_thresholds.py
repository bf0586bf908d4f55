"""READ A.1's per-image threshold search: equal to the naive loop, and its inputs checked."""
import numpy as np
import pytest

from rewards.thresholds import best_threshold_iou, fixed_threshold_iou, threshold_grid


def naive_ious(prob, gt, thresholds):
    out = []
    for t in thresholds:
        pred = prob >= t
        union = (pred | gt).sum()
        out.append((pred & gt).sum() / union if union else 1.0)
    return np.array(out)


def test_grid_search_equals_naive_loop():
    rng = np.random.default_rng(3)
    grid = threshold_grid(0.01)
    assert len(grid) == 101 and grid[7] == 0.07 and grid[-1] == 1.0
    for prob, gt in [
        (rng.random((20, 30)), rng.random((20, 30)) > 0.6),
        (np.round(rng.random((9, 9)), 2), rng.random((9, 9)) > 0.3),  # values exactly on the grid
        (rng.random((5, 5)), np.zeros((5, 5), bool)),
    ]:
        ious = naive_ious(prob, gt, grid)
        best_t, best_iou = best_threshold_iou(prob, gt)
        assert best_iou == pytest.approx(ious.max())
        assert best_t == grid[np.argmax(ious)]
        for t in (0.0, 0.5, 0.73):
            assert fixed_threshold_iou(prob, gt, t) == pytest.approx(naive_ious(prob, gt, [t])[0])


def test_grid_search_picks_the_iou_maximising_threshold():
    prob = np.full((4, 4), 0.1)
    gt = np.zeros((4, 4), bool)
    gt[:2, :2] = True
    prob[:2, :2] = [[0.45, 0.7], [0.7, 0.7]]
    prob[3, 3] = 0.3  # a distractor below the weakest target pixel
    assert best_threshold_iou(prob, gt) == (0.31, 1.0)
    assert fixed_threshold_iou(prob, gt) == pytest.approx(0.75)
    assert best_threshold_iou(prob, gt, step=0.5) == (0.5, 0.75)


def test_threshold_inputs_are_checked():
    with pytest.raises(ValueError, match="one shape"):
        best_threshold_iou(np.zeros((2, 2)), np.zeros((2, 3), bool))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        best_threshold_iou(np.full((2, 2), 1.5), np.zeros((2, 2), bool))
    with pytest.raises(ValueError, match="ignore"):
        best_threshold_iou(np.zeros((2, 2)), np.full((2, 2), 255))
    with pytest.raises(ValueError, match="step"):
        threshold_grid(0.0)

"""Benchmark of the multi-object mask score (``rewards.masks.score_group``).

Groups of 8 responses, K = 4 slots, G in {0..4} GT masks, 256×256 float32 masks. Prints, from
one run: groups/s of ``score_group``; its speed-up over a naive scorer that loops over slot/GT
pairs and pixels in pure Python (target >= 20x), and, for context, over a per-pair loop of
numpy reductions; and its time over the time of reading the same arrays once with
``arr.sum()`` (the memory bound; target <= 2x). Run: ``python bench/rewards.py``.
"""

from __future__ import annotations

import os
import platform
import sys
import time
from pathlib import Path

# One BLAS thread: a reward worker gets one core (Ray sets OMP_NUM_THREADS to the actor's
# num_cpus, which OpenBLAS honours), and the read-once floor below is single-threaded too.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import scipy  # noqa: E402
from scipy.optimize import linear_sum_assignment  # noqa: E402

# Run as a script, sys.path[0] is bench/, where this file would shadow the rewards package.
_ROOT = Path(__file__).resolve().parent.parent
if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path[0] = str(_ROOT)
else:
    sys.path.insert(0, str(_ROOT))

from rewards import score_group  # noqa: E402

RESPONSES, SLOTS, SIZE = 8, 4, 256
GT_COUNTS = (0, 1, 2, 3, 4)
N_GROUPS = 30  # ~280 MB of masks, so the timed passes stream from DRAM, not cache
REPEATS = 7
THRESHOLD = 0.5


def make_group(rng: np.random.Generator, n_gt: int):
    """One group: slot probabilities, confidences and n_gt rectangular float32 GT masks."""
    probs = rng.random((RESPONSES, SLOTS, SIZE, SIZE), dtype=np.float32)
    conf = rng.random((RESPONSES, SLOTS), dtype=np.float32)
    gt = np.zeros((n_gt, SIZE, SIZE), np.float32)
    for mask in gt:
        y, x = rng.integers(0, SIZE // 2, size=2)
        h, w = rng.integers(8, SIZE // 2, size=2)
        mask[y : y + h, x : x + w] = 1.0
    return probs, conf, gt


def _hungarian_mean(iou: list[list[float]], n_pred: int, n_gt: int) -> float:
    if n_pred == 0 and n_gt == 0:
        return 1.0
    if n_pred == 0 or n_gt == 0:
        return 0.0
    rows, cols = linear_sum_assignment(np.array(iou), maximize=True)
    return sum(iou[r][c] for r, c in zip(rows, cols)) / len(rows)


def python_pair_iou(slot: np.ndarray, target: np.ndarray) -> float:
    """Soft IoU of one pair, walking its pixels in pure Python."""
    inter = pred_sum = gt_sum = 0.0
    for p, g in zip(slot.ravel().tolist(), target.ravel().tolist()):
        inter += p * g
        pred_sum += p
        gt_sum += g
    union = pred_sum + gt_sum - inter
    return inter / union if union > 0 else 1.0


def numpy_pair_iou(slot: np.ndarray, target: np.ndarray) -> float:
    """Soft IoU of one pair with numpy reductions: the obvious non-batched implementation."""
    inter = float((slot * target).sum())
    union = float(slot.sum()) + float(target.sum()) - inter
    return inter / union if union > 0 else 1.0


def pair_loop_group(pair_iou, probs, conf, gt) -> list[float]:
    """Naive group scorer: a Python loop over responses, kept slots and GT masks."""
    scores = []
    for r in range(RESPONSES):
        kept = [probs[r, k] for k in range(SLOTS) if conf[r, k] >= THRESHOLD]
        iou = [[pair_iou(slot, target) for target in gt] for slot in kept]
        scores.append(_hungarian_mean(iou, len(kept), len(gt)))
    return scores


def naive_python_group(probs, conf, gt) -> list[float]:
    return pair_loop_group(python_pair_iou, probs, conf, gt)


def numpy_pair_loop_group(probs, conf, gt) -> list[float]:
    return pair_loop_group(numpy_pair_iou, probs, conf, gt)


def seconds_per_group(fns: dict, groups, repeats: int = REPEATS) -> dict[str, float]:
    """Best-of-``repeats`` wall time per group of each scorer over all groups.

    Repeats interleave the scorers, so a noisy neighbour slows them alike.
    """
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            for group in groups:
                fn(*group)
            best[name] = min(best[name], time.perf_counter() - start)
    return {name: seconds / len(groups) for name, seconds in best.items()}


def read_once(probs, conf, gt) -> None:
    """One pass over the same mask arrays: the memory-bound floor of any scorer."""
    probs.sum()
    gt.sum()


def main() -> None:
    rng = np.random.default_rng(0)
    groups = [make_group(rng, GT_COUNTS[i % len(GT_COUNTS)]) for i in range(N_GROUPS)]
    one_per_g = groups[: len(GT_COUNTS)]

    for group in one_per_g:  # the scorers must agree before their speeds mean anything
        np.testing.assert_allclose(score_group(*group), naive_python_group(*group), atol=1e-5)
        np.testing.assert_allclose(score_group(*group), numpy_pair_loop_group(*group), atol=1e-5)

    full = seconds_per_group({"vectorised": score_group, "read": read_once}, groups)
    small = seconds_per_group(
        {"vectorised": score_group, "numpy_loop": numpy_pair_loop_group}, one_per_g
    )
    naive = seconds_per_group({"naive": naive_python_group}, one_per_g, repeats=1)["naive"]
    vectorised, memory = full["vectorised"], full["read"]
    vectorised_small, numpy_loop = small["vectorised"], small["numpy_loop"]

    mb = sum(p.nbytes + g.nbytes for p, _, g in groups) / len(groups) / 2**20
    print(f"machine: {platform.platform()}, {platform.processor() or platform.machine()}, "
          f"cpu_count={os.cpu_count()}, python {platform.python_version()}, "
          f"numpy {np.__version__}, scipy {scipy.__version__}, "
          f"OPENBLAS_NUM_THREADS={os.environ['OPENBLAS_NUM_THREADS']}")
    print(f"workload: {N_GROUPS} groups x {RESPONSES} responses x K={SLOTS} slots, "
          f"G in {GT_COUNTS}, {SIZE}x{SIZE} float32, {mb:.1f} MiB per group")
    print(f"vectorised score_group: {1 / vectorised:.1f} groups/s "
          f"({vectorised * 1e3:.2f} ms/group)")
    print(f"speed-up vs naive pure-Python per-pair loop: {naive / vectorised_small:.0f}x "
          f"(naive {naive * 1e3:.0f} ms/group; target >= 20x)")
    print(f"speed-up vs per-pair numpy loop (context): {numpy_loop / vectorised_small:.1f}x "
          f"({numpy_loop * 1e3:.2f} ms/group)")
    print(f"time / read-once time (memory bound): {vectorised / memory:.2f}x "
          f"(read once {memory * 1e3:.2f} ms/group; target <= 2x)")


if __name__ == "__main__":
    main()

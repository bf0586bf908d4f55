"""The statistics behind the plots and analyses: EMA smoothing, OLS with a mean confidence band, Pearson r,
and the paired change between two evaluations of the same samples.

SegCompass C.1 (Figure 8) overlays an ordinary-least-squares line and a confidence band of
the mean on each scatter, and reads the association from Pearson's r and its p-value.
Pure numpy + scipy, so `segrl plot` and `segrl analyze` share one tested core.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats


def ema(values, weight: float) -> np.ndarray:
    """Exponential moving average: s_0 = x_0, s_t = weight·s_{t-1} + (1 − weight)·x_t.

    ``weight`` in [0, 1): 0 returns the values, closer to 1 smooths more. Starting at the first
    value (not at 0) keeps the curve from rising out of zero at the start of a run.
    """
    if not 0.0 <= weight < 1.0:
        raise ValueError(f"EMA weight must be in [0, 1), got {weight}")
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1:
        raise ValueError(f"values must be 1-D, got shape {x.shape}")
    out = np.empty_like(x)
    for i, value in enumerate(x):
        out[i] = value if i == 0 else weight * out[i - 1] + (1.0 - weight) * value
    return out


@dataclass(frozen=True)
class OlsFit:
    """y ≈ slope·x + intercept with Pearson's r and its two-sided p, and the mean's confidence band.

    ``band_x`` is a grid over [min x, max x]; ``band_lo``/``band_hi`` bound E[y | x] there at
    ``level`` (Student t with n − 2 degrees of freedom).
    """

    slope: float
    intercept: float
    r: float
    p: float
    n: int
    level: float
    band_x: list[float]
    band_lo: list[float]
    band_hi: list[float]

    def to_json(self) -> dict:
        return asdict(self)


def ols_fit(x, y, level: float = 0.95, grid_points: int = 50) -> OlsFit:
    """OLS of y on x, Pearson's (r, p) and the ``level`` confidence band of the fitted mean.

    Band half-width at x₀: t_{n−2, (1+level)/2} · s · √(1/n + (x₀ − x̄)²/Sxx), s² = SSE/(n − 2).
    Needs at least 3 points and x that is not constant.
    """
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.ndim != 1 or x.shape != y.shape:
        raise ValueError(f"x and y must be 1-D of one length, got {x.shape} and {y.shape}")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError("x and y must be finite")
    n = x.size
    if n < 3:
        raise ValueError(f"an OLS fit with a confidence band needs at least 3 points, got {n}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    x_mean = x.mean()
    sxx = float(((x - x_mean) ** 2).sum())
    if sxx == 0.0:
        raise ValueError("x is constant: no line can be fitted")
    slope = float(((x - x_mean) * (y - y.mean())).sum() / sxx)
    intercept = float(y.mean() - slope * x_mean)
    residual = y - (slope * x + intercept)
    s = float(np.sqrt((residual ** 2).sum() / (n - 2)))
    if np.ptp(y) == 0.0:  # Pearson's r is undefined for a constant y
        r, p = float("nan"), float("nan")
    else:
        result = stats.pearsonr(x, y)
        r, p = float(result.statistic), float(result.pvalue)
    grid = np.linspace(x.min(), x.max(), grid_points)
    half = stats.t.ppf((1.0 + level) / 2.0, n - 2) * s * np.sqrt(1.0 / n + (grid - x_mean) ** 2 / sxx)
    fitted = slope * grid + intercept
    return OlsFit(slope, intercept, r, p, int(n), float(level), grid.tolist(), (fitted - half).tolist(),
                  (fitted + half).tolist())


@dataclass(frozen=True)
class PairedChange:
    """Mean per-sample change (after − before) over ``n`` shared samples, with its standard error."""

    change: float
    se: float
    n: int

    def to_json(self) -> dict:
        return asdict(self)


def paired_change(before: Mapping[str, float], after: Mapping[str, float]) -> PairedChange:
    """The mean of after[k] − before[k] over the keys both hold, and its standard error sd(d)/√n.

    Two checkpoints scored on the same samples differ far less from sample to sample than two
    independent sets would: pairing removes the spread of sample difficulty, so a change of a
    point or two can be told from noise (or not) on a few hundred samples. The error is NaN
    for a single shared sample; no shared sample is an error.
    """
    keys = [k for k in before if k in after]
    if not keys:
        raise ValueError("the two evaluations share no sample: nothing to compare")
    d = np.array([float(after[k]) - float(before[k]) for k in keys], dtype=np.float64)
    if not np.isfinite(d).all():
        raise ValueError("per-sample scores must be finite")
    se = float(d.std(ddof=1) / np.sqrt(d.size)) if d.size > 1 else float("nan")
    return PairedChange(float(d.mean()), se, int(d.size))

"""Contract checks shared by the reward and metric functions.

Rewards are the training signal: a NaN probability or a transposed mask that slipped through
would silently train the policy on garbage. Every public entry point therefore checks its
inputs and raises ``ValueError`` naming the argument and what was wrong.
"""

from __future__ import annotations

import math
import numbers

import numpy as np

# Bit pattern of 1.0 per float dtype. For non-negative IEEE floats the unsigned bit order is
# the value order, while a set sign bit, +inf and NaN all compare above the bits of 1.0.
_ONE_BITS = {
    np.dtype(np.float32): (np.uint32, 0x3F800000),
    np.dtype(np.float64): (np.uint64, 0x3FF0000000000000),
}


def as_array(name: str, value, ndim: int | None = None) -> np.ndarray:
    """``value`` as a bool/int/float ndarray with ``ndim`` dimensions, or ValueError."""
    try:
        arr = np.asarray(value)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{name} is not array-like: {exc}") from None
    if arr.dtype.kind not in "biuf":
        raise ValueError(f"{name} must hold bools or real numbers, got dtype {arr.dtype}")
    if ndim is not None and arr.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {arr.shape}")
    return arr


def unit_interval_ok(arr: np.ndarray) -> bool:
    """Fast sufficient test that a float32/float64 array lies in [0, 1] and has no NaN.

    One integer max over the bit patterns instead of a NaN pass plus a min and a max pass,
    so the scorer can afford to check every input. It can give a false alarm only for
    -0.0; callers confirm a failure with ``require_unit_interval``.
    """
    if arr.size == 0:
        return True
    uint, one = _ONE_BITS[arr.dtype]
    bits = arr.view(uint)
    # A contiguous array reduces fastest flat; a strided one along its contiguous axis.
    top = bits.max() if bits.flags.c_contiguous else bits.max(axis=-1).max()
    return int(top) <= one


def require_unit_interval(name: str, arr: np.ndarray) -> None:
    """Raise unless every value of ``arr`` is in [0, 1] (NaN rejected)."""
    if arr.dtype.kind == "b" or arr.size == 0:
        return
    if arr.dtype.kind == "f" and np.isnan(arr).any():
        raise ValueError(f"{name} contains NaN")
    lo, hi = arr.min(), arr.max()
    if lo < 0 or hi > 1:
        raise ValueError(f"{name} must lie in [0, 1], found values in [{lo}, {hi}]")


def require_binary(name: str, arr: np.ndarray) -> None:
    """Raise unless every value of ``arr`` is 0 or 1 (bool arrays pass for free)."""
    if arr.dtype.kind == "b":
        return
    bad = (arr != 0) & (arr != 1)
    if bad.any():
        raise ValueError(f"{name} must contain only 0 and 1, found {arr[bad].flat[0]!r}")


def require_same_spatial(name: str, arr: np.ndarray, ref_name: str, ref: np.ndarray) -> None:
    """Raise unless the trailing (H, W) of ``arr`` equals that of ``ref``."""
    if arr.shape[-2:] != ref.shape[-2:]:
        raise ValueError(
            f"{name} has spatial shape {arr.shape[-2:]}, "
            f"but {ref_name} has {ref.shape[-2:]}"
        )


def real_scalar(name: str, value, lo: float | None = None, hi: float | None = None) -> float:
    """A finite float from a scalar argument, optionally within [lo, hi].

    Bools are rejected: ``threshold=True`` is a bug, not a number.
    """
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a real number, got {type(value).__name__}")
    out = float(value)
    if not math.isfinite(out):
        raise ValueError(f"{name} must be finite, got {out}")
    if lo is not None and out < lo:
        raise ValueError(f"{name} must be >= {lo}, got {out}")
    if hi is not None and out > hi:
        raise ValueError(f"{name} must be <= {hi}, got {out}")
    return out


def positive_int(name: str, value) -> int:
    """An int >= 1 from an argument (bools and floats rejected)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return int(value)


def reward_weights(weights) -> tuple[float, float]:
    """``(format_weight, mask_weight)`` as two finite floats >= 0."""
    try:
        w_format, w_mask = weights
    except (TypeError, ValueError):
        raise ValueError(f"weights must be a pair (format, mask), got {weights!r}") from None
    return (
        real_scalar("weights[0]", w_format, lo=0.0),
        real_scalar("weights[1]", w_mask, lo=0.0),
    )

"""READ (Reasoning to Attend, CVPR 2025): <SEG> similarity map → points → SAM.

Pipeline: the last-layer hidden state of the reference token is dotted with
the image-token hidden states (a similarity map on the image-token grid),
the map is turned into labelled SAM point prompts (Similarity as Points),
each labelled point is nudged to a sub-pixel position on the upsampled map
(Discrete-to-Continuous), and the points plus the projected reference
embedding prompt SAM's mask decoder. No reference token → no mask.

Everything that picks points runs in numpy on a detached map: point
selection (sorting) has no gradient in READ either. Gradients reach the
reference embedding and the mask decoder through the SAM prompt path.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

# exp(-d²/(2σ²)) with σ = 1/√2 is exp(-d²): the weight READ's released DtoC uses.
DEFAULT_SIGMA = 1.0 / math.sqrt(2.0)
POSITIVE, NEGATIVE, NEUTRAL = 1, 0, -1  # SAM point labels; -1 = "not a point"


@dataclass(frozen=True)
class ReadParams:
    """SasP/DtoC settings; defaults are READ-7B's (Table 8's best 30-point row).

    `downsample` > 1 reproduces the released code's bilinear downsampling of
    the map before point selection (2 for READ-7B); the paper does not
    describe it, so the default is 1 (off).
    """

    num_points: int = 30
    t_pos: float = 0.8
    t_neg: float = 0.2
    sigma: float = DEFAULT_SIGMA
    refine: bool = True
    downsample: int = 1

    def __post_init__(self) -> None:
        _check_selection_args(self.num_points, self.t_pos, self.t_neg)
        _check_positive("sigma", self.sigma)
        if isinstance(self.downsample, bool) or not isinstance(self.downsample, int) or self.downsample < 1:
            raise ValueError(f"downsample must be an integer >= 1, got {self.downsample!r}")


@dataclass
class ReadPrompts:
    sim: torch.Tensor  # [h, w] in [0, 1], differentiable
    coords: np.ndarray  # [P, 2] (x, y) pixels of SAM's input frame, inside the image
    labels: np.ndarray  # [P] in {1, 0, -1}


@dataclass(frozen=True)
class MapPlacement:
    """Where the similarity map lies in SAM's input frame.

    SAM resizes an image's longest side to its frame and pads bottom-right, so the image
    is [0, w) x [0, h) of the frame, (h, w) its ``sam_input_size``. A tower that padded
    the image to a centred square (``TokenGrid.padded_square``) saw a square of side
    max(h, w) centred on it: the map spans that square, shifted by half the padding;
    otherwise the map spans exactly the image. Points are found on the map's own extent
    (``size``), then shifted by ``offset`` and clamped into the image: a point on the
    padding lands on the image's edge.
    """

    size: tuple[int, int]  # (H, W) pixels the map spans
    offset: tuple[float, float]  # (x, y) of the map's top-left corner in the frame
    image: tuple[int, int]  # (h, w): the image's extent in the frame

    @classmethod
    def of(cls, input_size: tuple[int, int], padded_square: bool) -> MapPlacement:
        h, w = _check_image_size(input_size, "input_size")
        if not padded_square:
            return cls((h, w), (0.0, 0.0), (h, w))
        side = max(h, w)
        return cls((side, side), ((w - side) / 2, (h - side) / 2), (h, w))

    def to_image(self, coords: np.ndarray) -> np.ndarray:
        """(x, y) on the map's extent -> (x, y) in the frame, inside the image."""
        h, w = self.image
        shifted = np.asarray(coords, dtype=np.float64) + np.asarray(self.offset)
        return np.stack([np.clip(shifted[:, 0], 0, w - 1), np.clip(shifted[:, 1], 0, h - 1)], axis=-1)


# ----------------------------------------------------------------- validation


def _check_positive(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")


def _check_selection_args(num_points: int, t_pos: float, t_neg: float) -> None:
    if isinstance(num_points, bool) or not isinstance(num_points, (int, np.integer)) or num_points < 1:
        raise ValueError(f"num_points must be an integer >= 1, got {num_points!r}")
    if not (math.isfinite(t_pos) and math.isfinite(t_neg)):
        raise ValueError(f"t_pos and t_neg must be finite, got t_pos={t_pos!r}, t_neg={t_neg!r}")
    if t_neg > t_pos:
        raise ValueError(f"t_neg ({t_neg}) must not exceed t_pos ({t_pos})")


def _check_image_size(image_size, name: str = "image_size") -> tuple[int, int]:
    try:
        height, width = (int(v) for v in image_size)
        exact = all(int(v) == v for v in image_size)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be (H, W) positive integers, got {image_size!r}") from None
    if not exact or height < 1 or width < 1:
        raise ValueError(f"{name} must be (H, W) positive integers, got {image_size!r}")
    return height, width


def _check_sim(sim) -> np.ndarray:
    """Floating input keeps its dtype so thresholds compare as numpy would (0.2 vs a float32 0.2)."""
    sim = np.asarray(sim)
    if not np.issubdtype(sim.dtype, np.floating):
        sim = sim.astype(np.float64)
    if sim.ndim != 2 or sim.size == 0:
        raise ValueError(f"sim must be a non-empty 2-D array [h, w], got shape {sim.shape}")
    if not np.isfinite(sim).all():
        raise ValueError("sim contains NaN or inf")
    return sim


# ------------------------------------------------------------ similarity map


def _min_max(x: torch.Tensor) -> torch.Tensor:
    """Min-max to [0, 1]; a constant input gives zeros (the clamp avoids 0/0)."""
    low, high = x.min(), x.max()
    return (x - low) / (high - low).clamp_min(torch.finfo(x.dtype).tiny)


def similarity_map(seg_hidden: torch.Tensor, image_hidden: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Dot product of the reference state with each image token, min-max normalised, as [h, w].

    With one text feature CLIP-Surgery's softmax weight is 1, so READ's
    similarity is the plain dot product. Computed in float32 so bf16 hidden
    states of width ~4k do not lose the ranking to rounding (float64 stays).
    """
    h, w = _check_image_size(grid, "grid")
    if seg_hidden.dim() != 1 or image_hidden.dim() != 2 or image_hidden.shape[1] != seg_hidden.shape[0]:
        raise ValueError(
            f"expected seg_hidden [D] and image_hidden [N, D], "
            f"got {tuple(seg_hidden.shape)} and {tuple(image_hidden.shape)}"
        )
    if image_hidden.shape[0] != h * w:
        raise ValueError(f"grid {h}x{w} needs {h * w} image tokens, got {image_hidden.shape[0]}")
    dtype = torch.promote_types(image_hidden.dtype, torch.float32)
    scores = image_hidden.to(dtype) @ seg_hidden.to(dtype)
    return _min_max(scores).reshape(h, w)


def _downsample(sim: np.ndarray, factor: int) -> np.ndarray:
    """Released-code option: bilinear downsampling then min-max again."""
    if factor == 1:
        return sim
    h, w = sim.shape
    size = (max(1, h // factor), max(1, w // factor))
    small = F.interpolate(torch.from_numpy(sim)[None, None], size=size, mode="bilinear", align_corners=False)
    return _min_max(small[0, 0]).numpy()


# ------------------------------------------------------ similarity as points


def select_cells(sim: np.ndarray, num_points: int, t_pos: float, t_neg: float) -> tuple[np.ndarray, np.ndarray]:
    """Flat cell indices and labels of the chosen points, in prompt order.

    Positives (sim ≥ t_pos) by descending sim, then negatives (sim ≤ t_neg,
    and not positive when t_neg == t_pos) by ascending sim, then neutrals in
    cell order; the first `num_points`. Ties keep row-major cell order
    (stable sorts), so the result is deterministic.
    """
    sim = _check_sim(sim)
    _check_selection_args(num_points, t_pos, t_neg)
    flat = sim.ravel()
    cells = np.arange(flat.size)
    is_pos = flat >= t_pos
    is_neg = (flat <= t_neg) & ~is_pos
    pos = cells[is_pos][np.argsort(-flat[is_pos], kind="stable")]
    neg = cells[is_neg][np.argsort(flat[is_neg], kind="stable")]
    neu = cells[~is_pos & ~is_neg]
    order = np.concatenate([pos, neg, neu])[:num_points]
    labels = np.repeat(np.array([POSITIVE, NEGATIVE, NEUTRAL], dtype=np.int64), [len(pos), len(neg), len(neu)])
    return order, labels[:num_points]


def cell_centres(cells: np.ndarray, grid: tuple[int, int], image_size: tuple[int, int]) -> np.ndarray:
    """(x, y) pixel coordinates of cell centres, clamped to [0, W-1] × [0, H-1]."""
    h, w = grid
    height, width = image_size
    x = (cells % w + 0.5) * (width / w)
    y = (cells // w + 0.5) * (height / h)
    return np.stack([np.clip(x, 0, width - 1), np.clip(y, 0, height - 1)], axis=-1)


def similarity_to_points(
    sim: np.ndarray, num_points: int, t_pos: float, t_neg: float, image_size: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """READ's Similarity as Points: coords [P, 2] (x, y) pixels and labels [P], P = min(num_points, h·w).

    Order, labels and tie-breaking as `select_cells`; coordinates as `cell_centres`.
    """
    image_size = _check_image_size(image_size)
    sim = _check_sim(sim)
    cells, labels = select_cells(sim, num_points, t_pos, t_neg)
    return cell_centres(cells, sim.shape, image_size), labels


# ------------------------------------------------ discrete-to-continuous (DtoC)


def upsample_map(sim: np.ndarray, image_size: tuple[int, int]) -> np.ndarray:
    """Bilinear to (H, W), half-pixel aligned, so pixel k samples the map at k + 0.5 like cell centres."""
    full = F.interpolate(torch.from_numpy(sim)[None, None], size=image_size, mode="bilinear", align_corners=False)
    return full[0, 0].numpy()


def _gaussian_rows(axis: np.ndarray, centres: np.ndarray, sigma: float) -> np.ndarray:
    """exp(-(axis - c)²/(2σ²)) per centre, rescaled so each row peaks at 1.

    The per-row scale cancels in the weighted mean and keeps a tiny σ from
    underflowing every weight to zero.
    """
    d2 = (axis[None, :] - centres[:, None]) ** 2
    return np.exp(-(d2 - d2.min(axis=1, keepdims=True)) / (2.0 * sigma**2))


def refine_points(
    coords: np.ndarray,
    labels: np.ndarray,
    sim: np.ndarray,
    image_size: tuple[int, int],
    sigma: float = DEFAULT_SIGMA,
) -> np.ndarray:
    """Move each labelled point to the weighted mean pixel of the upsampled map.

    Weight of pixel g for point p: exp(-‖g-p‖²/(2σ²)) · softmax(sim_fullres)[g].
    The Gaussian is separable, so all points cost two matrix products over the
    image instead of one full-image pass each. Neutral points carry no
    location in SAM and are returned unchanged.
    """
    height, width = _check_image_size(image_size)
    sim = _check_sim(sim)
    _check_positive("sigma", sigma)
    coords = np.array(coords, dtype=np.float64)
    labels = np.asarray(labels)
    if coords.ndim != 2 or coords.shape[1] != 2 or labels.shape != coords.shape[:1]:
        raise ValueError(f"expected coords [P, 2] and labels [P], got {coords.shape} and {labels.shape}")
    moving = labels != NEUTRAL
    if not moving.any():
        return coords
    full = upsample_map(sim.astype(np.float64), (height, width))
    weight = np.exp(full - full.max())  # softmax numerator; its normaliser cancels
    xs, ys = np.arange(width, dtype=np.float64), np.arange(height, dtype=np.float64)
    gx = _gaussian_rows(xs, coords[moving, 0], sigma)  # [M, W]
    gy = _gaussian_rows(ys, coords[moving, 1], sigma)  # [M, H]
    row_mass = weight @ gx.T  # [H, M]: Σ_x s[y, x]·gx[m, x]
    total = np.einsum("mh,hm->m", gy, row_mass)
    x_new = np.einsum("mh,hm->m", gy, weight @ (gx * xs).T) / total
    y_new = np.einsum("mh,hm->m", gy * ys, row_mass) / total
    coords[moving] = np.stack([np.clip(x_new, 0, width - 1), np.clip(y_new, 0, height - 1)], axis=-1)
    return coords


def read_prompts(
    seg_hidden: torch.Tensor,
    image_hidden: torch.Tensor,
    grid: tuple[int, int],
    placement: MapPlacement,
    params: ReadParams = ReadParams(),
) -> ReadPrompts:
    """Similarity map → SasP points → DtoC (on the full-resolution, un-downsampled map), on the
    map's extent, then placed in SAM's frame (``MapPlacement``)."""
    sim = similarity_map(seg_hidden, image_hidden, grid)
    sim_np = sim.detach().cpu().numpy()
    coords, labels = similarity_to_points(
        _downsample(sim_np, params.downsample), params.num_points, params.t_pos, params.t_neg, placement.size
    )
    if params.refine:
        coords = refine_points(coords, labels, sim_np, placement.size, params.sigma)
    return ReadPrompts(sim=sim, coords=placement.to_image(coords), labels=labels)

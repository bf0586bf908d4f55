"""Where an LM's image tokens lie on its image: the token grid and the tower's layout.

The tiny tower and LLaVA-1.5's CLIP pad an image to a centred square before they resize
it, so their square grid of tokens spans that square, padding included. Qwen2.5-VL
resizes the whole image (its aspect ratio kept) and its patch merger turns the cached
[t, h, w, D] patch grid into (h/m) x (w/m) tokens, row-major: a grid that spans exactly
the image and need not be square. READ places SAM points by this (``models.read``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TokenGrid:
    rows: int
    cols: int
    padded_square: bool  # the grid spans the image padded to a centred square (else exactly the image)


def token_grid(vision_features: torch.Tensor, spatial_merge_size: int = 1) -> TokenGrid | None:
    """The grid of one image's features: [t, h, w, D] patches (Qwen2.5-VL, merged m x m) or [N, D]
    tokens of a square-padding tower; None where [N, D] is not a square grid."""
    if vision_features.dim() == 4:
        _, h, w, _ = vision_features.shape
        return TokenGrid(h // spatial_merge_size, w // spatial_merge_size, padded_square=False)
    side = math.isqrt(vision_features.shape[0])
    return TokenGrid(side, side, padded_square=True) if side > 0 and side * side == vision_features.shape[0] else None

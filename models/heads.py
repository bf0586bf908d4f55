"""The segmentation heads, by name (``model.head.kind``): SegCompass's slot head and READ's points head.

A builder takes SAM (whose prompt encoder and mask decoder the head owns), the LM's
hidden size, the head's settings and the frozen SAE's folder (SegCompass only).
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from torch import nn

from models.read_head import ReadHead
from models.sae_io import load_sae
from models.seghead import SegCompassHead
from models.segmenter import HeadSpec
from rewards.registry import Registry

HeadBuilder = Callable[[nn.Module, int, HeadSpec, Path], nn.Module]
HEADS: Registry[HeadBuilder] = Registry("segmentation head")


@HEADS.register("segcompass")
def segcompass_head(sam: nn.Module, lm_dim: int, spec: HeadSpec, sae_dir: Path) -> nn.Module:
    if not (sae_dir / "config.json").is_file():
        raise FileNotFoundError(f"{sae_dir}: no trained SAE; run `segrl sae-train` first")
    return SegCompassHead(load_sae(sae_dir), sam, lm_dim, spec.num_slots, spec.codebook_dim,
                          spec.act_threshold, spec.top_k)


@HEADS.register("read")
def read_head(sam: nn.Module, lm_dim: int, spec: HeadSpec, sae_dir: Path) -> nn.Module:
    return ReadHead(sam, lm_dim)

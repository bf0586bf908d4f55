"""Shapes of the tiny models: the one place their defaults are set.

Free of torch, so the config schema (``model.tiny``) takes its defaults from here
without importing the models. Each spec is saved as config.json beside its weights.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TinyLMSpec:
    """Qwen2-style causal LM."""

    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 2
    num_kv_heads: int = 1
    intermediate_size: int = 256
    vocab_size: int = 1024
    max_position_embeddings: int = 1024


@dataclass(frozen=True)
class TinyVisionSpec:
    """ViT producing patch features (the CLIP stand-in)."""

    image_size: int = 64
    patch_size: int = 8
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 2

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size


@dataclass(frozen=True)
class TinySamSpec:
    """SAM built from segment_anything.modeling classes."""

    image_size: int = 64
    patch_size: int = 8
    encoder_dim: int = 32
    encoder_depth: int = 2
    encoder_heads: int = 2
    prompt_dim: int = 32
    decoder_mlp_dim: int = 64
    decoder_heads: int = 2
    mask_in_chans: int = 16  # the mask-prompt path normalises mask_in_chans // 4 channels: 1 would be a constant


@dataclass(frozen=True)
class TinyVisionPretrainSpec:
    """Per-patch attribute pretraining of the vision tower (models/vision_pretrain.py)."""

    steps: int = 2000
    batch_size: int = 32
    lr: float = 4e-3  # at 2e-3 and 1,200 steps shape kind was read at 0.60 per object patch; here at 0.82
    eval_scenes: int = 200


@dataclass(frozen=True)
class TinySamPretrainSpec:
    """Promptable-segmentation pretraining of the tiny SAM (models/sam_pretrain.py)."""

    steps: int = 1000
    batch_images: int = 8  # scenes per step; every object in them is a prompt
    lr: float = 5e-3
    weight_decay: float = 0.1
    warmup_steps: int = 30
    grad_clip: float = 1.0
    refine_fraction: float = 0.25  # objects decoded again with their first prediction as mask prompt
    mask_prompt_fraction: float = 0.25  # objects decoded from a coarse noisy GT mask prompt alone
    seed_offset: int = 1  # scene streams are drawn from (seed, seed_offset)
    eval_scenes: int = 200  # held-out scenes (their own stream) for the recorded IoUs


@dataclass(frozen=True)
class TinyLMAlignSpec:
    """Image-text alignment of projector and LM on scene descriptions (models/lm_pretrain.py)."""

    steps: int = 600
    batch_size: int = 32
    lr: float = 1e-3
    eval_scenes: int = 100


@dataclass(frozen=True)
class TinySpec:
    seed: int = 0
    ref_token: str = "<SEG>"
    lm: TinyLMSpec = TinyLMSpec()
    vision: TinyVisionSpec = TinyVisionSpec()
    sam: TinySamSpec = TinySamSpec()
    vision_pretrain: TinyVisionPretrainSpec = TinyVisionPretrainSpec()
    lm_align: TinyLMAlignSpec = TinyLMAlignSpec()
    sam_pretrain: TinySamPretrainSpec = TinySamPretrainSpec()

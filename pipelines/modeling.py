"""Build the trainable model named by a config: policy, SAM and the segmentation head of `model.head.kind`."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from torch import nn

from models.encoders import sam_checkpoint
from models.policy import load_policy
from models.read_head import ReadHead
from models.sae_io import load_sae
from models.sam import load_sam
from models.seghead import SegCompassHead
from models.segmenter import HeadSpec, Segmenter, load_head_weights
from pipelines.config import Config

HeadBuilder = Callable[[Config, nn.Module, int], nn.Module]
"""(config, SAM, LM hidden size) -> head; the head takes SAM's prompt encoder and mask decoder."""


def head_spec(config: Config) -> HeadSpec:
    h = config.model.head
    return HeadSpec(config.model.num_slots, h.codebook_dim, h.act_threshold, h.top_k_features)


def _segcompass_head(config: Config, sam: nn.Module, lm_dim: int) -> nn.Module:
    sae_dir = Path(config.resolve_path(config.model.sae.path))
    if not (sae_dir / "config.json").is_file():
        raise FileNotFoundError(f"{sae_dir}: no trained SAE; run `segrl sae-train` first")
    spec = head_spec(config)
    return SegCompassHead(load_sae(sae_dir), sam, lm_dim, spec.num_slots, spec.codebook_dim,
                          spec.act_threshold, spec.top_k)


def _read_head(config: Config, sam: nn.Module, lm_dim: int) -> nn.Module:
    return ReadHead(sam, lm_dim)


HEADS: dict[str, HeadBuilder] = {"segcompass": _segcompass_head, "read": _read_head}


def head_builder(kind: str) -> HeadBuilder:
    if kind not in HEADS:
        raise ValueError(f"unknown segmentation head '{kind}'; known: {', '.join(sorted(HEADS))}")
    return HEADS[kind]


def build_segmenter(config: Config, model_path: str | None = None):
    """(Segmenter, tokenizer, SAM input size) from `model_path` (default: model.name_or_path)."""
    path = model_path or config.resolve_path(config.model.name_or_path)
    m = config.model
    policy, tokenizer = load_policy(m.family, path, m.ref_token, m.sae.layer, m.head.ref_position)
    sam = load_sam(m.sam.variant, sam_checkpoint(m.sam.variant, m.sam.checkpoint, path))
    head = head_builder(m.head.kind)(config, sam, policy.lm.config.hidden_size)
    load_head_weights(head, path)
    return Segmenter(policy, head), tokenizer, sam.image_encoder.img_size

"""Build the trainable model named by a config: policy, SAM, frozen SAE and SegCompass head."""
from __future__ import annotations

from pathlib import Path

from models.encoders import sam_checkpoint
from models.policy import load_policy
from models.sae_io import load_sae
from models.sam import load_sam
from models.seghead import SegCompassHead
from models.segmenter import HeadSpec, Segmenter, load_head_weights
from pipelines.config import Config


def head_spec(config: Config) -> HeadSpec:
    h = config.model.head
    return HeadSpec(config.model.num_slots, h.codebook_dim, h.act_threshold, h.top_k_features)


def build_segmenter(config: Config, model_path: str | None = None):
    """(Segmenter, tokenizer, SAM input size) from `model_path` (default: model.name_or_path)."""
    path = model_path or config.resolve_path(config.model.name_or_path)
    m = config.model
    policy, tokenizer = load_policy(m.family, path, m.ref_token, m.sae.layer, m.head.ref_position)
    sam = load_sam(m.sam.variant, sam_checkpoint(m.sam.variant, m.sam.checkpoint, path))
    sae_dir = Path(config.resolve_path(m.sae.path))
    if not (sae_dir / "config.json").is_file():
        raise FileNotFoundError(f"{sae_dir}: no trained SAE; run `segrl sae-train` first")
    spec = head_spec(config)
    head = SegCompassHead(load_sae(sae_dir), sam, policy.lm.config.hidden_size, spec.num_slots,
                          spec.codebook_dim, spec.act_threshold, spec.top_k)
    load_head_weights(head, path)
    return Segmenter(policy, head), tokenizer, sam.image_encoder.img_size

"""Tiny pretrained models, built offline and saved in the real formats.

`make_tiny` writes one folder that the rest of segrl loads exactly like a real
checkpoint folder:

    <out>/config.json, model.safetensors, tokenizer.json, ...   Qwen2-style LM + tokenizer (HF)
    <out>/vision/      tiny ViT pretrained on per-patch attributes, frozen from here on
    <out>/projector/   projector aligned with the LM on scene descriptions (trainable)
    <out>/sam/         tiny SAM state dict (sam.pt) + config.json
    <out>/tiny.json    what was built, from which seed, and the pretraining figures

The frozen parts are pretrained as the real ones are (CLIP, SAM) and the LM
is aligned with the vision tower as LLaVA is before any segmentation
fine-tuning, so the tiny world learns like the real one. Everything is
deterministic from the seed; it takes a few minutes on a CPU.
"""
from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from models.lm_pretrain import align_lm
from models.policy import Policy
from models.projector import Projector, save_projector
from models.prompt import IMAGE_TOKEN
from models.sam import build_tiny_sam, save_tiny_sam
from models.sam_pretrain import pretrain_sam
from models.tiny_specs import TinyLMSpec, TinySpec
from models.tokenizer import train_tokenizer
from models.vision import TinyVisionEncoder, save_tiny_vision
from models.vision_pretrain import pretrain_vision


def build_lm(spec: TinyLMSpec, vocab: int, eos_id: int, pad_id: int) -> Qwen2ForCausalLM:
    config = Qwen2Config(
        vocab_size=vocab,
        hidden_size=spec.hidden_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        intermediate_size=spec.intermediate_size,
        max_position_embeddings=spec.max_position_embeddings,
        tie_word_embeddings=False,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        bos_token_id=None,
        torch_dtype="float32",
    )
    return Qwen2ForCausalLM(config)


def make_tiny(spec: TinySpec, corpus: Iterable[str], out_dir: str | Path, progress: bool = True) -> Path:
    """Build, pretrain and save tokenizer, LM, vision encoder, projector and SAM under `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(spec.seed)
    tokenizer = train_tokenizer(corpus, spec.lm.vocab_size, spec.ref_token)
    lm = build_lm(spec.lm, len(tokenizer), tokenizer.eos_token_id, tokenizer.pad_token_id)
    lm.generation_config.eos_token_id = tokenizer.eos_token_id
    lm.generation_config.pad_token_id = tokenizer.pad_token_id
    vision = TinyVisionEncoder(spec.vision)
    vision_report = pretrain_vision(vision, spec.vision_pretrain, spec.seed, progress)
    vision.requires_grad_(False)
    projector = Projector(spec.vision.hidden_size, spec.lm.hidden_size)
    image_id, ref_id = tokenizer.convert_tokens_to_ids([IMAGE_TOKEN, spec.ref_token])
    policy = Policy(lm, projector, image_id, ref_id, sae_layer=1)
    align_report = align_lm(policy, vision, tokenizer, spec.lm_align, spec.seed, progress)

    lm.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    save_tiny_vision(vision, out / "vision")
    save_projector(projector, out / "projector")
    sam = build_tiny_sam(spec.sam)
    sam_report = pretrain_sam(sam, spec.sam_pretrain, spec.seed, progress)
    save_tiny_sam(sam, spec.sam, out / "sam")

    summary = {
        "spec": asdict(spec),
        "vocab_size": len(tokenizer),
        "vision": vision_report.as_dict(),
        "lm_align": align_report.as_dict(),
        "sam": sam_report.as_dict(),
        "parameters": {
            "lm": sum(p.numel() for p in lm.parameters()),
            "vision": sum(p.numel() for p in vision.parameters()),
            "projector": sum(p.numel() for p in projector.parameters()),
            "sam": sum(p.numel() for p in sam.parameters()),
        },
    }
    (out / "tiny.json").write_text(json.dumps(summary, indent=2))
    return out

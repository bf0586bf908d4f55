"""Tiny randomly-initialised models, built offline and saved in the real formats.

`make_tiny` writes one folder that the rest of segrl loads exactly like a real
checkpoint folder:

    <out>/config.json, model.safetensors, tokenizer.json, ...   Qwen2-style LM + tokenizer (HF)
    <out>/vision/      frozen tiny ViT (config.json + model.safetensors)
    <out>/projector/   initial projector weights (trainable)
    <out>/sam/         tiny SAM state dict (sam.pt) + config.json
    <out>/tiny.json    what was built, from which seed

Everything is deterministic from the seed; it takes seconds on a CPU.
"""
from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from models.projector import Projector, save_projector
from models.sam import build_tiny_sam, save_tiny_sam
from models.tiny_specs import TinyLMSpec, TinySpec
from models.tokenizer import train_tokenizer
from models.vision import TinyVisionEncoder, save_tiny_vision


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


def make_tiny(spec: TinySpec, corpus: Iterable[str], out_dir: str | Path) -> Path:
    """Build and save tokenizer, LM, vision encoder, projector and SAM under `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(spec.seed)
    tokenizer = train_tokenizer(corpus, spec.lm.vocab_size, spec.ref_token)
    lm = build_lm(spec.lm, len(tokenizer), tokenizer.eos_token_id, tokenizer.pad_token_id)
    lm.generation_config.eos_token_id = tokenizer.eos_token_id
    lm.generation_config.pad_token_id = tokenizer.pad_token_id
    lm.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)

    vision = TinyVisionEncoder(spec.vision)
    save_tiny_vision(vision, out / "vision")
    projector = Projector(spec.vision.hidden_size, spec.lm.hidden_size)
    save_projector(projector, out / "projector")
    sam = build_tiny_sam(spec.sam)
    save_tiny_sam(sam, spec.sam, out / "sam")

    summary = {
        "spec": asdict(spec),
        "vocab_size": len(tokenizer),
        "parameters": {
            "lm": sum(p.numel() for p in lm.parameters()),
            "vision": sum(p.numel() for p in vision.parameters()),
            "projector": sum(p.numel() for p in projector.parameters()),
            "sam": sum(p.numel() for p in sam.parameters()),
        },
    }
    (out / "tiny.json").write_text(json.dumps(summary, indent=2))
    return out

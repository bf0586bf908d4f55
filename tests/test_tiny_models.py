"""Tiny models: deterministic builds in the real formats, loadable by transformers and vLLM."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from data.mask_frames import lowres_side
from models.projector import load_projector
from models.sam import load_sam
from models.tiny import TinySpec, make_tiny
from models.tiny_specs import (
    TinyLMAlignSpec,
    TinySamPretrainSpec,
    TinyVisionPretrainSpec,
)
from models.vision import load_tiny_vision


def _model_dir(ws) -> Path:
    return Path(ws["tiny"]["path"])


def test_folder_has_real_formats(tiny_workspace):
    d = _model_dir(tiny_workspace)
    for name in ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "vision/model.safetensors", "projector/model.safetensors", "sam/sam.pt", "sam/config.json"]:
        assert (d / name).is_file(), name


def test_build_is_deterministic_by_seed(tmp_path):
    """Pretraining at token budgets: determinism, not quality, is under test (test_tiny_pretrain has that)."""
    corpus = ["<think>the red circle is round</think> <SEG>", "every blue square left of the triangle"] * 20
    budgets = {"vision_pretrain": TinyVisionPretrainSpec(steps=3, batch_size=4, eval_scenes=4),
               "lm_align": TinyLMAlignSpec(steps=3, batch_size=4, eval_scenes=2),
               "sam_pretrain": TinySamPretrainSpec(steps=3, batch_images=2, warmup_steps=1, eval_scenes=2)}
    a, b, c = (make_tiny(TinySpec(seed=s, **budgets), corpus, tmp_path / n, progress=False)
               for s, n in [(3, "a"), (3, "b"), (4, "c")])
    wa, wb, wc = (load_file(p / "model.safetensors") for p in (a, b, c))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not all(torch.equal(wa[k], wc[k]) for k in wa)
    assert (a / "tokenizer.json").read_bytes() == (b / "tokenizer.json").read_bytes()
    for part in ("vision", "projector"):
        va, vb = (load_file(p / part / "model.safetensors") for p in (a, b))
        assert all(torch.equal(va[k], vb[k]) for k in va), part
    assert (a / "sam/sam.pt").read_bytes() == (b / "sam/sam.pt").read_bytes()


def test_tokenizer_keeps_markers_as_single_visible_tokens(tiny_workspace):
    tok = AutoTokenizer.from_pretrained(_model_dir(tiny_workspace))
    for marker in ["<think>", "</think>", "<SEG>", "<image>", "<|im_start|>", "<|im_end|>"]:
        ids = tok(marker, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1, marker
    text = "<think>The shape that can roll is the circle.</think> <SEG>"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert tok.decode(tok("naïve ✓", add_special_tokens=False)["input_ids"]) == "naïve ✓"  # byte-level: no unknowns
    prompt = tok.apply_chat_template([{"role": "user", "content": "<image>\nfind it"}], add_generation_prompt=True,
                                     tokenize=False)
    assert prompt == "<|im_start|>user\n<image>\nfind it<|im_end|>\n<|im_start|>assistant\n"
    assert tok.eos_token == "<|im_end|>"


def test_vision_projector_and_sam_shapes(tiny_workspace):
    d, cfg = _model_dir(tiny_workspace), tiny_workspace["config"].model.tiny
    vision = load_tiny_vision(d / "vision")
    feats = vision(torch.randn(2, 3, cfg.vision.image_size, cfg.vision.image_size))
    grid = cfg.vision.image_size // cfg.vision.patch_size
    assert feats.shape == (2, grid * grid, cfg.vision.hidden_size)
    assert not any(p.requires_grad for p in vision.parameters())
    assert load_projector(d / "projector")(feats).shape == (2, grid * grid, cfg.lm.hidden_size)

    sam = load_sam("tiny", d / "sam")
    emb = sam.image_encoder(torch.randn(1, 3, cfg.sam.image_size, cfg.sam.image_size))
    sam_grid = cfg.sam.image_size // cfg.sam.patch_size
    assert emb.shape == (1, cfg.sam.prompt_dim, sam_grid, sam_grid)
    sparse, dense = sam.prompt_encoder(points=None, boxes=None, masks=None)
    low, iou = sam.mask_decoder(image_embeddings=emb, image_pe=sam.prompt_encoder.get_dense_pe(),
                                sparse_prompt_embeddings=torch.cat([sparse, torch.randn(1, 1, cfg.sam.prompt_dim)], 1),
                                dense_prompt_embeddings=dense, multimask_output=False)
    assert low.shape == (1, 1, lowres_side(emb), lowres_side(emb)) and iou.shape == (1, 1)


def _prompt_embeds(ws, hf_model) -> torch.Tensor:
    """Projected vision features of a synthetic image + embedded chat tokens (as the rollout builds them)."""
    d = _model_dir(ws)
    vision, projector = load_tiny_vision(d / "vision"), load_projector(d / "projector")
    tok = AutoTokenizer.from_pretrained(d)
    ids = tok("<|im_start|>user\nwhat could roll?<|im_end|>\n<|im_start|>assistant\n<think>",
              add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    with torch.no_grad():
        image = projector(vision(torch.rand(1, 3, 64, 64) * 2 - 1))[0]
        return torch.cat([image, hf_model.get_input_embeddings()(ids)], 0)


@pytest.mark.timeout(600)
def test_vllm_and_transformers_agree_on_logprobs(tiny_workspace):
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM, SamplingParams

    d = str(_model_dir(tiny_workspace))
    hf = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    embeds = _prompt_embeds(tiny_workspace, hf)
    llm = LLM(model=d, enable_prompt_embeds=True, dtype="float32", seed=0, max_model_len=256,
              enforce_eager=True, gpu_memory_utilization=0.5)
    try:
        out = llm.generate({"prompt_embeds": embeds}, SamplingParams(max_tokens=12, temperature=1.0, logprobs=0))
    finally:
        del llm
    sample = out[0].outputs[0]
    ids = list(sample.token_ids)
    vllm_lp = torch.tensor([step[t].logprob for step, t in zip(sample.logprobs, ids)])
    with torch.no_grad():
        full = torch.cat([embeds, hf.get_input_embeddings()(torch.tensor(ids))], 0)[None]
        logp = hf(inputs_embeds=full).logits[0].log_softmax(-1)
    n = embeds.shape[0]
    hf_lp = torch.stack([logp[n - 1 + i, t] for i, t in enumerate(ids)])
    assert len(ids) >= 1
    assert torch.allclose(vllm_lp, hf_lp, atol=1e-4), (vllm_lp - hf_lp).abs().max()

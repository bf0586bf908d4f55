"""Aligning the tiny LM with the vision tower, as LLaVA is aligned before segmentation fine-tuning.

LLaVA's projector is trained on image-caption pairs and the whole model on
visual instructions before LISA or SegCompass fine-tune it; the tiny LM was
never shown an image, so its reasoning named objects that were not there.
Here projector and LM learn, on fresh scenes through the frozen (pretrained)
vision tower, to answer "Describe the image." and "List every red shape."
(data/synthetic/captions.py). The held-out figure is how often greedy
decoding names every shape of a scene exactly.
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from data.synthetic import random_scene
from data.synthetic.captions import alignment_pair, describe
from models.generate import generate
from models.policy import Policy
from models.prompt import chat_prompt_ids
from models.tiny_specs import TinyLMAlignSpec
from models.vision import TinyVisionEncoder
from models.vision_pretrain import normalise


@dataclass(frozen=True)
class AlignReport:
    steps: int
    seconds: float
    caption_exact: float  # held-out "Describe the image.": the whole answer right
    name_recall: float  # held-out: share of shapes named exactly (size, colour, kind, position)

    def as_dict(self) -> dict:
        return {"steps": self.steps, "seconds": round(self.seconds, 1),
                "caption_exact": round(self.caption_exact, 4), "name_recall": round(self.name_recall, 4)}


def _batch(rng: np.random.Generator, encoder: TinyVisionEncoder, tokenizer, n: int, pairs):
    scenes = [random_scene(rng, encoder.spec.image_size) for _ in range(n)]
    with torch.no_grad():
        features = encoder(normalise(np.stack([s.image for s in scenes])))
    texts = [pairs(scene) for scene in scenes]
    prompts = [chat_prompt_ids(tokenizer, instruction) for instruction, _ in texts]
    return scenes, list(features), prompts, [answer for _, answer in texts]


def align_lm(policy: Policy, encoder: TinyVisionEncoder, tokenizer, spec: TinyLMAlignSpec, seed: int,
             progress: bool = True) -> AlignReport:
    """Train policy.lm and policy.projector in place on alignment pairs; greedy held-out captioning figures."""
    torch.manual_seed(seed)
    rng = np.random.default_rng([seed, 201])
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=spec.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, spec.lr, total_steps=spec.steps, pct_start=0.1)
    encoder.eval()
    policy.train()
    start = time.perf_counter()
    for _ in tqdm(range(spec.steps), desc="make-tiny: LM alignment", disable=not progress):
        _, features, prompts, answers = _batch(rng, encoder, tokenizer, spec.batch_size,
                                               lambda scene: alignment_pair(scene, rng))
        responses = [tokenizer(a, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for a in answers]
        out = policy(prompts, features, responses)
        loss = -(out.logprobs.sum() / out.response_mask.sum())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
    seconds = time.perf_counter() - start
    policy.eval()
    exact, recall = caption_accuracy(policy, encoder, tokenizer, spec.eval_scenes, seed)
    return AlignReport(spec.steps, seconds, exact, recall)


@torch.no_grad()
def caption_accuracy(policy: Policy, encoder: TinyVisionEncoder, tokenizer, n: int, seed: int,
                     max_new_tokens: int = 96) -> tuple[float, float]:
    """(exact captions, names recalled) of greedy "Describe the image." on n held-out scenes."""
    scenes, features, prompts, answers = _batch(np.random.default_rng([seed, 202]), encoder, tokenizer, n,
                                                describe)
    embeds = [policy.prompt_embeds(ids, f) for ids, f in zip(prompts, features)]
    texts = tokenizer.batch_decode(generate(policy, tokenizer, embeds, max_new_tokens), skip_special_tokens=True)
    exact = np.mean([t.strip() == a for t, a in zip(texts, answers)])
    recall = [len(_named(t) & _named(a)) / len(scene.shapes) for t, a, scene in zip(texts, answers, scenes)]
    return float(exact), float(np.mean(recall))


def _named(caption: str) -> set[str]:
    """The shape names a "There are n: a, b and c." caption lists."""
    listed = caption.strip().rstrip(".").partition(": ")[2]
    return {part.strip() for part in re.split(r", | and ", listed) if part.strip()}

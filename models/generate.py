"""Batched generation from prompt embeddings with transformers (evaluation and the SFT report).

Training rollouts use vLLM; for evaluation of tiny models transformers is
faster (less overhead) and needs no engine start.
"""
from __future__ import annotations

import torch

from models.policy import Policy


@torch.no_grad()
def generate(policy: Policy, tokenizer, prompt_embeds: list[torch.Tensor], max_new_tokens: int,
             temperature: float = 0.0) -> list[list[int]]:
    """Left-pad the prompts, decode (greedy when temperature is 0), return tokens up to and without EOS."""
    length = max(e.shape[0] for e in prompt_embeds)
    embeds = prompt_embeds[0].new_zeros(len(prompt_embeds), length, prompt_embeds[0].shape[1])
    mask = torch.zeros(len(prompt_embeds), length, dtype=torch.long)
    for i, e in enumerate(prompt_embeds):
        embeds[i, length - e.shape[0]:] = e
        mask[i, length - e.shape[0]:] = 1
    sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
    out = policy.lm.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=max_new_tokens,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **sampling)
    responses = []
    for row in out.tolist():
        cut = row.index(tokenizer.eos_token_id) if tokenizer.eos_token_id in row else len(row)
        responses.append(row[:cut])
    return responses

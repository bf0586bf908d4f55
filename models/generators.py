"""How a served policy decodes a batch of prompts (``serve.policy.generator``), by name:

- ``vllm``: the rollout's engine (``models.rollout.open_engine``), fed the prompt embeddings the
  policy builds, as training samples its responses. A new model version loads into the running
  engine in place (``reload_engine``), never a second engine beside it (vLLM's process-wide
  state holds one, and a GPU would need room for two).
- ``transformers``: eval's function (``models.generate``) on the policy itself, so served answers
  are exactly what `segrl eval` decodes (no engine to start: the quick choice for tiny models).

Both give each prompt's token ids up to and without EOS, greedy at temperature 0. ``load`` is
called with each model folder before it serves; the caller serialises ``load`` and calls.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from models.generate import generate
from models.hf_weights import read_tensors
from models.policy import Policy
from models.rollout import RolloutSettings, open_engine, reload_engine
from rewards.registry import Registry

GENERATORS: Registry = Registry("generator")


@GENERATORS.register("transformers")
class TransformersGenerator:
    def __init__(self, settings: RolloutSettings):
        self.settings = settings

    def load(self, model_dir: str) -> None:
        """Nothing to load: it decodes with the policy it is given."""

    def __call__(self, policy: Policy, tokenizer, embeds: list[torch.Tensor], max_new_tokens: int,
                 temperature: float) -> list[list[int]]:
        return generate(policy, tokenizer, embeds, max_new_tokens, temperature)


@GENERATORS.register("vllm")
class VllmGenerator:
    """One engine per replica; ``settings.model_dir`` is the folder it first opens."""

    def __init__(self, settings: RolloutSettings, engine_args: dict | None = None):
        self.settings, self.engine_args = settings, engine_args
        self.llm = None

    def load(self, model_dir: str) -> None:
        if self.llm is None:
            self.llm = open_engine(replace(self.settings, model_dir=model_dir), self.engine_args)
        else:
            reload_engine(self.llm, lm_weights(model_dir))

    def __call__(self, policy: Policy, tokenizer, embeds: list[torch.Tensor], max_new_tokens: int,
                 temperature: float) -> list[list[int]]:
        from vllm import SamplingParams

        if self.llm is None:
            raise RuntimeError("the vLLM generator has no model loaded")
        params = SamplingParams(n=1, max_tokens=max_new_tokens, temperature=temperature, detokenize=False)
        outputs = self.llm.generate([{"prompt_embeds": e.contiguous()} for e in embeds], params, use_tqdm=False)
        eos = tokenizer.eos_token_id
        responses = []
        for request in outputs:
            ids = list(request.outputs[0].token_ids)
            responses.append(ids[:ids.index(eos)] if eos in ids else ids)
        return responses


def lm_weights(model_dir: str) -> list[tuple[str, torch.Tensor]]:
    """Every tensor of a model folder's causal LM (HF names; its top-level safetensors, one file or shards)."""
    return list(read_tensors(Path(model_dir), lambda key: key).items())

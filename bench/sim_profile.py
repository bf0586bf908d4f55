"""The simulated 7B GRPO cluster's numbers: what each stage costs, in real seconds and tokens.

Ray-free; ``bench.sim_stages`` turns these into sleeping actors and ``bench.sim_engines``
into continuous-batching engines.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Profile:
    """One GRPO step of a 7B model on H100s, in real seconds and tokens, per rollout actor.

    The cluster scales with the pool: N rollout actors (one engine on one GPU each) come
    with ``learner_gpus_per_actor * N`` learner GPUs, ``reference_gpus_per_actor * N`` reference
    GPUs (at least one) and N reward CPU workers; the batch is ``groups_per_actor * N`` groups.
    """

    group_size: int = 8  # responses per prompt (GRPO group)
    groups_per_actor: int = 8  # 64 responses per engine per step: one per decode slot
    groups_per_call: int = 1  # groups per rollout call: a call finishes with its slowest response
    prompt_tokens: int = 800  # image tokens + question
    median_tokens: float = 3000.0  # response length ~ lognormal(median, sigma), clipped
    sigma: float = 0.9
    max_new_tokens: int = 20480
    max_seqs: int = 64  # vLLM max_num_seqs: KV cache for ~64 long-CoT sequences on one H100
    step_base_s: float = 0.012  # decode step latency, memory bound: ~80 tok/s for one sequence
    step_per_seq_s: float = 0.0002  # ... and 2.6k tok/s for 64
    prefill_tok_s: float = 30_000.0  # KV recompute after an interrupt (~40% MFU)
    engine_load_s: float = 1.0  # 15 GB of bf16 weights into an engine (bucketed NCCL)
    node_start_s: float = 180.0  # an engine added mid-run: its GPU node joins the cluster (VM boot, image pull)
    engine_start_s: float = 60.0  # ... then vLLM starts and loads the current weights
    reference_gpus_per_actor: float = 0.25
    reference_tok_s: float = 25_000.0  # reference forward over prompt + response
    reference_mask_s: float = 0.01  # mask decoder per response
    reference_load_s: float = 0.2  # segmentation modules only: the reference LLM is frozen
    reward_s: float = 0.05  # Hungarian matching + mask IoU per response, one CPU
    learner_gpus_per_actor: float = 0.5
    learner_tok_s: float = 7_000.0  # per GPU: fwd + bwd + proximal logprobs at ~45% MFU
    learner_fixed_s: float = 4.5  # per step: optimizer, ZeRO-3 gathers, weight export
    time_scale: float = 1 / 200  # wall seconds per real second

    def batch_groups(self, actors: int) -> int:
        return self.groups_per_actor * actors

    def response_lengths(self, group_id: int, seed: int) -> np.ndarray:
        """The group's response lengths; a function of the group id, so runs compare alike."""
        rng = np.random.default_rng([seed, group_id])
        drawn = self.median_tokens * np.exp(self.sigma * rng.standard_normal(self.group_size))
        return np.clip(np.round(drawn), 1, self.max_new_tokens)

    def mean_response_tokens(self) -> float:
        """E[min(L, max_new_tokens)] for the lognormal, in closed form."""
        mu, s, cap = math.log(self.median_tokens), self.sigma, self.max_new_tokens
        z = (math.log(cap) - mu) / s
        phi = lambda x: 0.5 * (1 + math.erf(x / math.sqrt(2)))  # noqa: E731
        return math.exp(mu + s * s / 2) * phi(z - s) + cap * (1 - phi(z))

    def services(self, actors: int) -> dict[str, Service]:
        """The reference, reward and learner stages of a cluster with ``actors`` rollout actors."""
        return {
            "reference": Service(max(1, round(self.reference_gpus_per_actor * actors)), 0.0, self.reference_mask_s,
                             1 / self.reference_tok_s, self.reference_load_s),
            "reward": Service(actors, 0.0, self.reward_s),
            "learn": Service(1, self.learner_fixed_s, 0.0,
                             1 / (self.learner_tok_s * self.learner_gpus_per_actor * actors)),
        }

    def stage_rates(self, actors: int) -> dict[str, float]:
        """Responses per real second each stage sustains alone and always busy.

        The pool runs every slot with the mean response and loads weights once a step; the
        learner trains one batch per call; reference and reward actors take one chunk per call.
        """
        batch = self.batch_groups(actors) * self.group_size
        mean = self.mean_response_tokens()
        decode_tok_s = actors * self.max_seqs / (self.step_base_s + self.step_per_seq_s * self.max_seqs)
        rates = {"rollout": batch / (batch * mean / decode_tok_s + self.engine_load_s)}
        for name, service in self.services(actors).items():
            responses = batch if name == "learn" else self.groups_per_call * self.group_size
            call_s = service.call_s(responses, responses * (self.prompt_tokens + mean))
            rates[name] = service.servers * responses / call_s
        return rates


@dataclass(frozen=True)
class Service:
    """A stage's servers and what one call costs: fixed + per response + per token seconds."""

    servers: int
    fixed_s: float = 0.0
    per_response_s: float = 0.0
    per_token_s: float = 0.0
    load_s: float = 0.0  # a weight update

    def call_s(self, responses: int, tokens: float) -> float:
        return self.fixed_s + self.per_response_s * responses + self.per_token_s * tokens

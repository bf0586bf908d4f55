"""Single-pass hidden-state capture vs a second forward (the released SegCompass does two).

Usage: python bench/capture.py [--work-dir work] [--batch 8] [--repeats 5]
Needs the tiny model (`make main` or `segrl make-tiny`). Prints the time of
one capturing forward, of logprob forward + hidden-state forward, and their ratio.
"""
from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch

sys.path[0] = str(Path(__file__).resolve().parents[1])

from models.policy import load_policy  # noqa: E402
from models.prompt import prompt_ids  # noqa: E402


def two_pass(policy, prompts, feats, responses):
    """What a capture-less pipeline does: logprobs, then a second forward for hidden states."""
    out = policy(prompts, feats, responses)
    rows = [torch.cat([policy.prompt_embeds(p, f), policy.embed_tokens(torch.tensor(r))])
            for p, f, r in zip(prompts, feats, responses)]
    length = max(r.shape[0] for r in rows)
    embeds = torch.zeros(len(rows), length, rows[0].shape[1])
    mask = torch.zeros(len(rows), length, dtype=torch.long)
    for i, r in enumerate(rows):
        embeds[i, : r.shape[0]], mask[i, : r.shape[0]] = r, 1
    hidden = policy.lm(inputs_embeds=embeds, attention_mask=mask, output_hidden_states=True).hidden_states
    return out.logprobs, hidden[policy.sae_layer], hidden[-1]


def timed(fn, repeats):
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--work-dir", default="work")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--response-tokens", type=int, default=96)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    policy, tok = load_policy("tiny", f"{args.work_dir}/models/tiny", "<SEG>", sae_layer=2)
    dv = policy.projector.vision_dim
    prompts = [prompt_ids(tok, "the shape that could roll")] * args.batch
    feats = [torch.randn(64, dv) for _ in range(args.batch)]
    vocab = policy.lm.config.vocab_size
    responses = [torch.randint(0, vocab, (args.response_tokens,)).tolist() for _ in range(args.batch)]
    with torch.no_grad():
        one = timed(lambda: policy(prompts, feats, responses), args.repeats)
        two = timed(lambda: two_pass(policy, prompts, feats, responses), args.repeats)
    print(f"machine: {platform.platform()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}")
    print(f"batch {args.batch} x {args.response_tokens} response tokens, tiny LM")
    print(f"single pass (capture): {one * 1e3:.1f} ms")
    print(f"two passes:            {two * 1e3:.1f} ms")
    print(f"two-pass / single-pass time ratio: {two / one:.2f}x")


if __name__ == "__main__":
    main()

"""The text-only control: is the tiny policy's reasoning limited by what it sees, or by its LM?

The main job's SFT budget (``sft.epochs`` over ``data.synthetic.n_train`` samples in batches of
``sft.batch_size`` at ``sft.lr``, one-cycle schedule, from make-tiny's aligned LM), but each
prompt holds the scene as text, every shape by the full name the reasoning uses ("There are
four: the small red circle at the top left, ...") where the image would be. Seeing is then
perfect, so val reasoning accuracy (the answer names exactly the target shapes, or refuses a
false premise) measures the LM alone: how well it finds the asked-for shapes in what it is
given and names them. The samples are the synthetic generator's own streams: val is the
dataset's val split, train its train split, continued past ``n_train`` when ``--train`` asks
for more. Prints accuracy per query kind and the machine.
Run: ``python bench/text_control.py [--config FILE] [--steps N] [--train N] [key=value ...]``
(defaults: the config's SFT steps and training samples; the tiny models must exist:
``segrl make-tiny``).
"""
from __future__ import annotations

import argparse
import itertools
import math
import os
import platform
import sys
import time
from collections import Counter
from pathlib import Path

# Run as a script, sys.path[0] is bench/; the packages live one level up.
_ROOT = Path(__file__).resolve().parent.parent
if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path[0] = str(_ROOT)

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from config import load_config  # noqa: E402
from data.synthetic import NO_TARGET_ANSWER, THINK_CLOSE, THINK_OPEN  # noqa: E402
from data.synthetic.answers import reasoning_correct  # noqa: E402
from data.synthetic.generate import draws  # noqa: E402
from data.synthetic.phrases import inventory  # noqa: E402
from models.optim import build_optimizer, clip_grad_norm, one_cycle, param_groups  # noqa: E402
from models.prompt import INSTRUCTION  # noqa: E402


def text_samples(split: str, n: int, seed: int, image_size: int, ref_token: str) -> list[dict]:
    """The first n of a split's stream: the scene as text, the question, the reference response."""
    out = []
    for kind, scene, query in itertools.islice(draws(split, seed, image_size), n):
        answer = ref_token if query.targets else NO_TARGET_ANSWER
        out.append({"kind": kind, "scene": inventory(scene), "question": query.question,
                    "reasoning": query.reasoning, "response": f"{THINK_OPEN}{query.reasoning}{THINK_CLOSE} {answer}"})
    return out


def prompt_ids(tokenizer, sample: dict, ref_token: str) -> list[int]:
    """The main job's prompt with the scene's text in the image's place."""
    content = f"{sample['scene']}\n" + INSTRUCTION.format(question=sample["question"], ref_token=ref_token)
    text = tokenizer.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                         tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def train(lm, tokenizer, samples: list[dict], steps: int, batch_size: int, lr: float, optim, ref_token: str) -> float:
    """SFT on the responses (prompt tokens masked); returns the last step's loss."""
    pairs = [(prompt_ids(tokenizer, s, ref_token),
              tokenizer(s["response"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id])
             for s in samples]
    optimizer = build_optimizer(param_groups({"lm": lm}, lr, {}, optim.weight_decay), tuple(optim.betas))
    schedule = one_cycle(optimizer, steps, optim.one_cycle_final_div)
    generator = torch.Generator().manual_seed(0)
    epochs = math.ceil(steps * batch_size / len(pairs))
    order = torch.cat([torch.randperm(len(pairs), generator=generator) for _ in range(epochs)]).tolist()
    lm.train()
    loss = torch.zeros(())
    for step in range(steps):
        batch = [pairs[i] for i in order[step * batch_size:(step + 1) * batch_size]]
        width = max(len(p) + len(r) for p, r in batch)
        ids = torch.full((len(batch), width), tokenizer.pad_token_id)
        labels = torch.full((len(batch), width), -100)
        attention = torch.zeros((len(batch), width), dtype=torch.long)
        for row, (p, r) in enumerate(batch):
            ids[row, :len(p) + len(r)] = torch.tensor(p + r)
            labels[row, len(p):len(p) + len(r)] = torch.tensor(r)
            attention[row, :len(p) + len(r)] = 1
        loss = lm(input_ids=ids, attention_mask=attention, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        clip_grad_norm(lm.parameters(), 1.0)
        optimizer.step()
        schedule.step()
    return loss.item()


@torch.no_grad()
def reasoning_by_kind(lm, tokenizer, samples: list[dict], ref_token: str, max_new_tokens: int,
                      batch_size: int = 32) -> dict[str, tuple[int, int]]:
    """Greedy answers scored: query kind -> (right, total)."""
    lm.eval()
    right, total = Counter(), Counter()
    for start in range(0, len(samples), batch_size):
        batch = samples[start:start + batch_size]
        prompts = [prompt_ids(tokenizer, s, ref_token) for s in batch]
        width = max(map(len, prompts))
        ids = torch.full((len(batch), width), tokenizer.pad_token_id)
        attention = torch.zeros((len(batch), width), dtype=torch.long)
        for row, p in enumerate(prompts):  # left-padded, as generation needs
            ids[row, width - len(p):] = torch.tensor(p)
            attention[row, width - len(p):] = 1
        out = lm.generate(input_ids=ids, attention_mask=attention, max_new_tokens=max_new_tokens, do_sample=False,
                          eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        for s, row in zip(batch, out[:, width:].tolist()):
            text = tokenizer.decode(row, skip_special_tokens=True)
            total[s["kind"]] += 1
            right[s["kind"]] += reasoning_correct(text, s["reasoning"], ref_token)
    return {kind: (right[kind], total[kind]) for kind in sorted(total)}


def run(config, steps: int | None = None, n_train: int | None = None, n_val: int | None = None) -> dict:
    """Train a copy of the tiny LM on the text-only task and score val; the figures as a dict."""
    syn, sft = config.data.synthetic, config.sft
    n_train = n_train or syn.n_train
    steps = steps or sft.epochs * math.ceil(syn.n_train / sft.batch_size)
    ref = config.model.ref_token
    folder = config.resolve_path(config.model.name_or_path)
    torch.manual_seed(config.seed)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    lm = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    started = time.perf_counter()
    loss = train(lm, tokenizer, text_samples("train", n_train, config.seed, syn.image_size, ref), steps,
                 sft.batch_size, sft.lr, config.optim, ref)
    seconds = time.perf_counter() - started
    val = text_samples("val", n_val or syn.n_val, config.seed, syn.image_size, ref)
    kinds = reasoning_by_kind(lm, tokenizer, val, ref, config.data.max_response_length)
    accuracy = sum(r for r, _ in kinds.values()) / max(1, sum(n for _, n in kinds.values()))
    return {"steps": steps, "train_samples": n_train, "train_seconds": seconds, "last_loss": loss,
            "reasoning_acc": accuracy, "by_kind": kinds}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/tiny.yaml")
    parser.add_argument("--steps", type=int, default=None, help="default: the config's SFT steps")
    parser.add_argument("--train", type=int, default=None, help="training samples; default data.synthetic.n_train")
    parser.add_argument("overrides", nargs="*", help="config key=value overrides")
    args = parser.parse_args(argv)
    result = run(load_config(args.config, args.overrides), args.steps, args.train)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads")
    print(f"text-only control: {result['steps']} steps on {result['train_samples']} samples "
          f"({result['train_seconds']:.0f} s), last loss {result['last_loss']:.3f}")
    for kind, (right, total) in result["by_kind"].items():
        print(f"  {kind:16s} {right:4d} / {total:4d} = {right / total:.3f}")
    print(f"reasoning accuracy (val, scene as text): {result['reasoning_acc']:.3f}")
    return result


if __name__ == "__main__":
    main()

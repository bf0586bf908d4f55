"""Is there a gain in refusing more often? A checkpoint's greedy eval with its refusals pushed up.

On the synthetic set about one sample in six is a false premise, where the right answer is a
refusal (an empty mask scores 1). The SFT model refuses few of them (N-acc about 0.14), so a
policy that learnt to refuse where it should could gain up to about 0.15 gIoU, and that is the
kind of gain a reward for the empty mask can teach. Whether it can, without a better reading of
the image, shows here: a constant bias ``b`` is added to the logit of " no" right after
" There is", the token where every attribute, function, group and missing-anchor conclusion
decides between "There is no ..." and "There is one: ..." (relations decide earlier, at "The
nearest"). A bias moves every sample's odds alike, the way a policy update that learnt only
"refuse more" would; the table shows what N-acc gains and T-acc loses for each ``b``.
Run: ``python bench/refusal_bias.py [--checkpoint DIR] [--split val] [--limit 200] [--bias 0 1 2 3]``
(default checkpoint: the main job's SFT model).
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
from functools import partial
from pathlib import Path

# Run as a script, sys.path[0] is bench/; the packages live one level up.
_ROOT = Path(__file__).resolve().parent.parent
if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path[0] = str(_ROOT)

import torch  # noqa: E402
from transformers import LogitsProcessor, LogitsProcessorList  # noqa: E402

from config import load_config  # noqa: E402

DECISION = ". There is no"  # the conclusion's opening; its last token is the one biased
COLUMNS = (("gIoU", "giou"), ("cIoU", "ciou"), ("N-acc", "n_acc"), ("T-acc", "t_acc"), ("reason", "reasoning_acc"))


class RefusalBias(LogitsProcessor):
    """Adds ``bias`` to ``token``'s logit in every row whose last tokens are ``context``."""

    def __init__(self, context: list[int], token: int, bias: float) -> None:
        self.context, self.token, self.bias = torch.tensor(context), token, bias

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        n = len(self.context)
        if input_ids.shape[1] >= n:
            hit = (input_ids[:, -n:] == self.context.to(input_ids.device)).all(dim=1)
            scores[hit, self.token] += self.bias
        return scores


def decision_tokens(tokenizer) -> tuple[list[int], int]:
    """(the tokens of " There is", the token " no") as the tokenizer splits them mid-reasoning."""
    ids = tokenizer(DECISION, add_special_tokens=False)["input_ids"]
    if tokenizer.decode(ids[-3:]) != " There is no":
        raise ValueError(f"the tokenizer splits {DECISION!r} as {[tokenizer.decode([i]) for i in ids]}: "
                         "' There', ' is', ' no' expected as the last three tokens")
    return ids[-3:-1], ids[-1]


def sweep(config, checkpoint: str, split: str, limit: int, biases: list[float]) -> dict[float, dict]:
    """Greedy metrics of ``checkpoint`` on ``split`` for each refusal bias."""
    from config.builders import build_segmenter, feature_store
    from data.loader import SegDataset
    from pipelines.evaluate import evaluate_with_config

    model, tokenizer, img_size = build_segmenter(config, checkpoint)
    dataset = SegDataset(Path(config.resolve_path(config.data.root)) / f"{split}.parquet", feature_store(config),
                         img_size, limit=limit)
    context, token = decision_tokens(tokenizer)
    plain_generate, results = model.policy.lm.generate, {}
    for bias in biases:
        processors = LogitsProcessorList([RefusalBias(context, token, bias)])
        model.policy.lm.generate = partial(plain_generate, logits_processor=processors)
        results[bias] = evaluate_with_config(config, model, tokenizer, dataset, img_size, progress=False).metrics
    return results


def main(argv: list[str] | None = None) -> dict[float, dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/tiny.yaml")
    parser.add_argument("--checkpoint", default=None, help="model folder (default: {runs_dir}/sft/model)")
    parser.add_argument("--split", default="val")
    parser.add_argument("--limit", type=int, default=200, help="samples scored (default 200)")
    parser.add_argument("--bias", type=float, nargs="+", default=[0.0, 0.5, 1.0, 2.0, 3.0])
    parser.add_argument("overrides", nargs="*", help="config key=value overrides")
    args = parser.parse_args(argv)
    config = load_config(args.config, args.overrides)
    checkpoint = args.checkpoint or config.resolve_path("{runs_dir}/sft/model")
    results = sweep(config, checkpoint, args.split, args.limit, args.bias)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads")
    print(f"{checkpoint}, {args.split} ({args.limit} samples), greedy, bias b on ' no' after ' There is'")
    print(f"{'b':>5}" + "".join(f"{name:>8}" for name, _ in COLUMNS))
    for bias, metrics in results.items():
        print(f"{bias:5.1f}" + "".join(f"{metrics.get(key, float('nan')):8.3f}" for _, key in COLUMNS))
    return results


if __name__ == "__main__":
    main()

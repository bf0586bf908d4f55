"""`segrl sft`: supervised warm start so the policy emits the format before GRPO.

LISA-style: cross-entropy on templated responses (`<think>…</think> <SEG>`,
or a refusal for false premises) plus the segmentation loss on the decoded
masks, one backward. Each module trains at `sft.lr` times its multiplier
(`sft.lr_multipliers`, the roles of `optim.lr_multipliers`), so SAM's prompt
encoder and mask decoder keep A.2's small share of the head's rate. Val format
validity and gIoU are measured before and after; the checkpoint folder is what
the GRPO config starts from.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from tqdm import tqdm

from config import Config, dump_config
from config.builders import build_segmenter, feature_store, head_spec
from data.loader import SegDataset, SegItem
from data.mask_frames import slot_targets
from models.losses import segmentation_loss
from models.optim import build_optimizer, clip_grad_norm, one_cycle, param_groups
from models.segmenter import eval_file, save_segmenter
from pipelines.evaluate import EvalResult, evaluate_with_config, table_lines, teacher_forced, write_eval


def sft_step(model, tokenizer, items: list[SegItem], config: Config) -> tuple[torch.Tensor, dict]:
    """Loss of one batch: mean per-sequence CE + seg_coef x mean segmentation loss."""
    out, heads = teacher_forced(model, tokenizer, items, config.model.ref_token)
    ce = -(out.logprobs.sum(1) / out.response_mask.sum(1)).mean()
    w = config.seg_loss
    seg_terms = [
        segmentation_loss(h.mask_logits, slot_targets(it.gt_lowres, config.model.num_slots),
                          h.conf_logits if config.model.num_slots > 1 else None,
                          dice_weight=w.dice_weight, bce_weight=w.bce_weight, conf_weight=w.conf_weight)[0]
        for it, h in zip(items, heads) if h is not None
    ]
    seg = torch.stack(seg_terms).mean() if seg_terms else ce.new_zeros(())
    loss = ce + config.sft.seg_coef * seg
    return loss, {"loss": loss.item(), "ce": ce.item(), "seg": seg.item()}


def run_sft(config: Config, progress: bool = True) -> dict:
    torch.manual_seed(config.seed)
    model, tokenizer, img_size = build_segmenter(config)
    root, store = Path(config.resolve_path(config.data.root)), feature_store(config)
    train = SegDataset(root / f"{config.data.train_split}.parquet", store, img_size)
    val = SegDataset(root / f"{config.data.eval_splits[0]}.parquet", store, img_size, limit=config.sft.eval_samples)
    out_dir = Path(config.resolve_path(config.sft.output))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.yaml").write_text(dump_config(config))

    def score(tag: str) -> EvalResult:
        res = evaluate_with_config(config, model, tokenizer, val, img_size, progress)
        (out_dir / f"samples-{tag}.json").write_text(json.dumps(res.responses[:8], indent=2))
        return res

    before = score("before").metrics
    s = config.sft
    groups = param_groups(model.param_modules(), s.lr, s.lr_multipliers.model_dump(), config.optim.weight_decay)
    optimizer = build_optimizer(groups, tuple(config.optim.betas))
    steps_per_epoch = -(-len(train) // s.batch_size)
    schedule = one_cycle(optimizer, s.epochs * steps_per_epoch, config.optim.one_cycle_final_div)
    order, rng, step = list(range(len(train))), random.Random(config.seed), 0
    with open(out_dir / "metrics.jsonl", "w") as log, tqdm(total=s.epochs * steps_per_epoch, desc="sft",
                                                           disable=not progress) as bar:
        for epoch in range(s.epochs):
            rng.shuffle(order)
            for start in range(0, len(order), s.batch_size):
                loss, metrics = sft_step(model, tokenizer, [train[i] for i in order[start:start + s.batch_size]],
                                         config)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                metrics["grad_norm"] = clip_grad_norm(model.parameters(), config.optim.grad_clip)
                optimizer.step()
                schedule.step()
                step += 1
                log.write(json.dumps({"step": step, "epoch": epoch, **metrics}) + "\n")
                bar.set_postfix(ce=f"{metrics['ce']:.3f}", seg=f"{metrics['seg']:.3f}")
                bar.update()
    after = score("after")
    source = config.resolve_path(config.model.name_or_path)
    model_dir = save_segmenter(model, head_spec(config), tokenizer, source, out_dir / "model")
    split = config.data.eval_splits[0]
    write_eval(eval_file(model_dir, split), model_dir, split, after)  # as `segrl eval` would write it
    report = {"before": before, "after": after.metrics, "steps": step, "checkpoint": str(model_dir)}
    (out_dir / "report.json").write_text(json.dumps(report, indent=2))
    return report


def report_lines(report: dict) -> list[str]:
    rows = table_lines({"before": report["before"], "after": report["after"]})
    return rows + [f"checkpoint {report['checkpoint']} after {report['steps']} steps"]

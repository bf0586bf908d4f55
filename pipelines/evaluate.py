"""Generate answers for a split, decode masks, and score them with the shared metrics.

A response without the reference token is a "no such object" answer (no
mask); otherwise the SegCompass head decodes K slots, the confident ones are
merged, and the mask is compared in the image frame (LISA/GSVA conventions by
default, `rewards.metrics.SegMetrics`). `mask_reward` is the training mask
reward of the greedy answers (soft IoU in SAM's low-res frame, as the reward
workers score it), so a GRPO run's reward can be compared across checkpoints.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from data.loader import SegDataset, SegItem
from data.mask_frames import lowres_side, lowres_to_image, slot_targets
from models.generate import generate
from models.prompt import prompt_ids
from models.segmenter import Segmenter, slot_probabilities
from rewards import SegMetrics, mask_score, response_format_score


@dataclass
class EvalResult:
    metrics: dict
    responses: list[str]


def predicted_mask(head_out, item: SegItem, img_size: int, num_slots: int, threshold: float) -> np.ndarray:
    """Merge the kept slots (all for K = 1, confident ones otherwise) into one image-frame mask."""
    logits = head_out.mask_logits
    if num_slots > 1:
        keep = torch.sigmoid(head_out.conf_logits) >= threshold
        if not keep.any():
            return np.zeros((item.sample.height, item.sample.width), bool)
        logits = logits[keep]
    image = lowres_to_image(logits, item.sam_input_size, (item.sample.height, item.sample.width), img_size)
    return (image > 0).any(0).numpy()


@torch.no_grad()
def evaluate(model: Segmenter, tokenizer, dataset: SegDataset, img_size: int, ref_token: str,
             max_new_tokens: int, num_slots: int = 1, conf_threshold: float = 0.5, batch_size: int = 16,
             preset: str = "paper", progress: bool = True) -> EvalResult:
    model.eval()
    meter, texts, formats, rewards = SegMetrics(), [], [], []
    order = range(0, len(dataset), batch_size)
    for start in tqdm(order, desc="eval", unit="batch", disable=not progress):
        items = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        prompts = [prompt_ids(tokenizer, it.sample.question, ref_token) for it in items]
        embeds = [model.policy.prompt_embeds(p, it.vision) for p, it in zip(prompts, items)]
        responses = generate(model.policy, tokenizer, embeds, max_new_tokens)
        _, heads = model(prompts, [it.vision for it in items], responses, [it.sam_embedding for it in items])
        for item, resp, head in zip(items, responses, heads):
            text = tokenizer.decode(resp, skip_special_tokens=True)
            texts.append(text)
            formats.append(response_format_score(text, ref_token, preset))
            pred = None if head is None else predicted_mask(head, item, img_size, num_slots, conf_threshold)
            meter.add(pred, item.sample.gt_stack.any(0), item.sample.ignore_mask)
            probs, conf = slot_probabilities(head, num_slots, lowres_side(item.sam_embedding))
            rewards.append(mask_score(probs, conf, slot_targets(item.gt_lowres, num_slots).numpy(),
                                      conf_threshold, preset))
    model.train()
    summary = meter.summary()
    summary["format_valid"] = float(np.mean([f > 0 for f in formats])) if formats else float("nan")
    summary["format_score"] = float(np.mean(formats)) if formats else float("nan")
    summary["mask_reward"] = float(np.mean(rewards)) if rewards else float("nan")
    return EvalResult(summary, texts)


def run_eval(config, checkpoint: str | None = None, split: str | None = None, limit: int | None = None,
             out: str | None = None) -> dict:
    """`segrl eval`: metrics of a checkpoint on a split, saved as JSON beside it (or at `out`)."""
    import json
    from pathlib import Path

    from config.builders import build_segmenter, feature_store

    checkpoint = checkpoint or config.resolve_path(config.model.name_or_path)
    split = split or config.data.eval_splits[0]
    model, tokenizer, img_size = build_segmenter(config, checkpoint)
    dataset = SegDataset(Path(config.resolve_path(config.data.root)) / f"{split}.parquet", feature_store(config),
                         img_size, limit=limit)
    result = evaluate(model, tokenizer, dataset, img_size, config.model.ref_token, config.sft.max_new_tokens,
                      config.model.num_slots, config.reward.confidence_threshold, preset=config.reward.preset)
    path = Path(out) if out else Path(checkpoint) / f"eval-{split}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"checkpoint": str(checkpoint), "split": split, "metrics": result.metrics,
                                "samples": result.responses[:16]}, indent=2))
    return {"split": split, "metrics": result.metrics, "path": str(path)}


def table_lines(rows: dict[str, dict]) -> list[str]:
    """A fixed-width table of the headline metrics, one row per label."""
    cols = [("format", "format_valid"), ("gIoU", "giou"), ("cIoU", "ciou"), ("N-acc", "n_acc"), ("T-acc", "t_acc"),
            ("mask-R", "mask_reward")]
    lines = [f"{'':10}" + "".join(f"{name:>8}" for name, _ in cols) + f"{'n':>6}"]
    for label, m in rows.items():
        lines.append(f"{label:10}" + "".join(f"{m.get(key, float('nan')):8.3f}" for _, key in cols) + f"{m['count']:6d}")
    return lines

"""Generate answers for a split, decode masks, and score them with the shared metrics.

A response without the reference token is a "no such object" answer (no
mask); otherwise the SegCompass head decodes K slots, the confident ones are
merged, and the mask is compared in the image frame (LISA/GSVA conventions by
default, `rewards.metrics.SegMetrics`). `mask_reward` is the training mask
reward of the greedy answers (soft IoU in SAM's low-res frame, as the reward
workers score it), so a GRPO run's reward can be compared across checkpoints.
On synthetic samples `reasoning_acc` is the share of answers whose reasoning
settles on exactly the target shapes (a refusal for a false premise), read with
the generator's own vocabulary (`data.synthetic.answers`), and `guided_giou`
is the gIoU of the masks decoded after the *reference* reasoning (teacher-forced,
as SFT trains): what the head makes of a right answer. The two split a low gIoU
into the policy's reasoning and the head.
For the READ head, target samples are also scored at each image's best
threshold (READ A.1): how much a calibrated threshold would buy.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from data.loader import SegDataset, SegItem
from data.mask_frames import lowres_side, lowres_to_image, slot_targets
from data.synthetic import DATASET as SYNTHETIC
from data.synthetic import sft_target
from data.synthetic.answers import reasoning_correct
from models.generate import generate
from models.prompt import prompt_ids
from models.segmenter import Segmenter, eval_file, require_finite, slot_probabilities
from rewards import SegMetrics, mask_score, response_format_score
from rewards.thresholds import best_threshold_iou, fixed_threshold_iou

THRESHOLD_METRICS = ("fixed_threshold_giou", "best_threshold_giou", "similarity_best_giou")
"""Means over target samples of ``threshold_search``'s three IoUs."""


@dataclass
class EvalResult:
    metrics: dict
    responses: list[str]
    per_sample: dict[str, dict] = field(default_factory=dict)  # sample id -> {"iou", "reasoning" (synthetic)}


def kept_slot_logits(head_out, sam_input_size: tuple[int, int], image_size: tuple[int, int], img_size: int,
                     num_slots: int, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(image-frame mask logits [k, H, W], their slot indices [k]) of the kept slots: all for K = 1,
    the confident ones otherwise (k may be 0)."""
    keep = torch.ones(head_out.mask_logits.shape[0], dtype=torch.bool)
    if num_slots > 1:
        keep = (torch.sigmoid(head_out.conf_logits) >= threshold).cpu()
    slots = keep.nonzero().flatten()
    if slots.numel() == 0:
        return head_out.mask_logits.new_zeros((0, *image_size)), slots
    return lowres_to_image(head_out.mask_logits[slots], sam_input_size, image_size, img_size), slots


def predicted_mask(head_out, item: SegItem, img_size: int, num_slots: int, threshold: float) -> np.ndarray:
    """Merge the kept slots into one image-frame mask."""
    size = (item.sample.height, item.sample.width)
    logits, _ = kept_slot_logits(head_out, item.sam_input_size, size, img_size, num_slots, threshold)
    return (logits > 0).any(0).numpy()


def target_pixels(item: SegItem) -> tuple[np.ndarray, np.ndarray]:
    """(GT union, pixels that count): the metrics' view of a sample."""
    gt = item.sample.gt_stack.any(0)
    ignore = item.sample.ignore_mask
    return gt, np.ones_like(gt) if ignore is None else ~ignore


def threshold_search(head_out, item: SegItem, img_size: int) -> tuple[float, float, float]:
    """IoUs of a target sample under READ's per-image threshold search (READ A.1, step 0.01).

    (mask probabilities at 0.5, the same at the image's best threshold, the <SEG>/image
    similarity map at its best threshold) in the image frame, on the pixels that count.
    No reference token (a refusal) predicts nothing: 0 for all three.
    """
    if head_out is None:
        return 0.0, 0.0, 0.0
    frame = (item.sam_input_size, (item.sample.height, item.sample.width), img_size)
    logits, heat = (t[:1].detach().float().cpu() for t in (head_out.mask_logits, head_out.heatmaps))
    probs = torch.sigmoid(lowres_to_image(logits, *frame))[0].numpy()
    similarity = lowres_to_image(heat, *frame)[0].clamp(0, 1).numpy()
    gt, valid = target_pixels(item)
    gt, probs, similarity = gt[valid][None], probs[valid][None], similarity[valid][None]
    return fixed_threshold_iou(probs, gt), best_threshold_iou(probs, gt)[1], best_threshold_iou(similarity, gt)[1]


@torch.no_grad()
def answer_batch(model: Segmenter, tokenizer, items: list[SegItem], ref_token: str, max_new_tokens: int):
    """(greedy response ids, the policy's forward over them, head outputs or None) of a batch of items."""
    prompts = [prompt_ids(tokenizer, it.sample.question, ref_token) for it in items]
    embeds = [model.policy.prompt_embeds(p, it.vision) for p, it in zip(prompts, items)]
    responses = generate(model.policy, tokenizer, embeds, max_new_tokens)
    out, heads = model(prompts, [it.vision for it in items], responses, [it.sam_embedding for it in items],
                       [it.sam_input_size for it in items])
    require_finite(out, heads, [str(it.sample.sample_id) for it in items])
    return responses, out, heads


def has_reference(item: SegItem) -> bool:
    """A synthetic sample with its reference reasoning: reasoning accuracy and the guided masks apply."""
    return item.sample.dataset == SYNTHETIC and item.sample.reasoning is not None


def teacher_forced(model: Segmenter, tokenizer, items: list[SegItem], ref_token: str):
    """(policy output, head outputs or None for a refusal) over each item's reference response,
    teacher-forced: SFT's forward, and the eval's guided masks."""
    prompts = [prompt_ids(tokenizer, it.sample.question, ref_token) for it in items]
    responses = [tokenizer(sft_target(it.sample, ref_token), add_special_tokens=False)["input_ids"]
                 + [tokenizer.eos_token_id] for it in items]
    return model(prompts, [it.vision for it in items], responses, [it.sam_embedding for it in items],
                 [it.sam_input_size for it in items])


def guided_heads(model: Segmenter, tokenizer, items: list[SegItem], ref_token: str) -> list:
    """Head outputs after the items' reference responses (``teacher_forced``), checked finite."""
    if not items:
        return []
    out, heads = teacher_forced(model, tokenizer, items, ref_token)
    require_finite(out, heads, [str(it.sample.sample_id) for it in items])
    return heads


@torch.no_grad()
def evaluate(model: Segmenter, tokenizer, dataset: SegDataset, img_size: int, ref_token: str,
             max_new_tokens: int, num_slots: int = 1, conf_threshold: float = 0.5, batch_size: int = 16,
             preset: str = "paper", progress: bool = True, threshold_metrics: bool = False) -> EvalResult:
    """Greedy answers of up to ``max_new_tokens``, scored; ``threshold_metrics`` (READ head,
    K = 1) adds ``THRESHOLD_METRICS``."""
    model.eval()
    meter, guided, texts, formats, rewards, searched = SegMetrics(), SegMetrics(), [], [], [], []
    per_sample: dict[str, dict] = {}
    order = range(0, len(dataset), batch_size)
    for start in tqdm(order, desc="eval", unit="batch", disable=not progress):
        items = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        responses, _, heads = answer_batch(model, tokenizer, items, ref_token, max_new_tokens)
        for item, resp, head in zip(items, responses, heads):
            text = tokenizer.decode(resp, skip_special_tokens=True)
            texts.append(text)
            formats.append(response_format_score(text, ref_token, preset))
            scores = per_sample[str(item.sample.sample_id)] = {}
            if has_reference(item):
                scores["reasoning"] = float(reasoning_correct(text, item.sample.reasoning, ref_token))
            pred = None if head is None else predicted_mask(head, item, img_size, num_slots, conf_threshold)
            scores["iou"] = meter.add(pred, item.sample.gt_stack.any(0), item.sample.ignore_mask)
            probs, conf = slot_probabilities(head, num_slots, lowres_side(item.sam_embedding))
            rewards.append(mask_score(probs, conf, slot_targets(item.gt_lowres, num_slots).numpy(),
                                      conf_threshold, preset))
            if threshold_metrics and np.logical_and(*target_pixels(item)).any():
                searched.append(threshold_search(head, item, img_size))
        reference = [item for item in items if has_reference(item)]
        for item, head in zip(reference, guided_heads(model, tokenizer, reference, ref_token)):
            pred = None if head is None else predicted_mask(head, item, img_size, num_slots, conf_threshold)
            guided.add(pred, item.sample.gt_stack.any(0), item.sample.ignore_mask)
    model.train()
    summary = meter.summary()
    if threshold_metrics:
        means = np.mean(searched, axis=0) if searched else [float("nan")] * len(THRESHOLD_METRICS)
        summary.update({name: float(v) for name, v in zip(THRESHOLD_METRICS, means)})
    summary["format_valid"] = float(np.mean([f > 0 for f in formats])) if formats else float("nan")
    summary["format_score"] = float(np.mean(formats)) if formats else float("nan")
    summary["mask_reward"] = float(np.mean(rewards)) if rewards else float("nan")
    reasoned = [s["reasoning"] for s in per_sample.values() if "reasoning" in s]
    if reasoned:
        summary["reasoning_acc"] = float(np.mean(reasoned))
        summary["guided_giou"] = guided.summary()["giou"]
    return EvalResult(summary, texts, per_sample)


def evaluate_with_config(config, model: Segmenter, tokenizer, dataset: SegDataset, img_size: int,
                         progress: bool = True) -> EvalResult:
    """``evaluate`` under the config's eval, model and reward settings: `segrl eval`, SFT's
    before/after and the post-GRPO evaluation generate and score alike."""
    return evaluate(model, tokenizer, dataset, img_size, config.model.ref_token, config.eval_max_new_tokens,
                    config.model.num_slots, config.reward.confidence_threshold, config.eval.batch_size,
                    config.reward.preset, progress, threshold_metrics=config.model.head.kind == "read")


def run_eval(config, checkpoint: str | None = None, split: str | None = None, limit: int | None = None,
             out: str | None = None, baselines: bool = False) -> dict:
    """`segrl eval`: metrics of a checkpoint on a split, saved as JSON beside it (or at `out`);
    ``baselines`` adds the trivial baselines' metrics on the same samples (synthetic splits)."""
    from config.builders import build_segmenter, config_for_model, feature_store
    from pipelines.baselines import split_baselines

    checkpoint = checkpoint or config.resolve_path(config.model.name_or_path)
    config = config_for_model(config, checkpoint)  # an export scores under the settings it records
    split = split or config.data.eval_splits[0]
    split_file = Path(config.resolve_path(config.data.root)) / f"{split}.parquet"
    trivial = split_baselines(split_file, limit, config.seed) if baselines else {}
    model, tokenizer, img_size = build_segmenter(config, checkpoint)
    dataset = SegDataset(split_file, feature_store(config), img_size, limit=limit)
    result = evaluate_with_config(config, model, tokenizer, dataset, img_size)
    path = write_eval(Path(out) if out else eval_file(checkpoint, split), checkpoint, split, result, trivial)
    return {"split": split, "metrics": result.metrics, "baselines": trivial, "path": str(path)}


def write_eval(path: Path, checkpoint, split: str, result: EvalResult, baselines: dict | None = None) -> Path:
    """An evaluation as JSON: metrics, baselines, the first answers and every sample's scores (what
    ``paired_change`` compares two checkpoints by)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"checkpoint": str(checkpoint), "split": split, "metrics": result.metrics,
                                "baselines": baselines or {}, "samples": result.responses[:16],
                                "per_sample": result.per_sample}, indent=2))
    return path


def table_lines(rows: dict[str, dict]) -> list[str]:
    """A fixed-width table of the headline metrics, one row per label; READ's threshold search
    (over target samples: at 0.5, at the best threshold, similarity map) when a row has it."""
    cols = [("format", "format_valid"), ("gIoU", "giou"), ("cIoU", "ciou"), ("N-acc", "n_acc"), ("T-acc", "t_acc"),
            ("reason", "reasoning_acc"), ("guided", "guided_giou"), ("mask-R", "mask_reward")]
    if any(THRESHOLD_METRICS[0] in m for m in rows.values()):
        cols += list(zip(("tgt@.5", "tgt@t*", "sim@t*"), THRESHOLD_METRICS))
    lines = [f"{'':10}" + "".join(f"{name:>8}" for name, _ in cols) + f"{'n':>6}"]
    for label, m in rows.items():
        values = "".join(f"{m.get(key, float('nan')):8.3f}" for _, key in cols)
        lines.append(f"{label:10}" + values + f"{m['count']:6d}")
    return lines

"""Pretraining the tiny SAM: a promptable segmenter, as the real SAM arrives.

A randomly initialised tiny SAM prompted with an object's box returns noise
(mean IoU 0.03), so every head that decodes through it would learn against a
broken decoder. Here the whole model (image encoder, prompt encoder, mask
decoder) is trained as SAM was (Kirillov et al. 2023, appendix A), on fresh
random shape scenes whose instance masks are exact:

- each object gets a box or one positive point, with equal probability; a box is
  the mask's extent with noise of std 10% of its side (at most `BOX_JITTER_MAX_PX`),
  a point is uniform inside the mask;
- a single point is ambiguous: the three multimask outputs are scored and only the
  lowest loss is backpropagated; a box trains the single-mask output;
- mask prompts: the same prompt decoded again with the first prediction's low-res
  logits as dense prompt (SAM's iterative step), and a mask-only prompt made from
  a coarse, noisy GT (the kind of heatmap the SegCompass head feeds SAM);
- loss: focal + dice at 20:1, plus the IoU head's MSE to each output's real IoU.

Images pass `models.sam.sam_preprocess`, the feature cache's preprocessing, so the
encoder learns on exactly the inputs it later embeds. Everything is drawn from
numpy Generators seeded by the spec; torch's global RNG is not touched.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional as F
from tqdm import tqdm

from data.synthetic.scene import Scene, random_scene
from models.sam import sam_preprocess
from models.tiny_specs import TinySamPretrainSpec

FOCAL_WEIGHT, DICE_WEIGHT = 20.0, 1.0  # SAM's 20:1
# Focal alpha weighs the object's pixels: 0.75 here (SAM 2's code has 0.25). With 0.25 the tiny SAM sat longer
# predicting empty masks (seed 1: held-out box IoU 0.09 after 200 steps, 0.91 after 1,100; with 0.75: 0.28, 0.95).
FOCAL_ALPHA, FOCAL_GAMMA = 0.75, 2.0
BOX_JITTER_FRAC, BOX_JITTER_MAX_PX = 0.1, 20.0  # SAM: std 10% of the side, at most 20 px (of 1024)
MASK_THRESHOLD = 0.0  # SAM's: a pixel is in the mask where the logit is positive
SINGLE, MULTI = [0], [1, 2, 3]  # mask-token outputs: single-mask, and the three ambiguity-aware ones


# ---- prompts -------------------------------------------------------------------------------------------------------

def mask_box(mask: np.ndarray) -> np.ndarray:
    """Inclusive pixel extent of a bool mask as SAM's XYXY box (as its `batched_mask_to_box`)."""
    ys, xs = np.nonzero(mask)
    return np.array([xs.min(), ys.min(), xs.max(), ys.max()], np.float32)


def jitter_box(box: np.ndarray, rng: np.random.Generator, image_size: int) -> np.ndarray:
    """SAM's box noise: each coordinate moved by N(0, 10% of the side, capped), kept ordered inside the image."""
    side = np.array([box[2] - box[0] + 1, box[3] - box[1] + 1] * 2, np.float64)
    noise = np.clip(rng.normal(0.0, BOX_JITTER_FRAC * side), -BOX_JITTER_MAX_PX, BOX_JITTER_MAX_PX)
    x0, y0, x1, y1 = np.clip(box + noise, 0, image_size - 1)
    return np.array([min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)], np.float32)


def sample_point(mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(x, y) of a pixel drawn uniformly from the mask (the prompt encoder adds 0.5: its centre)."""
    ys, xs = np.nonzero(mask)
    i = rng.integers(len(xs))
    return np.array([xs[i], ys[i]], np.float32)


def noisy_mask_prompts(masks: torch.Tensor, rng: np.random.Generator, grid: int, side: int) -> torch.Tensor:
    """Coarse, noisy GT masks [k, S, S] as mask-prompt logits [k, side, side]: each averaged over
    the embedding grid, upsampled, shifted by up to half a grid cell, thresholded at 30-60% of its
    peak, scaled by a random gain and noised."""
    k, half = masks.shape[0], side // grid // 2
    coarse = F.adaptive_avg_pool2d(masks[:, None].float(), grid)
    up = F.interpolate(coarse, size=(side, side), mode="bilinear", align_corners=False)[:, 0]
    shifts = rng.integers(-half, half + 1, size=(k, 2))
    up = torch.stack([torch.roll(u, (int(dy), int(dx)), (0, 1)) for u, (dy, dx) in zip(up, shifts)])
    peak = up.flatten(1).max(1).values.view(k, 1, 1)
    level = torch.from_numpy(rng.uniform(0.3, 0.6, size=(k, 1, 1))).float() * peak
    gain = torch.from_numpy(rng.uniform(4.0, 16.0, size=(k, 1, 1))).float() / peak.clamp(min=1e-3)
    return gain * (up - level) + torch.from_numpy(rng.normal(0.0, 1.0, size=up.shape)).float()


# ---- losses --------------------------------------------------------------------------------------------------------

def focal_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Sigmoid focal loss, mean over the last two (pixel) dims."""
    ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p = torch.sigmoid(logits)
    p_t = p * target + (1 - p) * (1 - target)
    alpha_t = FOCAL_ALPHA * target + (1 - FOCAL_ALPHA) * (1 - target)
    return (alpha_t * ce * (1 - p_t) ** FOCAL_GAMMA).flatten(-2).mean(-1)


def dice_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 - soft Dice over the last two (pixel) dims."""
    p, t = torch.sigmoid(logits).flatten(-2), target.flatten(-2)
    return 1 - (2 * (p * t).sum(-1) + 1) / (p.sum(-1) + t.sum(-1) + 1)


def mask_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return FOCAL_WEIGHT * focal_loss(logits, target) + DICE_WEIGHT * dice_loss(logits, target)


def mask_iou(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """IoU of the thresholded logits with a binary target, over the last two dims (empty vs empty = 1)."""
    pred, gt = logits > MASK_THRESHOLD, target > 0.5
    inter = (pred & gt).flatten(-2).sum(-1).float()
    union = (pred | gt).flatten(-2).sum(-1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


# ---- model pieces --------------------------------------------------------------------------------------------------

def decode_all(decoder: torch.nn.Module, embeddings: torch.Tensor, image_pe: torch.Tensor, sparse: torch.Tensor,
               dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`MaskDecoder.predict_masks` with an image embedding per prompt: all four outputs.

    The stock decoder repeats one image's embedding for its prompts; a training batch
    mixes images, so embeddings is [N, C, h, w] beside sparse [N, n, C] and dense [N, C, h, w].
    Returns low-res mask logits [N, 4, 4h, 4w] and predicted IoUs [N, 4].
    """
    out_tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], 0)
    tokens = torch.cat([out_tokens.expand(sparse.shape[0], -1, -1), sparse], 1)
    src = embeddings + dense
    b, c, h, w = src.shape
    hs, src = decoder.transformer(src, image_pe.expand(b, -1, -1, -1), tokens)
    upscaled = decoder.output_upscaling(src.transpose(1, 2).reshape(b, c, h, w))
    hyper = torch.stack([mlp(hs[:, 1 + i]) for i, mlp in enumerate(decoder.output_hypernetworks_mlps)], 1)
    masks = (hyper @ upscaled.flatten(2)).unflatten(-1, upscaled.shape[-2:])
    return masks, decoder.iou_prediction_head(hs[:, 0])


def to_image(low: torch.Tensor, image_size: int) -> torch.Tensor:
    """Low-res logits [..., L, L] -> the image frame [..., S, S], as `Sam.postprocess_masks` (square, unpadded)."""
    if low.shape[-1] == image_size:
        return low
    lead = low.shape[:-2]
    up = F.interpolate(low.reshape(-1, 1, *low.shape[-2:]), size=(image_size, image_size), mode="bilinear",
                       align_corners=False)
    return up.reshape(*lead, image_size, image_size)


def encode_images(sam: torch.nn.Module, scenes: list[Scene]) -> torch.Tensor:
    """SAM image embeddings [B, C, h, w] of scenes, preprocessed as the feature cache does."""
    size = sam.image_encoder.img_size
    return sam.image_encoder(torch.stack([sam_preprocess(s.image, size)[0] for s in scenes]))


# ---- training ------------------------------------------------------------------------------------------------------

@dataclass
class Objects:
    """The objects of a batch of scenes with one drawn prompt each, boxes first, then points."""

    image: torch.Tensor  # [N] index of the owning scene in the batch
    target: torch.Tensor  # [N, S, S] float GT
    boxes: torch.Tensor  # [B, 4] jittered boxes of the first B objects
    points: torch.Tensor  # [N - B, 1, 2] one positive point for each of the others

    def __len__(self) -> int:
        return self.image.shape[0]

    def outputs(self) -> torch.Tensor:
        """[N, 3] decoder outputs trained per prompt: the single-mask one (three times) for a box, the three
        ambiguity-aware ones for a point."""
        b = self.boxes.shape[0]
        return torch.tensor([SINGLE * 3] * b + [MULTI] * (len(self) - b), dtype=torch.int64).reshape(-1, 3)


def draw_objects(scenes: list[Scene], rng: np.random.Generator) -> Objects:
    """Every object of the scenes, each with a box (probability 1/2) or a positive point."""
    rows = [(i, shape.mask) for i, scene in enumerate(scenes) for shape in scene.shapes]
    is_box = rng.random(len(rows)) < 0.5
    rows = [r for r, box in zip(rows, is_box) if box] + [r for r, box in zip(rows, is_box) if not box]
    b, size = int(is_box.sum()), scenes[0].size
    boxes = [jitter_box(mask_box(m), rng, size) for _, m in rows[:b]]
    points = [sample_point(m, rng) for _, m in rows[b:]]
    return Objects(
        image=torch.tensor([i for i, _ in rows]),
        target=torch.from_numpy(np.stack([m for _, m in rows])).float(),
        boxes=torch.from_numpy(np.stack(boxes)) if boxes else torch.zeros(0, 4),
        points=torch.from_numpy(np.stack(points))[:, None] if points else torch.zeros(0, 1, 2),
    )


def embed_prompts(prompt_encoder: torch.nn.Module, objs: Objects, index: torch.Tensor,
                  masks: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sparse [k, 2, C] and dense [k, C, h, w] embeddings of the prompts of objects `index` (ascending,
    so its boxes come first), with mask prompts [k, L, L] if given."""
    b = objs.boxes.shape[0]
    box_rows, point_rows = index[index < b], index[index >= b] - b
    dense_in = [None, None] if masks is None else masks[:, None].split([len(box_rows), len(point_rows)])
    parts = []
    if len(box_rows):
        parts.append(prompt_encoder(points=None, boxes=objs.boxes[box_rows], masks=dense_in[0]))
    if len(point_rows):
        labels = torch.ones(len(point_rows), 1, dtype=torch.int64)
        parts.append(prompt_encoder(points=(objs.points[point_rows], labels), boxes=None, masks=dense_in[1]))
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def prompt_losses(masks: torch.Tensor, iou_pred: torch.Tensor, target: torch.Tensor, outputs: torch.Tensor,
                  image_size: int) -> torch.Tensor:
    """Per prompt: the mask loss of the best of its `outputs` [N, k] (SAM's rule for an ambiguous
    prompt; a single output otherwise) plus the IoU head's MSE over those outputs."""
    index = outputs[..., None, None].expand(-1, -1, *masks.shape[-2:])
    logits = to_image(masks.gather(1, index), image_size)  # [N, k, S, S]
    losses = mask_loss(logits, target[:, None].expand_as(logits))
    iou = mask_iou(logits.detach(), target[:, None])
    return losses.min(1).values + (iou_pred.gather(1, outputs) - iou).pow(2).mean(-1)


def _subset(rng: np.random.Generator, n: int, fraction: float) -> torch.Tensor:
    return torch.from_numpy(np.sort(rng.permutation(n)[: round(fraction * n)]))


def train_step(sam: torch.nn.Module, scenes: list[Scene], rng: np.random.Generator,
               settings: TinySamPretrainSpec) -> torch.Tensor:
    """Mean loss per object: its box/point prompt, then for a random part of the objects the same
    prompt with the first prediction as mask prompt, and for another a coarse noisy GT mask alone."""
    prompt_encoder, decoder = sam.prompt_encoder, sam.mask_decoder
    grid, side = prompt_encoder.image_embedding_size[0], prompt_encoder.mask_input_size[0]
    size = sam.image_encoder.img_size
    objs = draw_objects(scenes, rng)
    n = len(objs)
    embeddings = encode_images(sam, scenes)[objs.image]
    image_pe = prompt_encoder.get_dense_pe()
    everyone = torch.arange(n)
    masks, iou_pred = decode_all(decoder, embeddings, image_pe, *embed_prompts(prompt_encoder, objs, everyone))
    outputs = objs.outputs()
    total = prompt_losses(masks, iou_pred, objs.target, outputs, size).sum()

    single = torch.full((n, 1), SINGLE[0])
    refine = _subset(rng, n, settings.refine_fraction)
    if len(refine):
        chosen = outputs.gather(1, iou_pred.detach().gather(1, outputs).argmax(1, keepdim=True))  # as the predictor
        previous = masks.detach().gather(1, chosen[..., None, None].expand(-1, -1, side, side))[refine, 0]
        prompts = embed_prompts(prompt_encoder, objs, refine, previous)
        low, iou = decode_all(decoder, embeddings[refine], image_pe, *prompts)
        total = total + prompt_losses(low, iou, objs.target[refine], single[refine], size).sum()
    alone = _subset(rng, n, settings.mask_prompt_fraction)
    if len(alone):
        noisy = noisy_mask_prompts(objs.target[alone], rng, grid, side)
        sparse, dense = prompt_encoder(points=None, boxes=None, masks=noisy[:, None])
        low, iou = decode_all(decoder, embeddings[alone], image_pe, sparse, dense)
        total = total + prompt_losses(low, iou, objs.target[alone], single[alone], size).sum()
    return total / n


def _lr_factor(step: int, steps: int, warmup: int) -> float:
    """Linear warm-up, then cosine decay to zero."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + np.cos(np.pi * (step - warmup) / max(1, steps - warmup)))


# ---- evaluation (stock segment_anything calls) ---------------------------------------------------------------------

@torch.no_grad()
def evaluate(sam: torch.nn.Module, scenes: list[Scene], rng: np.random.Generator) -> dict[str, float]:
    """Mean IoU over every object of `scenes`, prompted through SAM's own prompt encoder and
    mask decoder: with its exact box (single-mask output) and with one positive point
    (multimask, the output of highest predicted IoU, as SAM's predictor picks)."""
    size = sam.image_encoder.img_size
    image_pe = sam.prompt_encoder.get_dense_pe()
    ious: dict[str, list[torch.Tensor]] = {"box_iou": [], "point_iou": []}
    for scene, embedding in zip(scenes, encode_images(sam, scenes)):
        target = torch.from_numpy(np.stack([s.mask for s in scene.shapes])).float()
        boxes = torch.from_numpy(np.stack([mask_box(s.mask) for s in scene.shapes]))
        points = torch.from_numpy(np.stack([sample_point(s.mask, rng) for s in scene.shapes]))[:, None]
        labels = torch.ones(len(points), 1, dtype=torch.int64)
        for name, prompt, multimask in [("box_iou", {"points": None, "boxes": boxes}, False),
                                        ("point_iou", {"points": (points, labels), "boxes": None}, True)]:
            sparse, dense = sam.prompt_encoder(**prompt, masks=None)
            low, iou_pred = sam.mask_decoder(image_embeddings=embedding[None], image_pe=image_pe,
                                             sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                             multimask_output=multimask)
            best = low[torch.arange(len(low)), iou_pred.argmax(1)]
            ious[name].append(mask_iou(to_image(best, size), target))
    return {name: torch.cat(values).mean().item() for name, values in ious.items()}


@dataclass(frozen=True)
class SamPretrainReport:
    steps: int
    seconds: float  # wall clock of the training loop
    cpu_seconds: float  # its process CPU time (one thread): the cost on one core, whatever else runs
    box_iou: float  # held-out mean IoU, exact GT box, single-mask output
    point_iou: float  # held-out mean IoU, one positive point, multimask output of highest predicted IoU
    eval_objects: int

    def as_dict(self) -> dict:
        return {"steps": self.steps, "seconds": round(self.seconds, 1), "cpu_seconds": round(self.cpu_seconds, 1),
                "box_iou": round(self.box_iou, 4), "point_iou": round(self.point_iou, 4),
                "eval_objects": self.eval_objects}


def pretrain_sam(sam: torch.nn.Module, settings: TinySamPretrainSpec, seed: int,
                 progress: bool = True) -> SamPretrainReport:
    """Train `sam` in place on fresh random scenes (one thread), then measure it on held-out ones."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _pretrain(sam, settings, seed, progress)
    finally:
        torch.set_num_threads(threads)


def _pretrain(sam: torch.nn.Module, settings: TinySamPretrainSpec, seed: int, progress: bool) -> SamPretrainReport:
    size = sam.image_encoder.img_size
    train_rng = np.random.default_rng([seed, settings.seed_offset, 0])
    eval_rng = np.random.default_rng([seed, settings.seed_offset, 1])
    optimizer = torch.optim.AdamW(sam.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: _lr_factor(step, settings.steps, settings.warmup_steps))
    sam.train()
    start, cpu_start = time.perf_counter(), time.process_time()
    bar = tqdm(range(settings.steps), desc="make-tiny: SAM", unit="step", disable=not progress)
    for step in bar:
        scenes = [random_scene(train_rng, size) for _ in range(settings.batch_images)]
        loss = train_step(sam, scenes, train_rng, settings)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(sam.parameters(), settings.grad_clip)
        optimizer.step()
        schedule.step()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    sam.eval()
    scenes = [random_scene(eval_rng, size) for _ in range(settings.eval_scenes)]
    metrics = evaluate(sam, scenes, eval_rng)
    return SamPretrainReport(settings.steps, seconds, cpu_seconds, metrics["box_iou"], metrics["point_iou"],
                             sum(len(s.shapes) for s in scenes))

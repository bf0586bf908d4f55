"""Pretraining the tiny vision tower: what CLIP gives LLaVA, on synthetic scenes.

A frozen CLIP ViT hands LLaVA patch features from which a linear map reads what
is where. A randomly initialised tiny ViT does not (a linear probe read shape
kind per patch at 15%, below the 29% majority class), so the tiny policy could
not learn to name what it sees. Here the tower learns, on fresh random scenes,
to put into every patch the attributes of the object covering it: colour,
kind, size and the 3x3 grid cell of that object's centre (the position words
the reasoning uses), or background. The heads are linear, so their held-out
accuracy is a linear probe of the frozen features; they are discarded after.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from tqdm import tqdm

from data.synthetic import COLOURS, KINDS, SIZES, Scene, random_scene
from data.synthetic.phrases import grid_cell
from models.tiny_specs import TinyVisionPretrainSpec
from models.vision import CLIP_MEAN, CLIP_STD, TinyVisionEncoder

COVER = 0.25
"""A patch belongs to the object covering at least this fraction of its pixels, else to the background."""

# Per-patch label sets; index 0 is "background" in each.
ATTRIBUTES = {
    "colour": ("background", *COLOURS),
    "kind": ("background", *KINDS),
    "size": ("background", *SIZES),
    "cell": ("background", *(f"{r}{c}" for r in range(3) for c in range(3))),
}


def patch_labels(scene: Scene, patch: int) -> dict[str, np.ndarray]:
    """Per attribute, [grid*grid] int labels (row-major patches, as the ViT emits them)."""
    grid = scene.size // patch
    labels = {name: np.zeros(grid * grid, np.int64) for name in ATTRIBUTES}
    best = np.zeros(grid * grid)
    for shape in scene.shapes:
        cover = shape.mask.reshape(grid, patch, grid, patch).mean(axis=(1, 3)).reshape(-1)
        take = (cover >= COVER) & (cover > best)
        best = np.where(take, cover, best)
        row, col = grid_cell(shape, scene.size)
        values = {"colour": ATTRIBUTES["colour"].index(shape.colour), "kind": ATTRIBUTES["kind"].index(shape.kind),
                  "size": ATTRIBUTES["size"].index(shape.size), "cell": 1 + 3 * row + col}
        for name, value in values.items():
            labels[name][take] = value
    return labels


def normalise(images: np.ndarray) -> torch.Tensor:
    """uint8 [B, S, S, 3] -> CLIP-normalised [B, 3, S, S]: the feature cache's preprocessing at the tower's size."""
    pixels = torch.from_numpy(images).float().permute(0, 3, 1, 2) / 255.0
    return (pixels - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)


def scene_batch(rng: np.random.Generator, n: int, image_size: int, patch: int):
    """(normalised pixels [n, 3, S, S], {attribute: labels [n, grid*grid]}) of n fresh scenes."""
    scenes = [random_scene(rng, image_size) for _ in range(n)]
    labels = [patch_labels(s, patch) for s in scenes]
    return (normalise(np.stack([s.image for s in scenes])),
            {name: torch.from_numpy(np.stack([lab[name] for lab in labels])) for name in ATTRIBUTES})


class PatchProbes(nn.Module):
    """One linear classifier per attribute over the patch features."""

    def __init__(self, dim: int):
        super().__init__()
        self.heads = nn.ModuleDict({name: nn.Linear(dim, len(values)) for name, values in ATTRIBUTES.items()})

    def forward(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        return {name: head(features) for name, head in self.heads.items()}


@dataclass(frozen=True)
class VisionPretrainReport:
    steps: int
    seconds: float
    object_patch_accuracy: dict[str, float]  # held-out, patches covered by an object
    background_accuracy: float  # held-out, patches of the background (colour head)

    def as_dict(self) -> dict:
        return {"steps": self.steps, "seconds": round(self.seconds, 1),
                "object_patch_accuracy": {k: round(v, 4) for k, v in self.object_patch_accuracy.items()},
                "background_accuracy": round(self.background_accuracy, 4)}


@torch.no_grad()
def probe_accuracy(encoder: TinyVisionEncoder, probes: PatchProbes, pixels: torch.Tensor,
                   labels: dict[str, torch.Tensor]) -> tuple[dict[str, float], float]:
    logits = probes(encoder(pixels))
    on_object = labels["colour"] > 0
    accuracy = {name: float((logits[name].argmax(-1) == labels[name])[on_object].float().mean())
                for name in ATTRIBUTES}
    background = float((logits["colour"].argmax(-1) == 0)[~on_object].float().mean())
    return accuracy, background


def pretrain_vision(encoder: TinyVisionEncoder, spec: TinyVisionPretrainSpec, seed: int,
                    progress: bool = True) -> VisionPretrainReport:
    """Train `encoder` in place on per-patch attributes of fresh scenes; held-out accuracy of linear probes."""
    size, patch = encoder.spec.image_size, encoder.spec.patch_size
    torch.manual_seed(seed)
    rng = np.random.default_rng([seed, 101])
    probes = PatchProbes(encoder.spec.hidden_size)
    params = [*encoder.parameters(), *probes.parameters()]
    optimizer = torch.optim.AdamW(params, lr=spec.lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, spec.lr, total_steps=spec.steps, pct_start=0.1)
    encoder.train()
    start = time.perf_counter()
    for _ in tqdm(range(spec.steps), desc="make-tiny: vision tower", disable=not progress):
        pixels, labels = scene_batch(rng, spec.batch_size, size, patch)
        logits = probes(encoder(pixels))
        loss = sum(F.cross_entropy(logits[n].flatten(0, 1), labels[n].flatten()) for n in ATTRIBUTES)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
    seconds = time.perf_counter() - start
    encoder.eval()
    pixels, labels = scene_batch(np.random.default_rng([seed, 102]), spec.eval_scenes, size, patch)
    accuracy, background = probe_accuracy(encoder, probes, pixels, labels)
    return VisionPretrainReport(spec.steps, seconds, accuracy, background)

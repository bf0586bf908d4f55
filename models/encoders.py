"""The frozen encoders run once per image by the feature cache (never in training)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from models.export_format import EXPORT_CONFIG
from models.sam import load_sam, sam_preprocess
from models.vision import load_vision_tower


def sam_checkpoint(variant: str, checkpoint: str | None, model_path: str) -> str | None:
    """An export's SAM is its own ``sam/``, whatever the config names (the folder says its variant);
    a tiny SAM lives in make-tiny's folder unless a checkpoint is named."""
    if (Path(model_path) / EXPORT_CONFIG).is_file() and (Path(model_path) / "sam" / "config.json").is_file():
        return str(Path(model_path) / "sam")
    if checkpoint is None and variant == "tiny":
        return str(Path(model_path) / "sam")
    return checkpoint


class FrozenEncoders:
    """Vision tower (features for the LLM) + SAM image encoder (embedding for the mask decoder)."""

    def __init__(self, family: str, model_path: str, sam_variant: str, sam_ckpt: str | None,
                 pixel_bounds: tuple[int | None, int | None] = (None, None)):
        self.vision = load_vision_tower(family, model_path, pixel_bounds)
        sam = load_sam(sam_variant, sam_checkpoint(sam_variant, sam_ckpt, model_path))
        self.sam_encoder = sam.image_encoder.requires_grad_(False)
        self.sam_size = sam.image_encoder.img_size

    @torch.no_grad()
    def __call__(self, images: list[np.ndarray]) -> list[dict[str, torch.Tensor]]:
        """RGB uint8 images -> one feature dict per image (see data.features).

        "vision" is [N, Dv], or for Qwen2.5-VL a [t, h, w, Dv] patch grid (its shape carries the grid).
        """
        vision = self.vision(images)
        prepped = [sam_preprocess(img, self.sam_size) for img in images]
        sam = self.sam_encoder(torch.stack([x for x, _ in prepped]))
        return [
            {
                "vision": vision[i].float(),
                "sam": sam[i].float(),
                "sam_input_size": torch.tensor(prepped[i][1], dtype=torch.int32),
                "original_size": torch.tensor(img.shape[:2], dtype=torch.int32),
            }
            for i, img in enumerate(images)
        ]

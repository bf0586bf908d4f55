"""A checkpoint's greedy answers on the first samples of a split, as arrays to draw and score.

What `segrl plot` draws in its sample grids and `segrl analyze` correlates: per sample the
image, the GT, the answer, the predicted mask and the head's heatmap in the image frame
(both through the evaluation path: ``pipelines.evaluate``), and for the SegCompass head the
activation over the image tokens of the SAE features its reference token fired.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from config import Config
from config.builders import build_segmenter, feature_store
from data.loader import SegDataset, SegItem
from data.mask_frames import lowres_to_image
from data.schema import resolve_image
from pipelines.evaluate import answer_batch, predicted_mask


@dataclass
class SampleView:
    sample_id: str
    question: str
    answer: str
    image: np.ndarray  # [H, W, 3] uint8
    gt: np.ndarray  # [H, W] bool, the union of the GT objects
    ignore: np.ndarray | None  # [H, W] bool pixels that count nowhere, or None
    mask: np.ndarray | None  # [H, W] bool predicted mask; None: the answer has no reference token
    heatmap: np.ndarray | None  # [H, W] the head's heatmap (max over slots) in the image frame
    heat_mask: np.ndarray | None  # [H, W] bool, the heatmap merged and thresholded as the mask is
    concepts: np.ndarray | None  # [h, w] image-token activation of the reference token's SAE features

    @property
    def has_target(self) -> bool:
        return bool(self.gt.any())


def concept_map(sae, layer_image_states: torch.Tensor, head_out) -> np.ndarray:
    """Σ over the first reference token's active SAE features of their activation at each image token.

    ``layer_image_states`` [N, d] are the layer-k states of the image tokens (the SAE's input
    layer); the map is [√N, √N] for a square token grid, else one row of N.
    """
    ids = head_out.sae_ids[0][head_out.sae_acts[0] > 0]
    acts = sae.encode(layer_image_states)[:, ids].sum(-1).float().numpy()
    side = math.isqrt(acts.size)
    return acts.reshape(side, side) if side * side == acts.size else acts[None]


def view_of(item: SegItem, split_file: Path, answer: str, head_out, img_size: int, config: Config,
            concepts: np.ndarray | None) -> SampleView:
    sample = item.sample
    with Image.open(resolve_image(split_file, sample.image_path)) as img:
        image = np.asarray(img.convert("RGB"))
    mask = heatmap = heat_mask = None
    if head_out is not None:
        slots, threshold = config.model.num_slots, config.reward.confidence_threshold
        mask = predicted_mask(head_out, item, img_size, slots, threshold)
        heat_mask = predicted_mask(dataclasses.replace(head_out, mask_logits=head_out.heatmaps), item, img_size,
                                   slots, threshold)
        frame = (item.sam_input_size, (sample.height, sample.width), img_size)
        heatmap = lowres_to_image(head_out.heatmaps.float(), *frame).amax(0).numpy()
    return SampleView(sample.sample_id, sample.question, answer, image, sample.gt_stack.any(0), sample.ignore_mask,
                      mask, heatmap, heat_mask, concepts)


@torch.no_grad()
def sample_views(config: Config, checkpoint: str | Path, split: str, limit: int) -> list[SampleView]:
    """Views of the first ``limit`` samples of ``split`` answered by ``checkpoint`` under ``config``."""
    model, tokenizer, img_size = build_segmenter(config, str(checkpoint))
    model.eval()
    split_file = Path(config.resolve_path(config.data.root)) / f"{split}.parquet"
    dataset = SegDataset(split_file, feature_store(config), img_size, limit=limit)
    sae = getattr(model.head, "sae", None)
    views = []
    for start in range(0, len(dataset), config.eval.batch_size):
        items = [dataset[i] for i in range(start, min(start + config.eval.batch_size, len(dataset)))]
        responses, out, heads = answer_batch(model, tokenizer, items, config.model.ref_token,
                                             config.eval_max_new_tokens)
        for i, (item, response, head_out) in enumerate(zip(items, responses, heads)):
            concepts = None
            if sae is not None and head_out is not None:
                start_tok, end_tok = out.image_spans[i]
                concepts = concept_map(sae, out.layer_hidden[i, start_tok:end_tok], head_out)
            answer = tokenizer.decode(response, skip_special_tokens=True)
            views.append(view_of(item, split_file, answer, head_out, img_size, config, concepts))
    return views

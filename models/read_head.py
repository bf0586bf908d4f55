"""READ as a trainable segmentation head with the SegCompass head's call contract.

Per response with a reference token (READ, CVPR 2025; the pure steps live in
models.read):

1. the similarity map between the `<SEG>` last-layer state and the image-token
   states picks labelled SAM points (Similarity as Points, then DtoC); the
   selection is a sort, so it carries no gradient, as in READ;
2. a trainable projection of the `<SEG>` state is appended to the point tokens
   as SAM's text prompt;
3. SAM's prompt encoder + mask decoder decode one mask on the cached image
   embedding, for a whole batch at once. Gradients reach the LM through that
   projection (and through the similarity map in `heatmaps`, which no loss uses).

Where the map lies in SAM's frame follows the policy's token grid
(``models.image_grid``: a square-padding tower's or Qwen2.5-VL's whole-image grid)
and the image's ``sam_input_size``: SAM pads bottom-right, LLaVA to a centred
square, so on a non-square image the two frames differ (``models.read.MapPlacement``).
"""
from __future__ import annotations

from collections import defaultdict

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from models.image_grid import TokenGrid
from models.read import MapPlacement, ReadParams, ReadPrompts, read_prompts
from models.sam import decode_per_prompt
from models.seghead import SegHeadOutput


class ReadHead(nn.Module):
    """Projection of the `<SEG>` state + SAM prompt encoder and mask decoder; no SAE, one mask."""

    kind = "read"
    policy_inputs = ("ref_hidden", "image_hidden", "image_grids")  # PolicyOutput fields the Segmenter passes

    def __init__(self, sam: nn.Module, lm_dim: int, params: ReadParams = ReadParams()):
        super().__init__()
        sam_dim = sam.prompt_encoder.embed_dim
        self.projection = nn.Sequential(nn.Linear(lm_dim, lm_dim), nn.ReLU(), nn.Linear(lm_dim, sam_dim))
        self.prompt_encoder, self.mask_decoder = sam.prompt_encoder, sam.mask_decoder
        self.params = params

    def param_modules(self) -> dict[str, nn.Module]:
        """One learning-rate role: READ trains the projection with SAM's decoder side."""
        return {"mask_decoder": nn.ModuleList([self.projection, self.prompt_encoder, self.mask_decoder])}

    def decode_batch(self, ref_hidden: list[torch.Tensor], image_hidden: list[torch.Tensor],
                     image_grids: list[TokenGrid | None], sam_embeddings: list[torch.Tensor],
                     sam_input_sizes: list[tuple[int, int]] | None = None) -> list[SegHeadOutput]:
        """``forward`` for B samples. Points are picked per image (a sort); the prompt encoder and
        mask decoder then run once for all samples with the same number of points (one group
        unless the token grids differ), not once per sample (`bench/read_decode.py` times both),
        and under ZeRO-3 each module call is a parameter gather. A sample's mask does not depend
        on its batch: samples with other point counts are decoded apart, never padded."""
        sizes = sam_input_sizes or [None] * len(ref_hidden)
        seg = [self._seg_state(r, g, image.shape[0]) for r, g, image in zip(ref_hidden, image_grids, image_hidden)]
        prompts = [read_prompts(s, image, (g.rows, g.cols), self._placement(g, size), self.params)
                   for s, image, g, size in zip(seg, image_hidden, image_grids, sizes)]
        groups: dict[int, list[int]] = defaultdict(list)
        for i, p in enumerate(prompts):
            groups[len(p.labels)].append(i)
        decoded: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for members in groups.values():
            low, iou = self._decode(torch.stack([seg[i] for i in members]), [prompts[i] for i in members],
                                    torch.stack([sam_embeddings[i] for i in members]))
            decoded.update({i: (low[j:j + 1], iou[j:j + 1]) for j, i in enumerate(members)})
        return [self._output(*decoded[i], prompts[i].sim, ref_hidden[i].shape[0]) for i in range(len(prompts))]

    def forward(self, ref_hidden: torch.Tensor, image_hidden: torch.Tensor, sam_embedding: torch.Tensor,
                grid: TokenGrid | None, sam_input_size: tuple[int, int] | None = None) -> SegHeadOutput:
        """ref_hidden [n_ref, H] and image_hidden [N, H] last layer; sam_embedding [C, h, w]; the
        image's token grid and its extent in SAM's frame (None: the whole square frame).

        The first reference token is decoded (K = 1).
        """
        return self.decode_batch([ref_hidden], [image_hidden], [grid], [sam_embedding], [sam_input_size])[0]

    @staticmethod
    def _seg_state(ref_hidden: torch.Tensor, grid: TokenGrid | None, n_image: int) -> torch.Tensor:
        if ref_hidden.shape[0] == 0:
            raise ValueError("no reference token in the response: a false-premise answer has no mask to decode")
        if grid is None:
            raise ValueError(f"{n_image} image tokens are not a square grid: READ needs the token "
                             "grid, which only a square-padding tower or Qwen2.5-VL's patch grid gives")
        return ref_hidden[0]

    def _placement(self, grid: TokenGrid, sam_input_size: tuple[int, int] | None) -> MapPlacement:
        return MapPlacement.of(sam_input_size or tuple(self.prompt_encoder.input_image_size), grid.padded_square)

    def _decode(self, seg: torch.Tensor, prompts: list[ReadPrompts],
                sam_embeddings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mask logits [B, 4h, 4w], predicted IoU [B]) of B samples with as many points each."""
        device = sam_embeddings.device
        points = (torch.as_tensor(np.stack([p.coords for p in prompts]), dtype=torch.float32, device=device),
                  torch.as_tensor(np.stack([p.labels for p in prompts]), dtype=torch.int64, device=device))
        sparse, dense = self.prompt_encoder(points=points, boxes=None, masks=None)
        sparse = torch.cat([sparse, self.projection(seg).to(sparse.dtype)[:, None]], 1)
        return decode_per_prompt(self.mask_decoder, sam_embeddings, self.prompt_encoder.get_dense_pe(), sparse, dense)

    @staticmethod
    def _output(low: torch.Tensor, iou: torch.Tensor, sim: torch.Tensor, n_ref: int) -> SegHeadOutput:
        heat = F.interpolate(sim[None, None], size=low.shape[-2:], mode="bilinear", align_corners=False)
        return SegHeadOutput(
            mask_logits=low,
            conf_logits=iou.new_zeros(1),  # no slot confidence: emitting <SEG> is READ's decision (K = 1)
            heatmaps=heat[:, 0].to(low.dtype),
            iou_pred=iou,
            sae_ids=torch.zeros(n_ref, 0, dtype=torch.long, device=low.device),
            sae_acts=low.new_zeros(n_ref, 0),
        )

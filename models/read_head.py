"""READ as a trainable segmentation head with the SegCompass head's call contract.

Per response with a reference token (READ, CVPR 2025; the pure steps live in
models.read):

1. the similarity map between the `<SEG>` last-layer state and the image-token
   states picks labelled SAM points (Similarity as Points, then DtoC); the
   selection is a sort, so it carries no gradient, as in READ;
2. a trainable projection of the `<SEG>` state is appended to the point tokens
   as SAM's text prompt;
3. SAM's prompt encoder + mask decoder decode one mask on the cached image
   embedding. Gradients reach the LM through that projection (and through the
   similarity map in `heatmaps`, which no loss uses).

Where the map lies in SAM's frame follows the policy's token grid
(``models.image_grid``: a square-padding tower's or Qwen2.5-VL's whole-image grid)
and the image's ``sam_input_size``: SAM pads bottom-right, LLaVA to a centred
square, so on a non-square image the two frames differ (``models.read.MapPlacement``).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from models.image_grid import TokenGrid
from models.read import MapPlacement, ReadParams, read_prompts
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
        """``forward`` per sample: point selection is per image, so READ decodes one at a time."""
        sizes = sam_input_sizes or [None] * len(ref_hidden)
        return [self(*sample) for sample in zip(ref_hidden, image_hidden, sam_embeddings, image_grids, sizes)]

    def forward(self, ref_hidden: torch.Tensor, image_hidden: torch.Tensor, sam_embedding: torch.Tensor,
                grid: TokenGrid | None, sam_input_size: tuple[int, int] | None = None) -> SegHeadOutput:
        """ref_hidden [n_ref, H] and image_hidden [N, H] last layer; sam_embedding [C, h, w]; the
        image's token grid and its extent in SAM's frame (None: the whole square frame).

        The first reference token is decoded (K = 1).
        """
        if ref_hidden.shape[0] == 0:
            raise ValueError("no reference token in the response: a false-premise answer has no mask to decode")
        if grid is None:
            raise ValueError(f"{image_hidden.shape[0]} image tokens are not a square grid: READ needs the token "
                             "grid, which only a square-padding tower or Qwen2.5-VL's patch grid gives")
        seg = ref_hidden[0]
        placement = MapPlacement.of(sam_input_size or tuple(self.prompt_encoder.input_image_size), grid.padded_square)
        prompts = read_prompts(seg, image_hidden, (grid.rows, grid.cols), placement, self.params)
        device = sam_embedding.device
        points = (torch.as_tensor(prompts.coords, dtype=torch.float32, device=device)[None],
                  torch.as_tensor(prompts.labels, dtype=torch.int64, device=device)[None])
        sparse, dense = self.prompt_encoder(points=points, boxes=None, masks=None)
        sparse = torch.cat([sparse, self.projection(seg).to(sparse.dtype)[None, None]], 1)
        low, iou = self.mask_decoder(
            image_embeddings=sam_embedding[None],
            image_pe=self.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=False,
        )
        heat = F.interpolate(prompts.sim[None, None], size=low.shape[-2:], mode="bilinear", align_corners=False)
        n_ref = ref_hidden.shape[0]
        return SegHeadOutput(
            mask_logits=low[:, 0],
            conf_logits=iou.new_zeros(1),  # no slot confidence: emitting <SEG> is READ's decision (K = 1)
            heatmaps=heat[:, 0].to(low.dtype),
            iou_pred=iou[:, 0],
            sae_ids=torch.zeros(n_ref, 0, dtype=torch.long, device=device),
            sae_acts=low.new_zeros(n_ref, 0),
        )

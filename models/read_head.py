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

The map is taken to cover SAM's square input frame, which holds for square
images (LLaVA pads to a centred square, SAM pads bottom-right: a non-square
image would need its size here to place the points).
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from models.read import ReadParams, read_prompts
from models.seghead import SegHeadOutput


def square_grid(num_tokens: int) -> tuple[int, int]:
    """(h, w) of a square image-token grid (LLaVA-1.5 and the tiny tower are square)."""
    side = math.isqrt(num_tokens)
    if side * side != num_tokens or side == 0:
        raise ValueError(f"{num_tokens} image tokens are not a square grid: READ needs the grid passed "
                         f"(dynamic-resolution towers such as Qwen2.5-VL)")
    return side, side


class ReadHead(nn.Module):
    """Projection of the `<SEG>` state + SAM prompt encoder and mask decoder; no SAE, one mask."""

    kind = "read"
    policy_inputs = ("ref_hidden", "image_hidden")  # PolicyOutput fields the Segmenter passes, per sample

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
                     sam_embeddings: list[torch.Tensor]) -> list[SegHeadOutput]:
        """``forward`` per sample: point selection is per image, so READ decodes one at a time."""
        return [self(ref, image, emb) for ref, image, emb in zip(ref_hidden, image_hidden, sam_embeddings)]

    def forward(self, ref_hidden: torch.Tensor, image_hidden: torch.Tensor, sam_embedding: torch.Tensor,
                grid: tuple[int, int] | None = None) -> SegHeadOutput:
        """ref_hidden [n_ref, H] and image_hidden [N, H] last layer; sam_embedding [C, h, w].

        The first reference token is decoded (K = 1); `grid` defaults to a square one.
        """
        if ref_hidden.shape[0] == 0:
            raise ValueError("no reference token in the response: a false-premise answer has no mask to decode")
        seg = ref_hidden[0]
        frame = tuple(self.prompt_encoder.input_image_size)
        prompts = read_prompts(seg, image_hidden, grid or square_grid(image_hidden.shape[0]), frame, self.params)
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

"""SegCompass segmentation head: SAE concepts -> K slot queries -> Q-V heatmaps -> SAM masks.

Per sample (SegCompass A.1 and the released head, research note section 5):

1. the frozen SAE encodes the layer-k states of the reference tokens; weak
   activations (|a| < `act_threshold`) are zeroed;
2. the **query codebook** (a bias-free linear map of the SAE dictionary)
   turns them into concept tokens;
3. the **slot mapper** prepends K learnable slot queries, mixes them with the
   concept tokens in a small transformer, fuses each slot with the projected
   last-layer reference state, and attends (Q·K) over a 1x1 projection of the
   cached SAM image embedding -> K heatmaps + K confidences. Each input of the
   fusion is layer-normalised on its own: under one shared LayerNorm the slot
   path, whose residual stream grew in SFT (norm 8 -> over 1,000) and is alike
   for every sample, drowned the reference state (norm ~20), and the masks
   stopped depending on what the answer named;
4. the heatmaps are SAM **mask prompts** (dense), the projected reference
   state a sparse prompt; the SAM **mask decoder** returns K mask logits.

SAM's image encoder never runs here: embeddings come from the feature cache.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from data.mask_frames import lowres_side
from models.sae import SparseAutoencoder, top_features
from models.sam import decode_per_prompt


@dataclass
class SegHeadOutput:
    mask_logits: torch.Tensor  # [K, 4h, 4w] SAM low-res mask logits
    conf_logits: torch.Tensor  # [K] slot confidence logits
    heatmaps: torch.Tensor  # [K, 4h, 4w] heatmap logits (the SAM mask prompts)
    iou_pred: torch.Tensor  # [K] SAM's predicted IoU
    sae_ids: torch.Tensor  # [n_tokens, top_k] strongest SAE features per reference token
    sae_acts: torch.Tensor  # [n_tokens, top_k] their activations


class SlotMapper(nn.Module):
    """Slot queries + concept tokens -> K fused slot vectors -> heatmaps and confidences.

    The fusion sees both inputs at unit scale (the mixer's final norm, the reference
    projection's own norm), so neither can outgrow the other however training scales it.
    """

    def __init__(self, dim: int, lm_dim: int, sam_dim: int, num_slots: int, heads: int = 4, layers: int = 2):
        super().__init__()
        self.slots = nn.Parameter(torch.randn(num_slots, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        # pre-norm layers leave the residual stream unnormalised: the final norm bounds the slot path
        self.mixer = nn.TransformerEncoder(layer, layers, norm=nn.LayerNorm(dim), enable_nested_tensor=False)
        self.ref_proj = nn.Sequential(nn.Linear(lm_dim, dim), nn.LayerNorm(dim))
        self.fuse = nn.Sequential(nn.Linear(2 * dim, dim), nn.GELU(), nn.Linear(dim, dim))
        self.query = nn.Linear(dim, sam_dim)
        self.key = nn.Conv2d(sam_dim, sam_dim, 1)
        self.refine = nn.Conv2d(1, 1, 3, padding=1)
        nn.init.constant_(self.refine.bias, -1.8)  # heatmaps start mostly "background"
        self.confidence = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, 1))

    def forward(self, concepts: torch.Tensor, padding: torch.Tensor | None, ref_vecs: torch.Tensor,
                sam_embeddings: torch.Tensor):
        """concepts [B, n, D] (``padding`` [B, n] True where a sample has fewer, or None),
        ref_vecs [B, K, H_lm], sam_embeddings [B, C, h, w] -> heatmaps [B, K, h, w], conf [B, K]."""
        b, k = concepts.shape[0], self.slots.shape[0]
        tokens = torch.cat([self.slots.expand(b, -1, -1), concepts], 1)
        if padding is not None:
            padding = torch.cat([padding.new_zeros(b, k), padding], 1)
        mixed = self.mixer(tokens, src_key_padding_mask=padding)[:, :k]
        fused = self.fuse(torch.cat([self.ref_proj(ref_vecs), mixed], -1))
        keys = self.key(sam_embeddings)  # [B, C, h, w]
        scores = torch.einsum("bkc,bchw->bkhw", self.query(fused), keys) / keys.shape[1] ** 0.5
        heat = self.refine(scores.flatten(0, 1)[:, None])[:, 0].unflatten(0, (b, k))
        return heat, self.confidence(fused).squeeze(-1)


class SegCompassHead(nn.Module):
    """The trainable segmentation modules around a frozen SAE and a SAM prompt encoder + mask decoder."""

    kind = "segcompass"
    policy_inputs = ("ref_hidden", "layer_ref_hidden")  # PolicyOutput fields the Segmenter passes, per sample

    def __init__(self, sae: SparseAutoencoder, sam: nn.Module, lm_dim: int, num_slots: int = 1,
                 codebook_dim: int = 128, act_threshold: float = 0.0, top_k: int = 8):
        super().__init__()
        self.sae = sae.freeze()
        sam_dim = sam.prompt_encoder.embed_dim
        self.codebook = nn.Linear(sae.d_sae, codebook_dim, bias=False)
        self.slot_mapper = SlotMapper(codebook_dim, lm_dim, sam_dim, num_slots)
        self.sparse_prompt = nn.Sequential(nn.Linear(lm_dim, lm_dim), nn.ReLU(), nn.Linear(lm_dim, sam_dim))
        self.prompt_encoder, self.mask_decoder = sam.prompt_encoder, sam.mask_decoder
        self.num_slots, self.act_threshold, self.top_k = num_slots, act_threshold, top_k

    def param_modules(self) -> dict[str, nn.Module]:
        """Trainable parts by learning-rate group (SegCompass A.2 multipliers)."""
        return {
            "query_codebook": self.codebook,
            "slot_mapper": self.slot_mapper,
            "mask_decoder": nn.ModuleList([self.sparse_prompt, self.prompt_encoder, self.mask_decoder]),
        }

    def slot_refs(self, ref_hidden: torch.Tensor) -> torch.Tensor:
        """[n_ref, H] -> [K, H]: the k-th slot takes the k-th reference token, extra slots the last one."""
        idx = torch.clamp(torch.arange(self.num_slots), max=ref_hidden.shape[0] - 1)
        return ref_hidden[idx]

    def forward(self, ref_hidden: torch.Tensor, layer_ref_hidden: torch.Tensor,
                sam_embedding: torch.Tensor) -> SegHeadOutput:
        """ref_hidden [n_ref, H] last layer; layer_ref_hidden [n_ref, H] layer k; sam_embedding [C, h, w]."""
        return self.decode_batch([ref_hidden], [layer_ref_hidden], [sam_embedding])[0]

    def decode_batch(self, ref_hidden: list[torch.Tensor], layer_ref_hidden: list[torch.Tensor],
                     sam_embeddings: list[torch.Tensor], sam_input_sizes=None) -> list[SegHeadOutput]:
        """``forward`` for B samples at once: each module runs once for the batch, not once
        per sample (under ZeRO-3 each module call is a parameter gather). The heatmaps are
        made on SAM's own embedding, already in its frame: ``sam_input_sizes`` is not needed."""
        counts = [r.shape[0] for r in ref_hidden]
        if min(counts) == 0:
            raise ValueError("no reference token in the response: a false-premise answer has no mask to decode")
        acts = self.sae.encode(torch.cat(layer_ref_hidden).to(self.codebook.weight.dtype))
        acts = acts * (acts.abs() >= self.act_threshold)
        concepts = self.codebook(acts).split(counts)
        padding = None
        if len(set(counts)) > 1:
            padding = (torch.arange(max(counts), device=acts.device)[None]
                       >= torch.tensor(counts, device=acts.device)[:, None])
        refs = torch.stack([self.slot_refs(r) for r in ref_hidden])  # [B, K, H]
        embeddings = torch.stack(sam_embeddings)
        heat, conf = self.slot_mapper(nn.utils.rnn.pad_sequence(list(concepts), batch_first=True), padding,
                                      refs, embeddings)
        b, k = heat.shape[:2]
        side = lowres_side(embeddings)  # SAM's mask prompt is in its low-res frame
        heat = F.interpolate(heat.flatten(0, 1)[:, None], size=(side, side), mode="bilinear", align_corners=False)
        sparse, dense = self.prompt_encoder(points=None, boxes=None, masks=heat)
        sparse = torch.cat([sparse, self.sparse_prompt(refs.flatten(0, 1))[:, None]], 1)
        low, iou = decode_per_prompt(self.mask_decoder, embeddings.repeat_interleave(k, 0),
                                     self.prompt_encoder.get_dense_pe(), sparse, dense)
        ids, values = top_features(acts.detach(), min(self.top_k, acts.shape[-1]))
        low, heat, iou = low.unflatten(0, (b, k)), heat[:, 0].unflatten(0, (b, k)), iou.unflatten(0, (b, k))
        return [SegHeadOutput(low[i], conf[i], heat[i], iou[i], i_ids, i_values)
                for i, (i_ids, i_values) in enumerate(zip(ids.split(counts), values.split(counts)))]

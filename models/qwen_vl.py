"""Qwen2.5-VL split into segrl's three parts: frozen vision tower, trainable merger, M-RoPE causal LM.

- Feature cache (`segrl precompute`): the vision tower *without* its patch
  merger. Its states are cached as a patch grid `[t, h, w, Dv]` (t = 1 for a
  still image), so the grid the LM positions need travels in the tensor's
  shape through every cache reader unchanged.
- Projector: the tower's `visual.merger` (RMSNorm + MLP over each m x m patch
  window, m = spatial_merge_size), trained like LLaVA's projector; it turns the
  grid into (h/m)(w/m) image tokens, row-major.
- LM: Qwen2.5-VL's text decoder + head. Its rotary embedding is M-RoPE: every
  position is (temporal, height, width); text tokens have three equal
  components, image tokens their grid cell, and text after an image continues
  at start + max(h, w)/m. `mrope_positions` computes them; the Policy passes
  them as `position_ids` of shape [3, B, T] (what `Qwen2_5_VLTextModel` takes).

Covered on CPU by tests/test_qwen_vl_loading.py against
`Qwen2_5_VLForConditionalGeneration`: logits and hidden states of the split
model, positions vs HF's `get_rope_index`, the cached grid; a segrl model folder
(``save_pretrained`` of the text LM + merger projector) and its `segrl export`
by tests/test_export_upstream.py. Not covered:
- rollout: vLLM must get our prompt embeddings *and* M-RoPE positions (its
  Qwen2.5-VL model computes them from image placeholders), a GPU-cluster
  concern that is not wired up here; `generate` on this LM refuses rather than
  decode with 1-D positions;
- videos (t > 1) and several images per prompt;
- prompt format: segrl's prompt holds a bare `<image>` (added to Qwen's
  vocabulary here); Qwen's own template wraps the image in
  `<|vision_start|>`...`<|vision_end|>` (models/prompt.py, shared by every
  family, is unchanged).
"""
from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch import nn
from transformers import Qwen2_5_VLTextConfig
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
    Qwen2_5_VLPatchMerger,
    Qwen2_5_VLPreTrainedModel,
    Qwen2_5_VLTextModel,
)

from models.hf_weights import load_exact, local_checkpoint, read_tensors
from models.prompt import IMAGE_TOKEN

FAMILY_MODEL_TYPE = "qwen2_5_vl"


# ---------------------------------------------------------------- checkpoint keys
# Both layouts occur: the hub's (`visual.*`, `model.*`, `lm_head.*`, which
# transformers 5 also writes) and transformers 4.5x's (`model.visual.*`,
# `model.language_model.*`).


def _visual_rest(key: str) -> str | None:
    for prefix in ("model.visual.", "visual."):
        if key.startswith(prefix):
            return key[len(prefix):]
    return None


def lm_key(key: str) -> str | None:
    if _visual_rest(key) is not None:
        return None
    if key.startswith("model.language_model."):
        return "model." + key[len("model.language_model."):]
    return key if key.startswith(("model.", "lm_head.")) else None


def merger_key(key: str) -> str | None:
    rest = _visual_rest(key)
    return rest if rest is not None and rest.startswith("merger.") else None


def tower_key(key: str) -> str | None:
    rest = _visual_rest(key)
    return rest if rest is not None and not rest.startswith("merger.") else None


# ---------------------------------------------------------------- modules


class QwenVLTextLM(Qwen2_5_VLPreTrainedModel):
    """Qwen2.5-VL's decoder (M-RoPE) + LM head with no vision tower: the causal LM the Policy drives."""

    config: Qwen2_5_VLTextConfig
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: Qwen2_5_VLTextConfig):
        super().__init__(config)
        self.model = Qwen2_5_VLTextModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(self, input_ids=None, inputs_embeds=None, attention_mask=None, position_ids=None, **kwargs):
        """`position_ids`: [3, B, T] M-RoPE positions; left out, all three are 0..T-1 (text only)."""
        out = self.model(input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                         position_ids=position_ids, **kwargs)
        return CausalLMOutputWithPast(logits=self.lm_head(out.last_hidden_state), past_key_values=out.past_key_values,
                                      hidden_states=out.hidden_states, attentions=out.attentions)

    def generate(self, *args, **kwargs):
        raise NotImplementedError("Qwen2.5-VL decoding needs M-RoPE positions with a per-prompt offset; "
                                  "sample through the vLLM rollout, not transformers' generate")


class MergerProjector(nn.Module):
    """Qwen2.5-VL's patch merger over a cached patch grid: [t, h, w, Dv] -> [t (h/m) (w/m), H]."""

    def __init__(self, vision_dim: int, lm_dim: int, spatial_merge_size: int):
        super().__init__()
        self.vision_dim, self.lm_dim, self.spatial_merge_size = vision_dim, lm_dim, spatial_merge_size
        self.merger = Qwen2_5_VLPatchMerger(lm_dim, vision_dim, spatial_merge_size)

    def forward(self, grid: torch.Tensor) -> torch.Tensor:
        if grid.dim() != 4:
            raise ValueError(f"Qwen2.5-VL features must be a [t, h, w, D] patch grid, got shape {tuple(grid.shape)}")
        t, h, w, d = grid.shape
        m = self.spatial_merge_size
        # The merger reads each m x m window as m*m consecutive patches, row by row.
        windows = grid.reshape(t, h // m, m, w // m, m, d).transpose(2, 3).reshape(-1, d)
        return self.merger(windows)


# ---------------------------------------------------------------- M-RoPE positions


def mrope_positions(ids: Sequence[int], image_token_id: int, grid_thw: Sequence[int],
                    spatial_merge_size: int) -> torch.Tensor:
    """[3, L] (temporal, height, width) positions of `ids` with its one image token expanded.

    `ids` is prompt + response holding a single image placeholder; the LM sees
    it as (h/m)(w/m) tokens, so L = len(ids) - 1 + (h/m)(w/m).
    """
    t, h, w = (int(x) for x in grid_thw)
    m = spatial_merge_size
    if t != 1:
        raise ValueError(f"only still images are supported (grid t = 1), got grid {(t, h, w)}")
    if h % m or w % m:
        raise ValueError(f"grid {(t, h, w)} is not divisible by spatial_merge_size {m}")
    ids = torch.as_tensor(list(ids), dtype=torch.long)
    where = (ids == image_token_id).nonzero().flatten()
    if where.numel() != 1:
        raise ValueError(f"expected exactly one image token (id {image_token_id}), found {where.numel()}")
    at, rows, cols = int(where[0]), h // m, w // m
    image = torch.stack([torch.zeros(rows * cols, dtype=torch.long),
                         torch.arange(rows).repeat_interleave(cols), torch.arange(cols).repeat(rows)])
    after = torch.arange(len(ids) - at - 1) + at + max(rows, cols)
    return torch.cat([torch.arange(at).expand(3, -1), image + at, after.expand(3, -1)], dim=1)


def grid_positions(ids: Sequence[int], image_token_id: int, features: torch.Tensor,
                   spatial_merge_size: int) -> torch.Tensor:
    """`mrope_positions` with the grid read from cached features' shape [t, h, w, D] (the Policy's hook)."""
    return mrope_positions(ids, image_token_id, features.shape[:3], spatial_merge_size)


# ---------------------------------------------------------------- loading


def _qwen_config(folder: Path):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder)
    if config.model_type != FAMILY_MODEL_TYPE:
        raise ValueError(f"{folder}: model_type '{config.model_type}' is not a Qwen2.5-VL checkpoint "
                         f"('{FAMILY_MODEL_TYPE}'); Qwen2-VL and Qwen3-VL differ in merger and positions")
    return config


def load_qwen_vl(path: str, dtype: torch.dtype):
    """(lm, merger projector, tokenizer, positions hook) from a Qwen2.5-VL checkpoint.

    Qwen's tokenizer has no `<image>`: it is added (special) for segrl's prompts;
    the Policy grows the embeddings only when a new id falls past Qwen's padded vocabulary.
    """
    from transformers import AddedToken, AutoTokenizer

    folder = local_checkpoint(path)
    config = _qwen_config(folder)
    text_config = config.text_config
    text_config.tie_word_embeddings = config.tie_word_embeddings
    lm = QwenVLTextLM._from_config(text_config, dtype=dtype)
    state = read_tensors(folder, lm_key)
    if config.tie_word_embeddings and "model.embed_tokens.weight" in state:
        state.setdefault("lm_head.weight", state["model.embed_tokens.weight"])
    load_exact(lm, state, folder, "language model")

    vision = config.vision_config
    projector = MergerProjector(vision.hidden_size, vision.out_hidden_size, vision.spatial_merge_size)
    load_exact(projector, read_tensors(folder, merger_key), folder, "projector (visual.merger)")

    tokenizer = AutoTokenizer.from_pretrained(folder)
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True)
    positions = partial(grid_positions, spatial_merge_size=vision.spatial_merge_size)
    return lm, projector.to(dtype), tokenizer, positions


def load_saved_text_lm(path: str, dtype: torch.dtype) -> QwenVLTextLM:
    """The text LM a segrl folder holds (``save_pretrained`` of ``QwenVLTextLM``), read as the upstream one."""
    from transformers import Qwen2_5_VLTextConfig

    folder = Path(path)
    config = Qwen2_5_VLTextConfig.from_pretrained(folder)
    lm = QwenVLTextLM._from_config(config, dtype=dtype)
    state = read_tensors(folder, lm_key)
    if config.tie_word_embeddings and "model.embed_tokens.weight" in state:
        state.setdefault("lm_head.weight", state["model.embed_tokens.weight"])
    load_exact(lm, state, folder, "language model")
    return lm


class _GroupWindows(nn.Module):
    """Stands in for the merger inside the tower: keeps each window's m*m patch states, unmerged."""

    def __init__(self, unit: int):
        super().__init__()
        self.unit = unit

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        return states.reshape(-1, self.unit * states.shape[-1])


class QwenVisionTower:
    """Frozen Qwen2.5-VL vision tower minus merger: RGB uint8 images -> per image [1, h, w, Dv] patch grid.

    Images keep their aspect ratio (Qwen's dynamic resolution within the pixel
    bounds), so the grids differ per image; the whole batch runs as one
    packed sequence as in Qwen2.5-VL.
    """

    def __init__(self, vision_config, state: dict[str, torch.Tensor], source: Path,
                 pixel_bounds: tuple[int | None, int | None] = (None, None)):
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        self.merge = vision_config.spatial_merge_size
        tower = Qwen2_5_VisionTransformerPretrainedModel._from_config(vision_config, dtype=torch.float32)
        tower.merger = _GroupWindows(self.merge**2)
        load_exact(tower, state, source, "vision tower")
        self.encoder = tower.eval().requires_grad_(False)
        bounds = {k: v for k, v in zip(("min_pixels", "max_pixels"), pixel_bounds) if v is not None}
        self.processor = Qwen2VLImageProcessorPil(patch_size=vision_config.patch_size, merge_size=self.merge,
                                                  temporal_patch_size=vision_config.temporal_patch_size, **bounds)

    @classmethod
    def from_checkpoint(cls, path: str, pixel_bounds: tuple[int | None, int | None] = (None, None)):
        """The tower of an upstream Qwen2.5-VL checkpoint (its ``visual.*`` tensors but the merger's)."""
        folder = local_checkpoint(path)
        return cls(_qwen_config(folder).vision_config, read_tensors(folder, tower_key), folder, pixel_bounds)

    @torch.no_grad()
    def __call__(self, images: list[np.ndarray]) -> list[torch.Tensor]:
        batch = self.processor(images=list(images), return_tensors="pt")
        grids = batch["image_grid_thw"]
        # pooler_output: windows back in the processor's order, each [m*m*D] (our _GroupWindows).
        windows = self.encoder(batch["pixel_values"], grid_thw=grids).pooler_output
        m, out = self.merge, []
        for (t, h, w), chunk in zip(grids.tolist(), windows.split((grids.prod(-1) // m**2).tolist())):
            grid = chunk.reshape(t, h // m, w // m, m, m, -1).transpose(2, 3).reshape(t, h, w, -1)
            out.append(grid)
        return out

"""The policy: cached vision features -> trainable projector -> causal LM.

One forward over prompt + response yields everything the losses, rewards and
segmentation heads need, captured by hooks in that same pass:

- `logprobs`: log pi(response token | prefix) for every response token;
- `ref_hidden`: last-layer hidden states at the reference tokens (`<SEG>`);
- `image_hidden`: last-layer hidden states at the image tokens (READ);
- `layer_hidden`: the output of decoder layer k (the SAE's input).

Hidden-state index convention (as Hugging Face `output_hidden_states`):
`hidden_states[0]` is the embedding output and `hidden_states[k]` the output
of decoder layer k (1-based), so `sae_layer=16` on LLaVA-1.5-7B is the output
of its 16th of 32 layers. `hidden_states[-1]` is after the final norm.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from torch import nn

from models.image_grid import TokenGrid, token_grid
from models.projector import Projector, load_projector
from models.prompt import IMAGE_TOKEN, build_prompt_embeds

REF_POSITIONS = ("token", "previous")


@dataclass
class PolicyOutput:
    logprobs: torch.Tensor  # [B, R] log-probabilities of response tokens (0 where padded)
    response_mask: torch.Tensor  # [B, R] bool
    ref_hidden: list[torch.Tensor]  # per sample [n_ref, H], last layer
    image_hidden: list[torch.Tensor]  # per sample [N, H], last layer (N may vary: dynamic resolution)
    layer_hidden: torch.Tensor  # [B, T, H], output of decoder layer k
    layer_ref_hidden: list[torch.Tensor]  # per sample [n_ref, H], layer k at the reference tokens
    attention_mask: torch.Tensor  # [B, T]
    image_spans: list[tuple[int, int]]  # per sample [start, end) of the image tokens in the sequence
    image_grids: list[TokenGrid | None]  # per sample, where its image tokens lie on the image (READ's points)


class Policy(nn.Module):
    """LLaVA-style policy around any HF causal LM with `.model.layers` and `.lm_head`.

    `positions`, for LMs whose positions depend on the image (Qwen2.5-VL's
    M-RoPE), maps (prompt + response ids, image token id, vision features) to
    one sample's position ids [..., L]; None keeps the LM's own 0..T-1.
    """

    def __init__(self, lm: nn.Module, projector: nn.Module, image_token_id: int, ref_token_id: int,
                 sae_layer: int, ref_position: str = "token", positions: Callable | None = None):
        super().__init__()
        if ref_position not in REF_POSITIONS:
            raise ValueError(f"ref_position must be one of {REF_POSITIONS}, got '{ref_position}'")
        n_layers = len(lm.model.layers)
        if not 1 <= sae_layer <= n_layers:
            raise ValueError(f"sae_layer {sae_layer} is outside 1..{n_layers} (decoder layers of this LM)")
        self.lm, self.projector = lm, projector
        self.image_token_id, self.ref_token_id = image_token_id, ref_token_id
        self.sae_layer, self.ref_position = sae_layer, ref_position
        self.positions = positions

    @property
    def embed_tokens(self) -> nn.Module:
        return self.lm.get_input_embeddings()

    def prompt_embeds(self, ids: list[int], vision_features: torch.Tensor) -> torch.Tensor:
        return build_prompt_embeds(ids, self.image_token_id, vision_features, self.projector, self.embed_tokens)

    def _sequences(self, prompt_ids, vision_features, response_ids):
        """Right-padded [B, T, H] inputs, attention mask, prompt lengths and image spans.

        A GRPO batch holds G responses per prompt: each distinct (features, prompt) is
        embedded once and all responses in one embedding call, so the projector and the
        embeddings run a handful of times per batch, not once per row (under ZeRO-3
        every module call is a parameter gather).
        """
        prompts: dict[tuple[int, tuple[int, ...]], torch.Tensor] = {}
        rows, spans, prompt_lens = [], [], []
        device = vision_features[0].device
        flat = torch.as_tensor([t for resp in response_ids for t in resp], dtype=torch.long, device=device)
        responses = self.embed_tokens(flat).split([len(resp) for resp in response_ids])
        for ids, feats, resp in zip(prompt_ids, vision_features, responses):
            key = (id(feats), tuple(ids))
            if key not in prompts:
                prompts[key] = self.prompt_embeds(ids, feats)
            prompt = prompts[key]
            at = list(ids).index(self.image_token_id)
            spans.append((at, at + prompt.shape[0] - len(ids) + 1))
            prompt_lens.append(prompt.shape[0])
            rows.append(torch.cat([prompt, resp], 0))
        length = max(r.shape[0] for r in rows)
        embeds = rows[0].new_zeros(len(rows), length, rows[0].shape[1])
        mask = torch.zeros(len(rows), length, dtype=torch.long, device=embeds.device)
        for i, r in enumerate(rows):
            embeds[i, : r.shape[0]] = r
            mask[i, : r.shape[0]] = 1
        return embeds, mask, prompt_lens, spans

    def forward(self, prompt_ids: list[list[int]], vision_features: list[torch.Tensor],
                response_ids: list[list[int]]) -> PolicyOutput:
        embeds, mask, prompt_lens, spans = self._sequences(prompt_ids, vision_features, response_ids)
        captured: dict[str, torch.Tensor] = {}

        def grab(_module, _inputs, output):
            captured["layer"] = output[0] if isinstance(output, tuple) else output

        extra = {}
        if self.positions is not None:
            extra["position_ids"] = self._position_ids(prompt_ids, vision_features, response_ids, embeds.shape[1])
        handle = self.lm.model.layers[self.sae_layer - 1].register_forward_hook(grab)
        try:
            last = self.lm.model(inputs_embeds=embeds, attention_mask=mask, use_cache=False, **extra).last_hidden_state
        finally:
            handle.remove()

        r_max = max(max(len(r) for r in response_ids), 1)
        batch = len(response_ids)
        # Position p predicts token p + 1: response token j is predicted at prompt_len - 1 + j.
        pred_pos = torch.zeros(batch, r_max, dtype=torch.long, device=embeds.device)
        targets = torch.zeros(batch, r_max, dtype=torch.long, device=embeds.device)
        resp_mask = torch.zeros(batch, r_max, dtype=torch.bool, device=embeds.device)
        for i, resp in enumerate(response_ids):
            n = len(resp)
            pred_pos[i, :n] = torch.arange(prompt_lens[i] - 1, prompt_lens[i] - 1 + n)
            targets[i, :n] = torch.as_tensor(resp, dtype=torch.long)
            resp_mask[i, :n] = True
        hidden = last.gather(1, pred_pos[..., None].expand(-1, -1, last.shape[-1]))
        logp = torch.log_softmax(self.lm.lm_head(hidden).float(), dim=-1)
        logprobs = logp.gather(-1, targets[..., None]).squeeze(-1) * resp_mask

        ref_idx = self._ref_positions(response_ids, prompt_lens)
        return PolicyOutput(
            logprobs=logprobs,
            response_mask=resp_mask,
            ref_hidden=[last[i, idx] for i, idx in enumerate(ref_idx)],
            image_hidden=[last[i, s:e] for i, (s, e) in enumerate(spans)],
            layer_hidden=captured["layer"],
            layer_ref_hidden=[captured["layer"][i, idx] for i, idx in enumerate(ref_idx)],
            attention_mask=mask,
            image_spans=spans,
            # Qwen2.5-VL's merger sets its window; other projectors map one feature to one token.
            image_grids=[token_grid(v, getattr(self.projector, "spatial_merge_size", 1)) for v in vision_features],
        )

    def _position_ids(self, prompt_ids, vision_features, response_ids, length: int) -> torch.Tensor:
        """Per-sample `positions` stacked to [..., B, T]; padding gets 0 (it is masked)."""
        rows = [self.positions([*ids, *resp], self.image_token_id, feats)
                for ids, feats, resp in zip(prompt_ids, vision_features, response_ids)]
        out = rows[0].new_zeros(*rows[0].shape[:-1], len(rows), length)
        for i, row in enumerate(rows):
            out[..., i, : row.shape[-1]] = row
        return out.to(vision_features[0].device)

    def _ref_positions(self, response_ids, prompt_lens) -> list[torch.Tensor]:
        """Sequence positions whose hidden state represents each reference token.

        "token": the reference token's own position (the paper's wording);
        "previous": the position that predicted it (LISA's shifted mask).
        """
        shift = 0 if self.ref_position == "token" else -1
        out = []
        for resp, plen in zip(response_ids, prompt_lens):
            hits = [plen + j + shift for j, t in enumerate(resp) if int(t) == self.ref_token_id]
            out.append(torch.tensor(hits, dtype=torch.long))
        return out


def load_policy(family: str, name_or_path: str, ref_token: str, sae_layer: int, ref_position: str = "token",
                dtype: torch.dtype = torch.float32):
    """(policy, tokenizer) from a segrl folder (make-tiny, a checkpoint) or an upstream checkpoint.

    The reference token is added to the vocabulary when the checkpoint does not
    have it yet, as LISA adds [SEG]; the embeddings grow only when a new id falls
    past them (Qwen pads its vocabulary: shrinking would drop rows).
    """
    if (Path(name_or_path) / "projector" / "config.json").is_file():
        loader = _load_segrl_folder
    elif family in UPSTREAM_LOADERS:
        loader = UPSTREAM_LOADERS[family]
    else:
        raise ValueError(f"no policy loader for model family '{family}'; known: tiny (segrl folders), "
                         f"{', '.join(sorted(UPSTREAM_LOADERS))}")
    lm, projector, tokenizer, positions = loader(name_or_path, dtype)
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        raise ValueError(f"tokenizer of {name_or_path} has no {IMAGE_TOKEN} token")
    if ref_token not in tokenizer.get_vocab():
        tokenizer.add_tokens([ref_token])
    if len(tokenizer) > lm.get_input_embeddings().weight.shape[0]:
        lm.resize_token_embeddings(len(tokenizer))
    ids = tokenizer.convert_tokens_to_ids([IMAGE_TOKEN, ref_token])
    return Policy(lm, projector, ids[0], ids[1], sae_layer, ref_position, positions), tokenizer


def _load_segrl_folder(path: str, dtype: torch.dtype):
    """A segrl folder's LM, projector and tokenizer; a Qwen2.5-VL one's LM is its M-RoPE text model, with
    the positions hook its merger's window size gives."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    projector = load_projector(Path(path) / "projector").to(dtype)
    if AutoConfig.from_pretrained(path).model_type == "qwen2_5_vl_text":
        from models.qwen_vl import grid_positions, load_saved_text_lm

        lm = load_saved_text_lm(path, dtype)
        positions = partial(grid_positions, spatial_merge_size=projector.spatial_merge_size)
    else:
        lm, positions = AutoModelForCausalLM.from_pretrained(path, dtype=dtype), None
    return lm, projector, AutoTokenizer.from_pretrained(path), positions


def _load_llava(path: str, dtype: torch.dtype):
    """llava-hf checkpoint -> its language model as a plain causal LM + its projector."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from models.hf_weights import llava_lm_key, llava_projector_key, load_exact, local_checkpoint, read_tensors

    folder = local_checkpoint(path)
    config = AutoConfig.from_pretrained(folder)
    if not isinstance(config.vision_feature_layer, int) or config.projector_hidden_act != "gelu":
        raise ValueError(f"{folder}: only single-layer features and a GELU projector (LLaVA-1.5) are supported")
    lm = AutoModelForCausalLM.from_config(config.text_config, dtype=dtype)
    load_exact(lm, read_tensors(folder, llava_lm_key), folder, "language model")
    projector = Projector(config.vision_config.hidden_size, config.text_config.hidden_size)
    load_exact(projector, read_tensors(folder, llava_projector_key), folder, "projector")
    return lm, projector.to(dtype), AutoTokenizer.from_pretrained(folder), None


def _load_qwen_vl(path: str, dtype: torch.dtype):
    from models.qwen_vl import load_qwen_vl  # transformers' Qwen modules load only when asked for

    return load_qwen_vl(path, dtype)


UPSTREAM_LOADERS = {"llava": _load_llava, "qwen2_5_vl": _load_qwen_vl}

"""Reading parts of real multimodal checkpoints (llava-hf) into our modules.

segrl splits a LLaVA model into a frozen vision tower (feature cache only), a
trainable projector and a causal LM; each part is read straight from the
checkpoint's safetensors by key prefix, so no part loads what it does not need.
Both llava-hf key layouts are understood: the hub's original one
(`language_model.model.*`, `language_model.lm_head.*`) and transformers 5's
(`model.language_model.*`, `lm_head.*`).
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file


def local_checkpoint(name_or_path: str) -> Path:
    """A local folder as is; a hub id is fetched (configs, tokenizer, safetensors) where the hub is reachable."""
    if Path(name_or_path).is_dir():
        return Path(name_or_path)
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(name_or_path, allow_patterns=["*.json", "*.safetensors", "*.model", "*.jinja"]))


def read_tensors(folder: Path, rename: Callable[[str], str | None]) -> dict[str, torch.Tensor]:
    """Tensors of every shard whose key `rename` maps to a new name (None: skip)."""
    state = {}
    for shard in sorted(folder.glob("*.safetensors")):
        for key, value in load_file(shard).items():
            new = rename(key)
            if new is not None:
                state[new] = value
    return state


def llava_lm_key(key: str) -> str | None:
    for old, new in (("language_model.model.", "model."), ("language_model.lm_head.", "lm_head."),
                     ("model.language_model.", "model.")):
        if key.startswith(old):
            return new + key[len(old):]
    return key if key.startswith("lm_head.") else None


def llava_projector_key(key: str) -> str | None:
    for old, new in (("multi_modal_projector.linear_1.", "net.0."), ("multi_modal_projector.linear_2.", "net.2.")):
        if old in key:
            return new + key.split(old, 1)[1]
    return None


def llava_vision_key(key: str) -> str | None:
    return key.split("vision_tower.", 1)[1] if "vision_tower." in key else None


def load_exact(module: torch.nn.Module, state: dict[str, torch.Tensor], source: Path, part: str) -> None:
    """load_state_dict that names the checkpoint and the part when keys are missing or extra."""
    missing, unexpected = module.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{source}: {part} weights do not fit: missing {missing[:3]}, unexpected {unexpected[:3]}")

"""The trainable vision-to-language projector (LLaVA-1.5 `mlp2x_gelu`)."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn


class Projector(nn.Module):
    """Maps cached vision patch features [.., Dv] to LM input embeddings [.., H]."""

    def __init__(self, vision_dim: int, lm_dim: int):
        super().__init__()
        self.vision_dim, self.lm_dim = vision_dim, lm_dim
        self.net = nn.Sequential(nn.Linear(vision_dim, lm_dim), nn.GELU(), nn.Linear(lm_dim, lm_dim))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features)


def save_projector(projector: nn.Module, out_dir: str | Path) -> Path:
    """config.json (kind and widths) + model.safetensors; ``load_projector`` rebuilds either kind."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = {"vision_dim": projector.vision_dim, "lm_dim": projector.lm_dim}
    if (merge := getattr(projector, "spatial_merge_size", None)) is not None:
        config.update(kind="merger", spatial_merge_size=merge)
    (out / "config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in projector.state_dict().items()}, out / "model.safetensors")
    return out


def _merger(**config) -> nn.Module:
    # transformers' Qwen modules load only when asked for
    from models.qwen_vl import MergerProjector

    return MergerProjector(**config)


PROJECTORS = {"mlp2x_gelu": Projector, "merger": _merger}
"""kind in config.json (none: mlp2x_gelu) -> builder: LLaVA's MLP, Qwen2.5-VL's patch merger."""


def load_projector(folder: str | Path) -> nn.Module:
    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    projector = PROJECTORS[config.pop("kind", "mlp2x_gelu")](**config)
    projector.load_state_dict(load_file(folder / "model.safetensors"))
    return projector

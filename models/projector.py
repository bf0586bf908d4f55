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


def save_projector(projector: Projector, out_dir: str | Path) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps({"vision_dim": projector.vision_dim, "lm_dim": projector.lm_dim}))
    save_file({k: v.contiguous() for k, v in projector.state_dict().items()}, out / "model.safetensors")
    return out


def load_projector(folder: str | Path) -> Projector:
    folder = Path(folder)
    projector = Projector(**json.loads((folder / "config.json").read_text()))
    projector.load_state_dict(load_file(folder / "model.safetensors"))
    return projector

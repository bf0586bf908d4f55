"""Frozen vision encoders that turn an image into patch features for the LLM.

They run only inside the feature cache (`segrl precompute`), never in the
training loop (SegCompass A.1). `tiny` is a small ViT built offline; `llava`
takes the CLIP tower out of a llava-hf checkpoint; `qwen2_5_vl` the
dynamic-resolution tower of a Qwen2.5-VL checkpoint (models/qwen_vl.py).
"""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from models.tiny_specs import TinyVisionSpec

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class TinyVisionEncoder(nn.Module):
    """ViT: patchify conv + learned positions + pre-norm transformer layers."""

    def __init__(self, spec: TinyVisionSpec):
        super().__init__()
        self.spec = spec
        self.patch = nn.Conv2d(3, spec.hidden_size, spec.patch_size, stride=spec.patch_size)
        self.pos = nn.Parameter(torch.randn(1, spec.grid * spec.grid, spec.hidden_size) * 0.02)
        layer = nn.TransformerEncoderLayer(
            spec.hidden_size, spec.num_heads, 2 * spec.hidden_size, dropout=0.0, batch_first=True, norm_first=True
        )
        self.layers = nn.TransformerEncoder(layer, spec.num_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(spec.hidden_size)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, 3, S, S] normalised pixels -> [B, grid*grid, hidden] patch features (row-major)."""
        x = self.patch(pixels).flatten(2).transpose(1, 2) + self.pos
        return self.norm(self.layers(x))


def save_tiny_vision(encoder: TinyVisionEncoder, out_dir: str | Path) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(asdict(encoder.spec), indent=2))
    save_file({k: v.contiguous() for k, v in encoder.state_dict().items()}, out / "model.safetensors")
    return out


def load_tiny_vision(folder: str | Path) -> TinyVisionEncoder:
    folder = Path(folder)
    encoder = TinyVisionEncoder(TinyVisionSpec(**json.loads((folder / "config.json").read_text())))
    encoder.load_state_dict(load_file(folder / "model.safetensors"))
    return encoder.eval().requires_grad_(False)


class VisionTower:
    """A frozen encoder plus its preprocessing: RGB uint8 [H, W, 3] -> features [N, D]."""

    def __init__(self, encoder: nn.Module, image_size: int, mean, std, feature_fn=None):
        self.encoder = encoder.eval().requires_grad_(False)
        self.image_size = image_size
        self.mean = torch.tensor(mean).view(1, 3, 1, 1)
        self.std = torch.tensor(std).view(1, 3, 1, 1)
        self.feature_fn = feature_fn or (lambda enc, px: enc(px))

    def preprocess(self, images: list[np.ndarray]) -> torch.Tensor:
        """Resize to a square (bilinear) and normalise; LLaVA-1.5 pads to square first."""
        from PIL import Image

        batch = []
        for img in images:
            square = _pad_to_square(img)
            resized = Image.fromarray(square).resize((self.image_size, self.image_size), Image.BILINEAR)
            batch.append(torch.from_numpy(np.asarray(resized, dtype=np.float32) / 255.0).permute(2, 0, 1))
        return (torch.stack(batch) - self.mean) / self.std

    @torch.no_grad()
    def __call__(self, images: list[np.ndarray]) -> torch.Tensor:
        return self.feature_fn(self.encoder, self.preprocess(images))


def _pad_to_square(img: np.ndarray) -> np.ndarray:
    """Pad the short side with the mean colour, keeping the image centred (LLaVA-1.5 'pad')."""
    h, w = img.shape[:2]
    if h == w:
        return img
    side = max(h, w)
    fill = np.array([int(255 * m) for m in CLIP_MEAN], dtype=np.uint8)
    out = np.broadcast_to(fill, (side, side, 3)).copy()
    top, left = (side - h) // 2, (side - w) // 2
    out[top : top + h, left : left + w] = img
    return out


def _tiny_tower(path: str, _pixel_bounds) -> VisionTower:
    encoder = load_tiny_vision(Path(path) / "vision")
    return VisionTower(encoder, encoder.spec.image_size, CLIP_MEAN, CLIP_STD)


def _llava_tower(path: str, _pixel_bounds) -> VisionTower:
    """CLIP tower of a llava-hf checkpoint; LLaVA-1.5 takes the penultimate layer and drops CLS.

    Only the `vision_tower.` tensors are read, so the 7B language model is never loaded here.
    """
    from transformers import AutoConfig

    from models.hf_weights import llava_vision_key, local_checkpoint, read_tensors

    folder = local_checkpoint(path)
    config = AutoConfig.from_pretrained(folder)
    return llava_tower(config.vision_config, read_tensors(folder, llava_vision_key), config.vision_feature_layer,
                       config.vision_feature_select_strategy, folder)


def llava_tower(vision_config, state: dict[str, torch.Tensor], layer: int, strategy: str, source: Path) -> VisionTower:
    """A CLIP vision model of ``vision_config`` holding ``state``, giving hidden layer ``layer`` (CLS
    dropped under the "default" strategy): what an upstream checkpoint and an export both hold."""
    from transformers import CLIPVisionModel

    from models.hf_weights import load_exact

    encoder = CLIPVisionModel(vision_config)
    load_exact(encoder, state, source, "vision tower")
    drop_cls = strategy == "default"

    def features(enc, px):
        hidden = enc(pixel_values=px, output_hidden_states=True).hidden_states[layer]
        return hidden[:, 1:] if drop_cls else hidden

    return VisionTower(encoder, vision_config.image_size, CLIP_MEAN, CLIP_STD, features)


def _qwen_tower(path: str, pixel_bounds):
    from models.qwen_vl import QwenVisionTower

    return QwenVisionTower.from_checkpoint(path, pixel_bounds)


VISION_TOWERS = {"tiny": _tiny_tower, "llava": _llava_tower, "qwen2_5_vl": _qwen_tower}


TOWER_FILE = "tower.json"
"""An export's ``vision/`` description (models.vision_export writes it)."""


def is_exported_tower(path: str | Path) -> bool:
    return (Path(path) / "vision" / TOWER_FILE).is_file()


def _exported_llava(folder: Path, tower: dict, state: dict, _pixel_bounds):
    from transformers import CLIPVisionConfig

    config = CLIPVisionConfig.from_json_file(folder / "config.json")
    return llava_tower(config, state, tower["vision_feature_layer"], tower["vision_feature_select_strategy"], folder)


def _exported_qwen(folder: Path, _tower: dict, state: dict, pixel_bounds):
    from transformers import Qwen2_5_VLVisionConfig

    from models.qwen_vl import QwenVisionTower

    return QwenVisionTower(Qwen2_5_VLVisionConfig.from_json_file(folder / "config.json"), state, folder, pixel_bounds)


EXPORTED_TOWERS = {"llava": _exported_llava, "qwen2_5_vl": _exported_qwen}


def exported_tower(path: str | Path, pixel_bounds: tuple[int | None, int | None] = (None, None)):
    """The vision tower an export folder ``path`` holds (VisionTower or QwenVisionTower)."""
    folder = Path(path) / "vision"
    try:
        tower = json.loads((folder / TOWER_FILE).read_text())
        build = EXPORTED_TOWERS[tower["family"]]
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{folder / TOWER_FILE}: not a vision tower description ({type(exc).__name__}: {exc})") \
            from None
    return build(folder, tower, load_file(folder / "model.safetensors"), pixel_bounds)


def load_vision_tower(family: str, name_or_path: str, pixel_bounds: tuple[int | None, int | None] = (None, None)):
    """`pixel_bounds` (min, max pixels) bound dynamic-resolution towers (Qwen2.5-VL); fixed-size ones resize anyway.
    A `segrl export` folder's tower comes from its ``vision/`` (written by models.vision_export)."""
    if is_exported_tower(name_or_path):  # an export's own tower, whatever the family says
        return exported_tower(name_or_path, pixel_bounds)
    if family not in VISION_TOWERS:
        raise ValueError(
            f"no vision tower for model family '{family}' in the feature cache yet; known: {sorted(VISION_TOWERS)}"
        )
    return VISION_TOWERS[family](name_or_path, pixel_bounds)

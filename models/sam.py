"""Build SAM (tiny or official vit_b/l/h) from `segment_anything.modeling` classes.

`import segment_anything` runs the package `__init__`, which imports the
predictor and with it torchvision; no CPU torchvision exists for this torch.
The modeling subpackage itself needs only torch, so we register the package
module without executing its `__init__` and import the submodules directly.
Official checkpoints are read with `torch.load(weights_only=True)`: a state
dict of tensors and nothing that can run code; a `.safetensors` file (an
export's SAM) with safetensors.
"""
from __future__ import annotations

import importlib
import importlib.util
import json
import sys
import types
from dataclasses import asdict
from functools import partial
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from models.tiny_specs import TinySamSpec

SAFETENSORS = "model.safetensors"
"""A SAM folder's weights in an export (`segrl export`); make-tiny writes `sam.pt`."""
SAM_PIXEL_MEAN = (123.675, 116.28, 103.53)
SAM_PIXEL_STD = (58.395, 57.12, 57.375)


def _segment_anything_module(name: str) -> types.ModuleType:
    """Import `segment_anything.<name>` without running the package __init__."""
    if "segment_anything" not in sys.modules:
        spec = importlib.util.find_spec("segment_anything")
        if spec is None or not spec.submodule_search_locations:
            raise ImportError("segment-anything is not installed: run the setup step (make setup)")
        package = types.ModuleType("segment_anything")
        package.__path__ = list(spec.submodule_search_locations)
        package.__spec__ = spec
        sys.modules["segment_anything"] = package
    return importlib.import_module(f"segment_anything.{name}")


def sam_modeling() -> types.ModuleType:
    return _segment_anything_module("modeling")


def build_tiny_sam(spec: TinySamSpec) -> torch.nn.Module:
    m = sam_modeling()
    grid = spec.image_size // spec.patch_size
    return m.Sam(
        image_encoder=m.ImageEncoderViT(
            img_size=spec.image_size,
            patch_size=spec.patch_size,
            embed_dim=spec.encoder_dim,
            depth=spec.encoder_depth,
            num_heads=spec.encoder_heads,
            mlp_ratio=2.0,
            out_chans=spec.prompt_dim,
            qkv_bias=True,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            use_rel_pos=True,
            window_size=max(1, grid // 2),
            global_attn_indexes=(spec.encoder_depth - 1,),
        ),
        prompt_encoder=m.PromptEncoder(
            embed_dim=spec.prompt_dim,
            image_embedding_size=(grid, grid),
            input_image_size=(spec.image_size, spec.image_size),
            mask_in_chans=spec.mask_in_chans,
        ),
        mask_decoder=m.MaskDecoder(
            num_multimask_outputs=3,
            transformer=m.TwoWayTransformer(
                depth=2,
                embedding_dim=spec.prompt_dim,
                mlp_dim=spec.decoder_mlp_dim,
                num_heads=spec.decoder_heads,
            ),
            transformer_dim=spec.prompt_dim,
            iou_head_depth=2,
            iou_head_hidden_dim=spec.prompt_dim,
        ),
        pixel_mean=list(SAM_PIXEL_MEAN),
        pixel_std=list(SAM_PIXEL_STD),
    )


def _build_official(variant: str) -> torch.nn.Module:
    registry = _segment_anything_module("build_sam").sam_model_registry
    return registry[variant](checkpoint=None)


def save_tiny_sam(sam: torch.nn.Module, spec: TinySamSpec, out_dir: str | Path) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(asdict(spec), indent=2))
    torch.save(sam.state_dict(), out / "sam.pt")
    return out


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Weights-only read of a SAM checkpoint (torch file or safetensors), with an error that says what to fix."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"SAM checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        try:
            return load_file(path)
        except (SafetensorError, OSError) as exc:
            raise ValueError(f"{path}: not a SAM safetensors file ({type(exc).__name__}: {exc})") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"{path}: not a weights-only SAM state dict ({type(exc).__name__}: {exc})") from exc
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: expected a dict of tensors (a SAM state dict)")
    return state


OFFICIAL = ("vit_b", "vit_l", "vit_h")


def sam_folder_variant(folder: str | Path) -> tuple[str, dict]:
    """(variant, the rest of config.json) of a SAM folder: make-tiny's names none (tiny), an export's
    ``sam/`` its own (``save_sam_folder``)."""
    path = Path(folder) / "config.json"
    try:
        config = json.loads(path.read_text())
        variant = config.pop("variant", "tiny")
    except (OSError, ValueError, AttributeError) as exc:
        raise ValueError(f"{path}: not a SAM folder config ({type(exc).__name__}: {exc})") from None
    if variant != "tiny" and variant not in OFFICIAL:
        raise ValueError(f"{path}: unknown SAM variant '{variant}': expected tiny, vit_b, vit_l or vit_h")
    return variant, config


def save_sam_folder(sam: torch.nn.Module, variant: str, out_dir: str | Path) -> Path:
    """An official SAM (vit_b/l/h) as a folder: config.json naming the variant + model.safetensors, the whole
    model. ``load_sam`` builds what the folder names, whatever variant its caller was told."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps({"variant": variant, "image_size": sam.image_encoder.img_size}))
    save_file({k: v.contiguous() for k, v in sam.state_dict().items()}, out / SAFETENSORS)
    return out


def load_sam(variant: str, checkpoint: str | Path | None) -> torch.nn.Module:
    """`tiny`: a folder written by make-tiny (sam.pt) or `segrl export` (model.safetensors).
    `vit_b/l/h`: an official .pth file, or a .safetensors one (or None = random init).
    A folder (make-tiny's, an export's ``sam/``) holds the variant its config.json names (none: tiny)."""
    if checkpoint is not None and Path(checkpoint).is_dir():
        folder = Path(checkpoint)
        variant, config = sam_folder_variant(folder)
        sam = build_tiny_sam(TinySamSpec(**config)) if variant == "tiny" else _build_official(variant)
        weights = folder / SAFETENSORS if (folder / SAFETENSORS).is_file() else folder / "sam.pt"
    elif variant == "tiny":
        raise ValueError(f"a tiny SAM needs its folder (model.sam.checkpoint or make-tiny's sam/), got {checkpoint}")
    elif variant in OFFICIAL:
        sam = _build_official(variant)
        weights = None if checkpoint is None else Path(checkpoint)
    else:
        raise ValueError(f"unknown SAM variant '{variant}': expected tiny, vit_b, vit_l or vit_h")
    if weights is not None:
        state = load_state_dict(weights)
        try:
            missing, unexpected = sam.load_state_dict(state, strict=False)
        except RuntimeError as exc:  # shape mismatches
            raise ValueError(f"{weights}: does not match SAM {variant}: {str(exc).splitlines()[1:3]}") from None
        if missing or unexpected:
            raise ValueError(
                f"{weights}: does not match SAM {variant}: "
                f"{len(missing)} missing keys (e.g. {missing[:3]}), "
                f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})"
            )
    return sam.eval()


def sam_preprocess(image: np.ndarray, image_size: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """RGB uint8 [H, W, 3] -> SAM input [3, S, S] and the resized (h, w) inside it.

    As SAM's own pipeline: resize the longest side to S (bilinear), normalise
    with SAM's pixel statistics, pad bottom/right with zeros.
    """
    from PIL import Image

    h, w = image.shape[:2]
    scale = image_size / max(h, w)
    nh, nw = int(h * scale + 0.5), int(w * scale + 0.5)
    resized = np.asarray(Image.fromarray(image).resize((nw, nh), Image.BILINEAR), dtype=np.float32)
    x = (torch.from_numpy(resized).permute(2, 0, 1) - torch.tensor(SAM_PIXEL_MEAN).view(3, 1, 1)) / torch.tensor(
        SAM_PIXEL_STD
    ).view(3, 1, 1)
    return torch.nn.functional.pad(x, (0, image_size - nw, 0, image_size - nh)), (nh, nw)


def sam_image_size(variant: str, checkpoint: str | Path | None) -> int:
    """SAM's input side without building it: 1024 for the official models, the tiny spec's otherwise
    (a folder's own variant decides)."""
    if checkpoint is not None and Path(checkpoint).is_dir():
        variant, config = sam_folder_variant(checkpoint)
        if variant == "tiny":
            return TinySamSpec(**config).image_size
    if variant in OFFICIAL:
        return 1024
    return TinySamSpec(**json.loads((Path(checkpoint) / "config.json").read_text())).image_size


def decode_per_prompt(decoder: torch.nn.Module, image_embeddings: torch.Tensor, image_pe: torch.Tensor,
                      sparse: torch.Tensor, dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SAM's single-mask decode with its own image embedding per prompt.

    `MaskDecoder.forward` repeats one image's embedding for every prompt; a training
    batch has a different image per prompt, so the same steps run here over
    image_embeddings [N, C, h, w] with sparse [N, n, C] and dense [N, C, h, w] prompts.
    Returns (mask logits [N, 4h, 4w], predicted IoU [N]) of the first mask token, as
    `multimask_output=False`. All compute goes through calls of the decoder's
    submodules (the output tokens too, as embedding lookups rather than `.weight`), so
    ZeRO-3's module hooks gather their parameters in the forward and the backward.
    """
    rows = torch.arange(decoder.num_mask_tokens, device=sparse.device)
    out_tokens = torch.cat([decoder.iou_token(rows[:1]), decoder.mask_tokens(rows)], 0)
    tokens = torch.cat([out_tokens.expand(sparse.shape[0], -1, -1), sparse], 1)
    src = image_embeddings + dense
    b, c, h, w = src.shape
    hs, src = decoder.transformer(src, image_pe.expand(b, -1, -1, -1), tokens)
    upscaled = decoder.output_upscaling(src.transpose(1, 2).reshape(b, c, h, w))
    hyper = decoder.output_hypernetworks_mlps[0](hs[:, 1])  # the first mask token
    masks = (hyper[:, None] @ upscaled.flatten(2)).reshape(b, *upscaled.shape[-2:])
    return masks, decoder.iou_prediction_head(hs[:, 0])[:, 0]

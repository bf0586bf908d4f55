"""The frozen vision tower of an upstream family as a part of a `segrl export` folder (``vision/``).

A LLaVA or Qwen2.5-VL model folder does not hold its tower: the feature cache reads it from the
upstream checkpoint (``model.name_or_path``). An export writes it out, so it needs no upstream folder:

    vision/tower.json          family and what turns the tower's states into features (LLaVA: the hidden
                               layer and whether CLS is dropped; Qwen2.5-VL: the processor's patch, merge
                               and temporal patch sizes, which are its vision config's)
    vision/config.json         the tower's Hugging Face config (CLIPVisionConfig, Qwen2_5_VLVisionConfig)
    vision/model.safetensors   its tensors as the checkpoint stores them (same names as the tower's modules)

``models.vision.load_vision_tower`` builds from these whenever a folder has ``vision/tower.json``
(reading lives there, writing here, so the two modules import one way). (A tiny model folder holds
its own tower already; the export copies it.)
"""
from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import save_file

from models.export_format import ExportError
from models.vision import TOWER_FILE

def _llava_parts(folder: Path):
    from transformers import AutoConfig

    from models.hf_weights import llava_vision_key, read_tensors

    config = AutoConfig.from_pretrained(folder)
    if config.model_type != "llava":
        raise ExportError(f"model.name_or_path {folder}: model_type '{config.model_type}', not a llava-hf "
                          "checkpoint; set it to the upstream checkpoint the model was trained from")
    settings = {"vision_feature_layer": config.vision_feature_layer,
                "vision_feature_select_strategy": config.vision_feature_select_strategy}
    return config.vision_config, read_tensors(folder, llava_vision_key), settings


def _qwen_parts(folder: Path):
    from transformers import AutoConfig

    from models.hf_weights import read_tensors
    from models.qwen_vl import FAMILY_MODEL_TYPE, tower_key

    config = AutoConfig.from_pretrained(folder)
    if config.model_type != FAMILY_MODEL_TYPE:
        raise ExportError(f"model.name_or_path {folder}: model_type '{config.model_type}', not a Qwen2.5-VL "
                          "checkpoint; set it to the upstream checkpoint the model was trained from")
    vision = config.vision_config
    settings = {"processor": {"patch_size": vision.patch_size, "merge_size": vision.spatial_merge_size,
                              "temporal_patch_size": vision.temporal_patch_size}}
    return vision, read_tensors(folder, tower_key), settings


TOWER_PARTS = {"llava": _llava_parts, "qwen2_5_vl": _qwen_parts}
"""family -> how to read the tower out of an upstream checkpoint folder (``models.vision`` builds it back)."""


def save_vision_tower(family: str, upstream: str, out: Path) -> dict:
    """Write the tower of upstream checkpoint folder ``upstream`` to ``out``; returns tower.json's content."""
    if family not in TOWER_PARTS:
        raise ExportError(f"no vision tower export for model family '{family}'; known: {sorted(TOWER_PARTS)}")
    from models.hf_weights import local_checkpoint

    try:
        folder = local_checkpoint(upstream)  # a hub id is fetched, as the feature cache does
    except (OSError, ValueError) as exc:  # offline, an unknown or malformed id
        raise ExportError(f"model.name_or_path {upstream}: not a local folder and not fetched "
                          f"({type(exc).__name__}); set it to the upstream checkpoint") from None
    if not (folder / "config.json").is_file():
        raise ExportError(f"model.name_or_path {upstream}: no config.json there; set it to the upstream "
                          "checkpoint whose vision tower the export is to hold")
    config, state, settings = TOWER_PARTS[family](folder)
    if not state:
        raise ExportError(f"model.name_or_path {upstream}: no vision tower tensors in its safetensors")
    out.mkdir(parents=True)
    config.to_json_file(out / "config.json", use_diff=False)
    save_file({k: v.contiguous() for k, v in state.items()}, out / "model.safetensors")
    tower = {"family": family, **settings}
    (out / TOWER_FILE).write_text(json.dumps(tower, indent=2))
    return tower

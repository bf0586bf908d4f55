"""The frozen vision tower of an upstream family as a part of a `segrl export` folder (``vision/``).

A LLaVA or Qwen2.5-VL model folder does not hold its tower: the feature cache reads it from the
upstream checkpoint (``model.name_or_path``). An export writes it out, so it needs no upstream folder:

    vision/tower.json          family and what turns the tower's states into features (LLaVA: the hidden
                               layer and whether CLS is dropped; Qwen2.5-VL: the processor's patch, merge
                               and temporal patch sizes, which are its vision config's)
    vision/config.json         the tower's Hugging Face config (CLIPVisionConfig, Qwen2_5_VLVisionConfig)
    vision/model.safetensors   its tensors as the checkpoint stores them (same names as the tower's modules)

``load_vision_tower`` builds from these whenever a folder has ``vision/tower.json``. (A tiny model
folder holds its own tower already; the export copies it.)
"""
from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file, save_file

from models.export_format import ExportError

TOWER_FILE = "tower.json"


def is_exported_tower(path: str | Path) -> bool:
    return (Path(path) / "vision" / TOWER_FILE).is_file()


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


def _llava_tower(folder: Path, tower: dict, state: dict, _pixel_bounds):
    from transformers import CLIPVisionConfig

    from models.vision import llava_tower

    config = CLIPVisionConfig.from_json_file(folder / "config.json")
    return llava_tower(config, state, tower["vision_feature_layer"], tower["vision_feature_select_strategy"], folder)


def _qwen_tower(folder: Path, _tower: dict, state: dict, pixel_bounds):
    from transformers import Qwen2_5_VLVisionConfig

    from models.qwen_vl import QwenVisionTower

    return QwenVisionTower(Qwen2_5_VLVisionConfig.from_json_file(folder / "config.json"), state, folder, pixel_bounds)


TOWERS = {"llava": (_llava_parts, _llava_tower), "qwen2_5_vl": (_qwen_parts, _qwen_tower)}
"""family -> (read the tower out of an upstream checkpoint folder, build it from an export's vision/)."""


def save_vision_tower(family: str, upstream: str, out: Path) -> dict:
    """Write the tower of upstream checkpoint folder ``upstream`` to ``out``; returns tower.json's content."""
    if family not in TOWERS:
        raise ExportError(f"no vision tower export for model family '{family}'; known: {sorted(TOWERS)}")
    from models.hf_weights import local_checkpoint

    try:
        folder = local_checkpoint(upstream)  # a hub id is fetched, as the feature cache does
    except (OSError, ValueError) as exc:  # offline, an unknown or malformed id
        raise ExportError(f"model.name_or_path {upstream}: not a local folder and not fetched "
                          f"({type(exc).__name__}); set it to the upstream checkpoint") from None
    if not (folder / "config.json").is_file():
        raise ExportError(f"model.name_or_path {upstream}: no config.json there; set it to the upstream "
                          "checkpoint whose vision tower the export is to hold")
    config, state, settings = TOWERS[family][0](folder)
    if not state:
        raise ExportError(f"model.name_or_path {upstream}: no vision tower tensors in its safetensors")
    out.mkdir(parents=True)
    config.to_json_file(out / "config.json", use_diff=False)
    save_file({k: v.contiguous() for k, v in state.items()}, out / "model.safetensors")
    tower = {"family": family, **settings}
    (out / TOWER_FILE).write_text(json.dumps(tower, indent=2))
    return tower


def exported_tower(path: str | Path, pixel_bounds: tuple[int | None, int | None] = (None, None)):
    """The vision tower an export folder ``path`` holds (VisionTower or QwenVisionTower)."""
    folder = Path(path) / "vision"
    try:
        tower = json.loads((folder / TOWER_FILE).read_text())
        build = TOWERS[tower["family"]][1]
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{folder / TOWER_FILE}: not a vision tower description ({type(exc).__name__}: {exc})") \
            from None
    return build(folder, tower, load_file(folder / "model.safetensors"), pixel_bounds)

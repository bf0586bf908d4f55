"""`segrl export`: a model folder as one self-contained Hugging Face folder, safetensors only.

A checkpoint folder leans on the config for what it does not hold (the SAE, its layer, the
head's kind) and keeps the tiny SAM as a torch pickle. An export holds every part and says
what each one is, so it can be shared, and it keeps a model folder's layout, so every loader
(``load_policy``, ``load_sam``, the head loaders, vLLM) reads it as it reads a checkpoint:

    config.json, model.safetensors, tokenizer*   the LM (``save_pretrained``), tokenizer with the reference token
    projector/                                   config.json + model.safetensors
    vision/                                      the frozen vision tower: the tiny family's as in the source,
                                                 an upstream family's out of model.name_or_path (models.vision_export)
    sam/                                         config.json + model.safetensors: the whole SAM (any variant),
                                                 image encoder included (the features come from it); the trained
                                                 prompt encoder and mask decoder are part of the head
    head/                                        config.json (kind + settings) + model.safetensors, as trained
                                                 (absent for a make-tiny folder: the head starts fresh)
    sae/                                         the frozen SAE a SegCompass head reads
    segrl_export.json                            what each part is (``describe_parts``)
    manifest.json                                written last: every file with its size and SHA-256

Loading an export takes the model settings it records (head kind and settings, slots,
reference token, SAE layer and folder, SAM) over the config's (models.export_format), and its
frozen encoders come from its own ``vision/`` and ``sam/`` whatever the config names
(``load_vision_tower``, ``sam_checkpoint``, ``load_sam``): an export needs no other file.
"""
from __future__ import annotations

import importlib.metadata
import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from data.atomic import atomic_folder
from models.encoders import sam_checkpoint
from models.export_format import (
    EXPORT_CONFIG,
    FORMAT,
    FORMAT_VERSION,
    ExportError,
    model_folder,
)
from models.policy import load_policy
from models.projector import save_projector
from models.sam import (
    OFFICIAL,
    load_sam,
    load_state_dict,
    sam_folder_variant,
    save_sam_folder,
)
from models.segmenter import (
    HeadSpec,
    saved_head_kind,
    verify_model_folder,
    write_manifest,
)

SAM_WEIGHTS = "model.safetensors"


@dataclass(frozen=True)
class ExportSettings:
    """What the config says about the parts a model folder does not describe itself."""

    family: str
    ref_token: str
    ref_position: str
    sae_layer: int
    head_kind: str  # used only when the source holds no trained head
    head_spec: HeadSpec
    sae_dir: Path  # the SAE a SegCompass head reads: a model folder does not hold it
    vision_source: str  # model.name_or_path: the upstream checkpoint holding an upstream family's tower
    sam_variant: str
    sam_checkpoint: str | None  # model.sam.checkpoint, resolved
    dtype: torch.dtype = torch.float32  # the LM is loaded and saved in it


def export_model(source: str | Path, out: str | Path, settings: ExportSettings, overwrite: bool = False) -> Path:
    """Write the export of model folder ``source`` (checked first) to ``out``, atomically."""
    source, out = model_folder(source), Path(out)
    _check_target(source, out, overwrite)
    verify_model_folder(source)
    has_head = (source / "head" / "model.safetensors").is_file()
    kind = saved_head_kind(source) if has_head else settings.head_kind
    sae = settings.sae_dir if kind == "segcompass" and (settings.sae_dir / "config.json").is_file() else None
    if kind == "segcompass" and has_head and sae is None:
        raise ExportError(f"{settings.sae_dir}: no trained SAE, which the SegCompass head of {source} reads; "
                          "set model.sae.path to its folder")
    policy, tokenizer = load_policy(settings.family, str(source), settings.ref_token, settings.sae_layer,
                                    settings.ref_position, settings.dtype)
    hidden = policy.lm.config.hidden_size
    if sae is not None and (d_in := json.loads((sae / "config.json").read_text()).get("d_in")) != hidden:
        raise ExportError(f"{sae}: an SAE of width {d_in}, but the LM of {source} is {hidden} wide; set "
                          "model.sae.path to the SAE this model was trained with")
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_folder(out) as tmp:
        policy.lm.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        save_projector(policy.projector, tmp / "projector")
        sources = {"vision": _write_vision(source, tmp / "vision", settings),
                   "sam": _write_sam(source, tmp / "sam", settings)}
        if has_head:
            shutil.copytree(source / "head", tmp / "head")
        if sae is not None:
            (tmp / "sae").mkdir()
            for name in ("config.json", "model.safetensors", "metrics.json"):
                if (sae / name).is_file():
                    shutil.copy2(sae / name, tmp / "sae" / name)
        head = _head_config(source, has_head, kind, settings.head_spec)
        description = describe_parts(tmp, policy, tokenizer, settings, head, sources)
        (tmp / EXPORT_CONFIG).write_text(json.dumps(description, indent=2))
        write_manifest(tmp)
    return out


def _check_target(source: Path, out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out}: a file, not a folder")
    src, dst = source.resolve(), out.resolve()
    if dst == src or dst.is_relative_to(src) or src.is_relative_to(dst):
        raise ExportError(f"--out {out}: must lie outside the source model folder {source} (and not hold it)")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ExportError(f"--out {out}: not empty; give --overwrite to replace it")


def _write_vision(source: Path, out: Path, settings: ExportSettings) -> str | None:
    """The frozen tower into ``out``: a model folder's own ``vision/`` (tiny, an export), else an upstream
    family's out of ``model.name_or_path``; returns where it came from."""
    if (source / "vision").is_dir():
        shutil.copytree(source / "vision", out)
        return str(source / "vision")
    if settings.family == "tiny":
        return None
    from models.vision_export import save_vision_tower

    save_vision_tower(settings.family, settings.vision_source, out)
    return settings.vision_source


def _write_sam(source: Path, out: Path, settings: ExportSettings) -> str | None:
    """The SAM the source's head is built over (``sam_checkpoint``: the config's checkpoint, else the
    folder's own) into ``out`` as safetensors; returns where it came from."""
    checkpoint = sam_checkpoint(settings.sam_variant, settings.sam_checkpoint, str(source))
    if checkpoint is None:
        if settings.sam_variant in OFFICIAL:
            raise ExportError(f"model.sam.checkpoint is not set: SAM {settings.sam_variant} would be random; "
                              "name the checkpoint the model was trained with (an export holds SAM's weights)")
        return None
    if Path(checkpoint).is_dir():
        _save_sam(Path(checkpoint), out)
        return checkpoint
    try:
        sam = load_sam(settings.sam_variant, checkpoint)
    except (ValueError, FileNotFoundError) as exc:
        raise ExportError(f"model.sam.checkpoint: {exc}") from None
    save_sam_folder(sam, settings.sam_variant, out)
    return checkpoint


def _save_sam(folder: Path, out: Path) -> None:
    """A SAM folder with its weights as safetensors (make-tiny writes a weights-only torch file)."""
    out.mkdir()
    shutil.copy2(folder / "config.json", out / "config.json")
    if (folder / SAM_WEIGHTS).is_file():
        shutil.copy2(folder / SAM_WEIGHTS, out / SAM_WEIGHTS)
        return
    try:
        state = load_state_dict(folder / "sam.pt")
    except ValueError as exc:
        raise ExportError(str(exc)) from None
    save_file({k: v.contiguous() for k, v in state.items()}, out / SAM_WEIGHTS)


def _head_config(source: Path, has_head: bool, kind: str, spec: HeadSpec) -> dict:
    """Kind and settings (the saved ones, else the config's) and, for a trained head, the widths
    of the SAM prompt it feeds (read off its weights)."""
    saved = json.loads((source / "head" / "config.json").read_text()) if has_head else {}
    settings = {**asdict(spec), **{k: v for k, v in saved.items() if k in asdict(spec)}}
    if has_head:
        with safe_open(source / "head" / "model.safetensors", "pt") as weights:
            settings["sam_dim"] = weights.get_slice("prompt_encoder.no_mask_embed.weight").get_shape()[-1]
    return {"kind": kind, "trained": has_head, **settings}


def _read(folder: Path, name: str) -> dict:
    return json.loads((folder / name / "config.json").read_text())


def describe_parts(folder: Path, policy, tokenizer, settings: ExportSettings, head: dict, sources: dict) -> dict:
    """The export's own config: format, segrl version, and each part's path, shapes and settings, and for
    the frozen encoders the folder or file each came from (``sources``)."""
    lm = policy.lm.config
    parts: dict[str, dict | None] = {
        "lm": {"path": ".", "architecture": type(policy.lm).__name__, "hidden_size": lm.hidden_size,
               "num_hidden_layers": lm.num_hidden_layers, "vocab_size": policy.lm.get_input_embeddings().num_embeddings,
               "dtype": str(settings.dtype).removeprefix("torch."), "sae_layer": settings.sae_layer},
        "tokenizer": {"path": ".", "ref_token": settings.ref_token, "ref_token_id": policy.ref_token_id,
                      "image_token": tokenizer.convert_ids_to_tokens(policy.image_token_id),
                      "image_token_id": policy.image_token_id, "ref_position": settings.ref_position},
        "projector": {"path": "projector", **_read(folder, "projector")},
        "vision": ({"path": "vision", "source": sources["vision"], **_vision_settings(folder / "vision")}
                   if (folder / "vision").is_dir() else None),
        "sam": ({"path": "sam", "source": sources["sam"],
                 "modules": ["image_encoder", "prompt_encoder", "mask_decoder"],
                 **_sam_settings(folder / "sam")} if (folder / "sam").is_dir() else None),
        "head": {"path": "head" if head["trained"] else None, "lm_dim": lm.hidden_size, **head},
        "sae": ({"path": "sae", **_sae_shape(_read(folder, "sae"))}
                if (folder / "sae").is_dir() else None),
    }
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "segrl_version": _version(),
            "family": settings.family, "parts": parts}


def _vision_settings(folder: Path) -> dict:
    """An upstream tower's tower.json (its HF config stays in its folder), a tiny tower's config."""
    from models.vision import TOWER_FILE

    tower = folder / TOWER_FILE
    return json.loads((tower if tower.is_file() else folder / "config.json").read_text())


def _sam_settings(folder: Path) -> dict:
    variant, config = sam_folder_variant(folder)
    return {"variant": variant, **config}


def _sae_shape(config: dict) -> dict:
    return {k: config[k] for k in ("d_in", "d_sae", "activation", "k") if k in config}


def _version() -> str:
    try:
        return importlib.metadata.version("segrl")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"

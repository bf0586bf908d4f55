"""`segrl export`: a model folder as one self-contained Hugging Face folder, safetensors only.

A checkpoint folder leans on the config for what it does not hold (the SAE, its layer, the
head's kind) and keeps the tiny SAM as a torch pickle. An export holds every part and says
what each one is, so it can be shared, and it keeps a model folder's layout, so every loader
(``load_policy``, ``load_sam``, the head loaders, vLLM) reads it as it reads a checkpoint:

    config.json, model.safetensors, tokenizer*   the LM (``save_pretrained``), tokenizer with the reference token
    projector/                                   config.json + model.safetensors
    vision/                                      the frozen vision tower (tiny family), as in the source
    sam/                                         config.json + model.safetensors: the whole SAM, image encoder
                                                 included (the features come from it); the trained prompt
                                                 encoder and mask decoder are part of the head
    head/                                        config.json (kind + settings) + model.safetensors, as trained
                                                 (absent for a make-tiny folder: the head starts fresh)
    sae/                                         the frozen SAE a SegCompass head reads
    segrl_export.json                            what each part is (``describe_parts``)
    manifest.json                                written last: every file with its size and SHA-256

Loading an export takes the model settings it records (head kind and settings, slots,
reference token, SAE layer and folder) over the config's (models.export_format).
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
from models.export_format import (
    EXPORT_CONFIG,
    FORMAT,
    FORMAT_VERSION,
    ExportError,
    model_folder,
)
from models.policy import load_policy
from models.projector import save_projector
from models.sam import load_state_dict
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
        if (source / "vision").is_dir():
            shutil.copytree(source / "vision", tmp / "vision")
        if (source / "sam").is_dir():
            _save_sam(source / "sam", tmp / "sam")
        if has_head:
            shutil.copytree(source / "head", tmp / "head")
        if sae is not None:
            (tmp / "sae").mkdir()
            for name in ("config.json", "model.safetensors", "metrics.json"):
                if (sae / name).is_file():
                    shutil.copy2(sae / name, tmp / "sae" / name)
        head = _head_config(source, has_head, kind, settings.head_spec)
        description = describe_parts(tmp, policy, tokenizer, settings, head)
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


def describe_parts(folder: Path, policy, tokenizer, settings: ExportSettings, head: dict) -> dict:
    """The export's own config: format, segrl version, and each part's path, shapes and settings."""
    lm = policy.lm.config
    parts: dict[str, dict | None] = {
        "lm": {"path": ".", "architecture": type(policy.lm).__name__, "hidden_size": lm.hidden_size,
               "num_hidden_layers": lm.num_hidden_layers, "vocab_size": policy.lm.get_input_embeddings().num_embeddings,
               "dtype": str(settings.dtype).removeprefix("torch."), "sae_layer": settings.sae_layer},
        "tokenizer": {"path": ".", "ref_token": settings.ref_token, "ref_token_id": policy.ref_token_id,
                      "image_token": tokenizer.convert_ids_to_tokens(policy.image_token_id),
                      "image_token_id": policy.image_token_id, "ref_position": settings.ref_position},
        "projector": {"path": "projector", **_read(folder, "projector")},
        "vision": {"path": "vision", **_read(folder, "vision")} if (folder / "vision").is_dir() else None,
        "sam": ({"path": "sam", "variant": "tiny", "modules": ["image_encoder", "prompt_encoder", "mask_decoder"],
                 **_read(folder, "sam")} if (folder / "sam").is_dir() else None),
        "head": {"path": "head" if head["trained"] else None, "lm_dim": lm.hidden_size, **head},
        "sae": ({"path": "sae", **_sae_shape(_read(folder, "sae"))}
                if (folder / "sae").is_dir() else None),
    }
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "segrl_version": _version(),
            "family": settings.family, "parts": parts}


def _sae_shape(config: dict) -> dict:
    return {k: config[k] for k in ("d_in", "d_sae", "activation", "k") if k in config}


def _version() -> str:
    try:
        return importlib.metadata.version("segrl")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"

"""What a `segrl export` folder records and where a model folder is: read without torch (the CLI imports it).

``segrl_export.json`` holds the format and its version, the segrl version, the model family
and one entry per part (path, shapes, settings; None for a part the export does not hold);
models.export writes it. Loading takes the model settings it records over the config's.
"""
from __future__ import annotations

import json
from pathlib import Path

from data.integrity import IntegrityError

EXPORT_CONFIG = "segrl_export.json"
FORMAT, FORMAT_VERSION = "segrl-export", 1


class ExportError(ValueError):
    """A source or target `segrl export` cannot use; the message names it and what to do."""


def model_folder(path: str | Path) -> Path:
    """The model folder ``path`` names: itself, or the ``model/`` of an SFT or GRPO run folder."""
    path = Path(path)
    if not path.exists():
        raise ExportError(f"{path}: no such folder")
    for folder in (path, path / "model"):
        if (folder / "projector" / "config.json").is_file():
            return folder
    if (path / "run.json").is_file() or (path / "checkpoints").is_dir():
        raise ExportError(f"{path}: a run folder without a final model/ (the run has not finished; its "
                          "checkpoints are DeepSpeed ones: `segrl train --resume` it to the end first)")
    raise ExportError(f"{path}: not a segrl model folder (no projector/config.json): give make-tiny's folder, "
                      "a model folder or a run folder")


def read_export(folder: str | Path) -> dict | None:
    """The export config of ``folder``, or None for a folder that is not an export."""
    path = Path(folder) / EXPORT_CONFIG
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text())
        ok = config["format"] == FORMAT and isinstance(config["parts"], dict)
    except (ValueError, KeyError, TypeError) as exc:
        raise IntegrityError(f"{path}: unreadable ({type(exc).__name__}: {exc})") from None
    if not ok or config.get("format_version") != FORMAT_VERSION:
        raise IntegrityError(f"{path}: not a {FORMAT} config of version {FORMAT_VERSION}")
    return config


def read_model_settings(folder: str | Path) -> dict | None:
    """The model settings an export records, as ``model`` config keys (None: not an export).

    The config's own values hold for what the export leaves open (an untrained head's SAE).
    """
    config = read_export(folder)
    if config is None:
        return None
    parts, folder = config["parts"], Path(folder)
    try:
        head, tokens = parts["head"], parts["tokenizer"]
        model = {"family": config["family"], "ref_token": tokens["ref_token"], "num_slots": head["num_slots"],
                 "sae": {"layer": parts["lm"]["sae_layer"]},
                 "head": {"kind": head["kind"], "codebook_dim": head["codebook_dim"],
                          "act_threshold": head["act_threshold"], "top_k_features": head["top_k"],
                          "ref_position": tokens["ref_position"]}}
        if parts.get("sae"):
            model["sae"]["path"] = str(folder / parts["sae"]["path"])
        if parts.get("sam"):
            model["sam"] = {"variant": parts["sam"]["variant"], "checkpoint": str(folder / parts["sam"]["path"])}
    except (KeyError, TypeError) as exc:
        raise IntegrityError(f"{folder / EXPORT_CONFIG}: incomplete ({type(exc).__name__}: {exc})") from None
    return model

"""SAE checkpoints: our folder format and the SAELens layout.

Ours:    <dir>/config.json (SparseAutoencoder.config()) + <dir>/model.safetensors
         [+ <dir>/metrics.json: held-out quality, so tools can judge an SAE without rerunning it]
SAELens: <dir>/cfg.json + <dir>/sae_weights.safetensors, keys W_enc/b_enc/W_dec/b_dec.

SAELens has no input scale, so `save_saelens` folds ours into the weights
(W_enc·s, W_dec/s, b_dec/s), which leaves activations and reconstructions unchanged.
Anything we cannot reproduce exactly (other architectures, run-time normalisation,
extra tensors) is refused with a ValueError naming the file and key, never guessed.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from models.sae import SparseAutoencoder

CONFIG, WEIGHTS, METRICS = "config.json", "model.safetensors", "metrics.json"
SAELENS_CONFIG, SAELENS_WEIGHTS = "cfg.json", "sae_weights.safetensors"
WEIGHT_KEYS = ("W_enc", "b_enc", "W_dec", "b_dec")


def save_sae(sae: SparseAutoencoder, out_dir: str | Path, metrics: dict | None = None) -> Path:
    """Write config + weights, and `metrics` (JSON-safe) if given; a stale metrics file is removed."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / CONFIG).write_text(json.dumps({"format": "segrl-sae", **sae.config()}, indent=2))
    save_file(_weights(sae), out / WEIGHTS)
    if metrics is None:
        (out / METRICS).unlink(missing_ok=True)
    else:
        (out / METRICS).write_text(json.dumps(metrics, indent=2))
    return out


def load_sae_metrics(folder: str | Path) -> dict:
    """The metrics `save_sae` stored beside the weights."""
    return _read_json(Path(folder) / METRICS)


def load_sae(folder: str | Path) -> SparseAutoencoder:
    folder = Path(folder)
    cfg_path = folder / CONFIG
    cfg = _read_json(cfg_path)
    if cfg.get("format") != "segrl-sae":
        raise ValueError(f"{cfg_path}: key 'format' must be 'segrl-sae' (a SAELens folder? use load_saelens)")
    kwargs = {name: cfg.get(name) for name in ("activation", "k", "layer", "hook_name")}
    kwargs["input_scale"] = _number(cfg, "input_scale", cfg_path, default=1.0)
    kwargs["apply_b_dec_to_input"] = bool(cfg.get("apply_b_dec_to_input", True))
    sae = _build(cfg_path, _dim(cfg, "d_in", cfg_path), _dim(cfg, "d_sae", cfg_path), **kwargs)
    return _fill(sae, folder / WEIGHTS)


def save_saelens(sae: SparseAutoencoder, out_dir: str | Path) -> Path:
    """Write a SAELens v6 folder (input scale folded into the weights)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = {
        "architecture": "standard" if sae.activation == "relu" else "topk",
        "d_in": sae.d_in, "d_sae": sae.d_sae, "dtype": "float32", "device": "cpu",
        "apply_b_dec_to_input": sae.apply_b_dec_to_input, "normalize_activations": "none",
        "meta": {"hook_name": sae.hook_name, "hook_layer": sae.layer},
    }
    if sae.activation == "topk":
        cfg["k"] = sae.k
    (out / SAELENS_CONFIG).write_text(json.dumps(cfg, indent=2))
    s, w = sae.input_scale, _weights(sae)
    w.update(W_enc=w["W_enc"] * s, W_dec=w["W_dec"] / s, b_dec=w["b_dec"] / s)
    save_file(w, out / SAELENS_WEIGHTS)
    return out


def load_saelens(folder: str | Path) -> SparseAutoencoder:
    """Read a SAELens folder: v6 (`architecture` standard|topk with `k`) or older
    (`activation_fn_str` relu|topk with `activation_fn_kwargs.k`)."""
    folder = Path(folder)
    cfg_path = folder / SAELENS_CONFIG
    cfg = _read_json(cfg_path)
    activation, k = _saelens_activation(cfg, cfg_path)
    norm = cfg.get("normalize_activations", "none") or "none"
    if norm != "none":
        raise ValueError(f"{cfg_path}: key 'normalize_activations'={norm!r} is not supported (only 'none')")
    meta = cfg.get("meta") or cfg.get("metadata") or {}
    sae = _build(
        cfg_path, _dim(cfg, "d_in", cfg_path), _dim(cfg, "d_sae", cfg_path), activation, k,
        apply_b_dec_to_input=bool(cfg.get("apply_b_dec_to_input", True)),
        layer=meta.get("hook_layer", cfg.get("hook_layer")),
        hook_name=meta.get("hook_name", cfg.get("hook_name")),
    )
    return _fill(sae, folder / SAELENS_WEIGHTS)


def _saelens_activation(cfg: dict, path: Path) -> tuple[str, int | None]:
    arch = cfg.get("architecture", "standard")
    if arch == "topk":
        return "topk", _dim(cfg, "k", path)
    if arch != "standard":
        raise ValueError(f"{path}: key 'architecture'={arch!r} is not supported (standard, topk)")
    fn = cfg.get("activation_fn_str", cfg.get("activation_fn", "relu"))
    if fn == "relu":
        return "relu", None
    if fn == "topk":
        return "topk", _dim(cfg.get("activation_fn_kwargs") or {}, "k", path)
    raise ValueError(f"{path}: key 'activation_fn_str'={fn!r} is not supported (relu, topk)")


def _weights(sae: SparseAutoencoder) -> dict[str, torch.Tensor]:
    return {name: getattr(sae, name).detach().float().cpu().contiguous() for name in WEIGHT_KEYS}


def _fill(sae: SparseAutoencoder, path: Path) -> SparseAutoencoder:
    """Copy the four tensors from `path` into `sae`, checking names and shapes."""
    if not path.is_file():
        raise ValueError(f"{path}: file not found")
    try:
        tensors = load_file(path)
    except SafetensorError as err:
        raise ValueError(f"{path}: not a readable safetensors file ({err})") from err
    extra = sorted(set(tensors) - set(WEIGHT_KEYS))
    if extra:
        raise ValueError(f"{path}: unexpected key {extra[0]!r} (expected only {', '.join(WEIGHT_KEYS)})")
    with torch.no_grad():
        for name in WEIGHT_KEYS:
            if name not in tensors:
                raise ValueError(f"{path}: missing key {name!r}")
            param = getattr(sae, name)
            if tensors[name].shape != param.shape:
                got, want = tuple(tensors[name].shape), tuple(param.shape)
                raise ValueError(f"{path}: key {name!r} has shape {got}, expected {want}")
            param.copy_(tensors[name])
    return sae


def _build(path: Path, d_in: int, d_sae: int, activation, k, **kwargs) -> SparseAutoencoder:
    try:
        return SparseAutoencoder(d_in, d_sae, activation, k, **kwargs)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from err


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise ValueError(f"{path}: file not found")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return cfg


def _dim(cfg: dict, key: str, path: Path) -> int:
    value = cfg.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{path}: key {key!r} must be a positive integer, got {value!r}")
    return value


def _number(cfg: dict, key: str, path: Path, default: float) -> float:
    value = cfg.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{path}: key {key!r} must be a positive number, got {value!r}")
    return float(value)

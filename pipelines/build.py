"""Build steps of the main job: synthetic data and tiny models, each skipped when up to date.

A step is up to date when its stamp file records the same parameters (and,
for the tiny models, the same tokenizer corpus); `--force` rebuilds.
"""
from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

from config import Config
from data.schema import read_table


def _stamp_matches(stamp: Path, params: dict) -> bool:
    try:
        return json.loads(stamp.read_text()).get("params") == params
    except (OSError, ValueError):
        return False


def split_summary(root: Path, splits: list[str]) -> dict[str, dict[str, int]]:
    """Per split: number of samples by answer type (and in total)."""
    out = {}
    for split in splits:
        table = read_table(root / f"{split}.parquet")
        counts = Counter(table.column("answer_type").to_pylist())
        out[split] = {"total": table.num_rows, **dict(sorted(counts.items()))}
    return out


def build_synthetic(config: Config, force: bool = False) -> dict:
    from data.synthetic import SPLITS, make_synthetic

    if config.data.dataset != "synthetic":
        raise ValueError(
            f"data.dataset is '{config.data.dataset}': real datasets are converted with `segrl convert`, not generated"
        )
    root = Path(config.resolve_path(config.data.root))
    params = {"seed": config.seed, **config.data.synthetic.model_dump(mode="json")}
    stamp = root / "synthetic.json"
    if force or not _stamp_matches(stamp, params) or not all((root / f"{s}.parquet").exists() for s in SPLITS):
        s = config.data.synthetic
        make_synthetic(
            root, seed=config.seed, n_train=s.n_train, n_val=s.n_val, n_test=s.n_test,
            image_size=s.image_size, query_weights=s.query_weights,
        )
        stamp.write_text(json.dumps({"params": params}, indent=2))
    else:
        print(f"make-data: {root} is up to date (use --force to rebuild)")
    return {"root": str(root), "splits": split_summary(root, list(SPLITS))}


def tiny_spec(config: Config):
    from models.tiny_specs import (
        TinyLMAlignSpec,
        TinyLMSpec,
        TinySamPretrainSpec,
        TinySamSpec,
        TinySpec,
        TinyVisionPretrainSpec,
        TinyVisionSpec,
    )

    t = config.model.tiny
    return TinySpec(
        seed=t.seed,
        ref_token=config.model.ref_token,
        lm=TinyLMSpec(**t.lm.model_dump()),
        vision=TinyVisionSpec(**t.vision.model_dump()),
        sam=TinySamSpec(**t.sam.model_dump()),
        vision_pretrain=TinyVisionPretrainSpec(**t.vision_pretrain.model_dump()),
        lm_align=TinyLMAlignSpec(**t.lm_align.model_dump()),
        sam_pretrain=TinySamPretrainSpec(**t.sam_pretrain.model_dump()),
    )


def build_tiny(config: Config, force: bool = False) -> dict:
    """Train the tokenizer on the synthetic set's splits (``corpus``) and build the tiny models."""
    from dataclasses import asdict

    from data.synthetic import corpus
    from models.tiny import make_tiny

    if config.model.family != "tiny":
        raise ValueError(f"model.family is '{config.model.family}': make-tiny builds only the tiny family")
    data_root = Path(config.resolve_path(config.data.root))
    train_file = data_root / f"{config.data.train_split}.parquet"
    if not train_file.exists():
        raise FileNotFoundError(
            f"{train_file}: the tokenizer is trained on the synthetic set; run `segrl make-data` first")
    texts = corpus(data_root, ref_token=config.model.ref_token)
    spec = tiny_spec(config)
    params = {"spec": asdict(spec), "corpus_sha256": hashlib.sha256("\n".join(texts).encode()).hexdigest()}
    out = Path(config.resolve_path(config.model.name_or_path))
    stamp = out / "build.json"
    if force or not _stamp_matches(stamp, params):
        make_tiny(spec, texts, out)
        stamp.write_text(json.dumps({"params": params}, indent=2))
    else:
        print(f"make-tiny: {out} is up to date (use --force to rebuild)")
    return {"path": str(out), **json.loads((out / "tiny.json").read_text())}


def _fingerprint(*files: Path) -> str:
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.read_bytes() if f.is_file() else b"missing")
    return digest.hexdigest()[:16]


def cached_step(name: str, out_dir: Path, params: dict, run, force: bool = False) -> dict:
    """Run a training step unless its report exists for the same parameters (stamp in `out_dir`)."""
    stamp, report = out_dir / "stamp.json", out_dir / "report.json"
    if not force and report.is_file() and _stamp_matches(stamp, params):
        print(f"{name}: {out_dir} is up to date (use --force to rerun)")
        return json.loads(report.read_text())
    result = run()
    stamp.write_text(json.dumps({"params": params}, indent=2))
    return result


def step_params(config: Config, *sections: str) -> dict:
    """What a training step depends on: its config sections and the built inputs' stamps."""
    model = Path(config.resolve_path(config.model.name_or_path))
    data = Path(config.resolve_path(config.data.root))
    params = {"seed": config.seed, "inputs": _fingerprint(model / "build.json", data / "synthetic.json")}
    for section in sections:
        node = config
        for part in section.split("."):
            node = getattr(node, part)
        params[section] = node.model_dump(mode="json")
    return params


SFT_OPTIM_KEYS = ("weight_decay", "betas", "grad_clip", "one_cycle_final_div")
"""The `optim` settings SFT uses (its rates are `sft.lr` and `sft.lr_multipliers`)."""


def sft_params(config: Config, sae_from: Config) -> dict:
    """What an SFT run depends on (a GRPO rate change keeps it); the SAE is ``sae_from``'s (a frozen
    part, trained once)."""
    optim = config.optim.model_dump(mode="json")
    return {**step_params(config, "sft", "eval", "seg_loss", "model.head"),
            "optim": {key: optim[key] for key in SFT_OPTIM_KEYS}, "sae": step_params(sae_from, "model.sae")}


def grpo_params(config: Config, sft: dict) -> dict:
    """What a GRPO run depends on: its sections and the SFT start's parameters."""
    return {**step_params(config, "train", "grpo", "rollout", "reward", "cluster", "optim", "seg_loss"), "sft": sft}


def report_lines(config: Config, data: dict, tiny: dict, features: dict) -> list[str]:
    """The main job's closing report: what was built and where."""
    lines = [f"dataset   {data['root']}"]
    for split, counts in data["splits"].items():
        detail = ", ".join(f"{k} {v}" for k, v in counts.items() if k != "total")
        lines.append(f"  {split:<6} {counts['total']:>6} samples ({detail})")
    params = tiny["parameters"]
    lines.append(f"models    {tiny['path']}")
    lines.append(
        f"  tokenizer {tiny['vocab_size']} tokens (ref token {config.model.ref_token}); "
        f"LM {params['lm']:,} params; vision encoder {params['vision']:,} params; SAM {params.get('sam', 0):,} params"
    )
    sam = tiny["sam"]
    lines.append(f"  SAM pretrained {sam['steps']} steps in {sam['seconds']:.0f} s ({sam['cpu_seconds']:.0f} s CPU): "
                 f"held-out mean IoU {sam['box_iou']:.3f} from a box, {sam['point_iou']:.3f} from one point")
    lines.append(
        f"features  {features['encoded']} encoded, {features['cached']} cached, {features['failed']} failed"
    )
    return lines

"""`segrl sae-train`: collect layer-k states of the policy (Ray Data), train the SAE, freeze it.

SegCompass trains its SAE before the reasoning-segmentation task and keeps it
frozen afterwards (A.1). States are taken at every position of prompt (image
tokens included) + reference response, a random subset per sample.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from config import Config


class CollectStates:
    """Ray Data stateful UDF: sample indices -> layer-k hidden states [n_tokens, d]."""

    def __init__(self, config_dump: dict, split_file: str):
        from config.builders import feature_store
        from data.schema import read_samples
        from models.policy import load_policy

        self.config = Config.model_validate(config_dump)
        m = self.config.model
        self.policy, self.tokenizer = load_policy(m.family, self.config.resolve_path(m.name_or_path), m.ref_token,
                                                  m.sae.layer, m.head.ref_position)
        self.policy.eval()
        self.samples = read_samples(split_file)
        self.split_file, self.store = split_file, feature_store(self.config)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from data.features import content_hash
        from data.schema import resolve_image
        from data.synthetic import sft_target
        from models.prompt import prompt_ids

        m = self.config.model
        prompts, feats, responses = [], [], []
        for i in batch["index"].tolist():
            s = self.samples[i]
            prompts.append(prompt_ids(self.tokenizer, s.question, m.ref_token))
            feats.append(self.store.get(content_hash(resolve_image(self.split_file, s.image_path)))["vision"])
            text = sft_target(s, m.ref_token) if s.reasoning else ""
            responses.append(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        with torch.no_grad():
            out = self.policy(prompts, feats, responses)
        rows = []
        for i, idx in enumerate(batch["index"].tolist()):
            valid = out.attention_mask[i].nonzero().flatten()
            rng = np.random.default_rng([self.config.seed, idx])
            keep = rng.choice(valid.numel(), size=min(m.sae.tokens_per_sample, valid.numel()), replace=False)
            rows.append(out.layer_hidden[i, valid[np.sort(keep)]].float().numpy())
        return {"state": np.concatenate(rows)}


def collect_states(config: Config, split: str) -> torch.Tensor:
    import ray.data

    split_file = Path(config.resolve_path(config.data.root)) / f"{split}.parquet"
    from data.schema import read_table

    n = min(read_table(split_file).num_rows, config.model.sae.max_samples)
    ray.data.DataContext.get_current().enable_progress_bars = False
    ds = ray.data.range(n).rename_columns({"id": "index"}).map_batches(
        CollectStates,
        fn_constructor_kwargs={"config_dump": config.model_dump(mode="json"), "split_file": str(split_file)},
        batch_size=32, compute=ray.data.ActorPoolStrategy(size=1), num_cpus=1, batch_format="numpy",
    )
    chunks = [b["state"] for b in ds.iter_batches(batch_size=None, batch_format="numpy")]
    return torch.from_numpy(np.concatenate(chunks))


def run_sae_train(config: Config, progress: bool = True) -> dict:
    """Collect states, train, save to model.sae.path (weights, held-out metrics.json, report.json);
    returns the training report."""
    from models.sae_fit import train_sae
    from models.sae_io import save_sae

    s = config.model.sae
    states = collect_states(config, config.data.train_split)
    perm = torch.randperm(states.shape[0], generator=torch.Generator().manual_seed(config.seed))
    n_val = max(1, int(len(perm) * s.val_fraction))
    val, train = states[perm[:n_val]], states[perm[n_val:]]
    sae, report = train_sae(train, val, d_sae=s.expansion * states.shape[1], l1_coef=s.l1_coef, lr=s.lr,
                            batch_size=s.batch_size, epochs=s.epochs, seed=config.seed, progress=progress,
                            activation=s.activation, k=s.k, aux_coef=s.aux_coef,
                            layer=s.layer, hook_name=f"hidden_states[{s.layer}]")
    report.update({"train_states": int(train.shape[0]), "val_states": int(val.shape[0])})
    out = Path(config.resolve_path(s.path))
    save_sae(sae, out, metrics=held_out_metrics(report))
    (out / "report.json").write_text(json.dumps(report, indent=2))
    return report


def held_out_metrics(report: dict) -> dict:
    """The trained SAE's quality on the held-out states: what the SAE folder's metrics.json keeps."""
    last = report["epochs"][-1]
    return {
        "l0": last["val_l0"], "explained_variance": last["val_explained_variance"],
        "dead_fraction": last["val_dead_fraction"], "mse": last["val_mse"],
        "val_states": report["val_states"], "train_seconds": report["seconds"],
    }


def report_lines(report: dict) -> list[str]:
    first, last = report["initial"], report["epochs"][-1]
    return [
        f"SAE on {report['train_states']} states ({report['val_states']} held out), "
        f"{report['steps']} steps in {report['seconds']:.0f}s",
        f"  held-out MSE {first['mse']:.4g} -> {last['val_mse']:.4g}; explained variance "
        f"{first['explained_variance']:.3f} -> {last['val_explained_variance']:.3f}; "
        f"L0 {last['val_l0']:.1f}; dead features {last['val_dead_fraction']:.1%}",
    ]

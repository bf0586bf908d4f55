"""Training and held-out evaluation of the SAE on cached hidden states (SegCompass A.2).

Defaults follow A.2: Adam, lr 5e-5, batch 64, 10 epochs, linear warmup then a constant
rate. The warmup length is not given in the paper; we default to 5% of all steps
(SAE-V: 1,500 of 30k; SegCompass's released code: 3%).

Input normalisation: one scalar s is fitted on the training states so that the mean
squared norm of s·x equals d_in (Anthropic "April update"). It makes l1_coef transfer
between models whose hidden states differ in scale by orders of magnitude, and is stored
as `input_scale` in the SAE's config so inference applies the same s. b_dec starts at the
mean of the scaled training states, so the encoder sees centred inputs from step one.

ReLU decoder rows are not renormalised: the ReLU loss weights each feature's L1 by its
decoder row norm (see `models/sae.py`), which already removes the shrink-the-codes,
grow-the-dictionary escape. TopK decoder rows are put back to unit norm after every
step, and latents silent for `dead_window_tokens` get the AuxK term (Gao et al. 2024's
k_aux = d_in/2 and weight 1/32 by default, though both terms here are unnormalised sums).

Everything here is plain torch on in-memory tensors; collecting the states (Ray Data)
and choosing the layer live with the caller.
"""
from __future__ import annotations

import contextlib
import math
import time

import torch
from tqdm.auto import tqdm

from models.sae import SparseAutoencoder, sae_loss

WARMUP_FRACTION = 0.05
AUX_COEF = 1 / 32
EVAL_CHUNK = 4096


class DeadFeatureTracker:
    """Counts tokens since each feature last fired; dead = silent for a whole window."""

    def __init__(self, d_sae: int, window_tokens: int, device: torch.device | str | None = None):
        if window_tokens < 1:
            raise ValueError(f"window_tokens must be >= 1, got {window_tokens}")
        self.window = window_tokens
        self.since_fired = torch.zeros(d_sae, dtype=torch.long, device=device)

    def update(self, acts: torch.Tensor) -> None:
        acts = acts.reshape(-1, acts.shape[-1])
        self.since_fired += acts.shape[0]
        self.since_fired[(acts > 0).any(0)] = 0

    def dead_mask(self) -> torch.Tensor:
        return self.since_fired >= self.window

    def dead_fraction(self) -> float:
        return self.dead_mask().float().mean().item()


@torch.no_grad()
def evaluate_sae(sae: SparseAutoencoder, states: torch.Tensor, batch_size: int = EVAL_CHUNK) -> dict[str, float]:
    """Reconstruction quality on states [N, d_in], in the states' own units.

    mse                 mean over all N·d_in elements of (x − x̂)²
    explained_variance  1 − Σ‖x − x̂‖² / Σ‖x − mean(x)‖²
    l0                  mean number of active features per token
    dead_fraction       share of features that fire on none of these states
    """
    states = states.reshape(-1, sae.d_in)
    n, device = states.shape[0], sae.W_enc.device
    sq_err = sum_sq = l0 = torch.zeros((), dtype=torch.float64, device=device)
    sum_x = torch.zeros(sae.d_in, dtype=torch.float64, device=device)
    fired = torch.zeros(sae.d_sae, dtype=torch.bool, device=device)
    for chunk in states.split(batch_size):
        x = chunk.to(device, torch.float32)
        x_hat, acts = sae(x)
        active = acts > 0
        sq_err = sq_err + (x - x_hat).double().pow(2).sum()
        sum_sq = sum_sq + x.double().pow(2).sum()
        sum_x += x.double().sum(0)
        l0 = l0 + active.sum()
        fired |= active.any(0)
    total_var = (sum_sq - sum_x.pow(2).sum() / n).item()
    return {
        "mse": sq_err.item() / (n * sae.d_in),
        "explained_variance": 1.0 - sq_err.item() / total_var if total_var > 0 else float("nan"),
        "l0": l0.item() / n,
        "dead_fraction": 1.0 - fired.float().mean().item(),
    }


def train_sae(
    train_states: torch.Tensor,
    val_states: torch.Tensor,
    d_sae: int,
    l1_coef: float,
    lr: float = 5e-5,
    batch_size: int = 64,
    epochs: int = 10,
    warmup_steps: int | None = None,
    seed: int = 0,
    activation: str = "relu",
    k: int | None = None,
    progress: bool = True,
    *,
    normalize_input: bool = True,
    apply_b_dec_to_input: bool = True,
    dead_window_tokens: int | None = None,
    aux_k: int | None = None,
    aux_coef: float = AUX_COEF,
    cpu_threads: int | None = 1,
    layer: int | None = None,
    hook_name: str | None = None,
    device: torch.device | str | None = None,
) -> tuple[SparseAutoencoder, dict]:
    """Train an SAE on train_states [N, d_in]; report held-out metrics on val_states [M, d_in].

    States may be any float dtype and stay where they are; batches are cast to fp32 on
    `device` (default: CPU). `warmup_steps=None` means 5% of all steps;
    `dead_window_tokens=None` means one epoch (dead = never fired during the last epoch);
    TopK's AuxK term trains those latents (`aux_k=None`: d_in // 2, weight `aux_coef`).
    `cpu_threads` caps torch's CPU threads while training (None: as set): a 64-state batch
    is too small to split, and on busy cores a second thread mostly waits (the tiny
    config's SAE: 27 s on one thread, 150 s on two under load).
    Returns the SAE frozen (inference-only) and a JSON-safe report:
    {"initial": val metrics before training, "epochs": [per-epoch train loss terms,
    dead_fraction (training window), val_mse, val_explained_variance, val_l0,
    val_dead_fraction], "dead_features": ids dead at the end, "input_scale", "steps",
    "warmup_steps", "seconds" (training wall time)}.
    """
    _check_states(train_states, val_states)
    n, d_in = train_states.shape
    device = torch.device(device or "cpu")
    mean, mean_sq_norm = _moments(train_states)
    scale = math.sqrt(d_in / mean_sq_norm) if normalize_input else 1.0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        sae = SparseAutoencoder(
            d_in, d_sae, activation, k, input_scale=scale, apply_b_dec_to_input=apply_b_dec_to_input,
            layer=layer, hook_name=hook_name,
        )
    with torch.no_grad():
        sae.b_dec.copy_(mean * scale)
    sae.to(device)

    steps_per_epoch = math.ceil(n / batch_size)
    total = steps_per_epoch * epochs
    warmup = max(1, round(WARMUP_FRACTION * total)) if warmup_steps is None else warmup_steps
    if warmup < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup}")
    optimizer = torch.optim.Adam(sae.parameters(), lr=lr, betas=(0.9, 0.999))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, _linear_warmup(warmup))
    tracker = DeadFeatureTracker(d_sae, dead_window_tokens or n, device)
    aux_k = d_in // 2 if aux_k is None else aux_k
    shuffle = torch.Generator().manual_seed(seed)
    report = {"input_scale": scale, "steps": total, "warmup_steps": warmup,
              "initial": evaluate_sae(sae, val_states), "epochs": []}
    start = time.perf_counter()
    threads = cpu_threads if device.type == "cpu" else None
    with _torch_threads(threads), tqdm(total=total, desc="sae", unit="step", disable=not progress) as bar:
        for epoch in range(1, epochs + 1):
            sums = torch.zeros(4, dtype=torch.float64, device=device)
            for idx in torch.randperm(n, generator=shuffle).split(batch_size):
                out = sae_loss(sae, train_states[idx].to(device, torch.float32), l1_coef,
                               tracker.dead_mask(), aux_k, aux_coef)
                optimizer.zero_grad(set_to_none=True)
                out["loss"].backward()
                optimizer.step()
                if activation == "topk":
                    sae.normalize_decoder_()
                schedule.step()
                tracker.update(out["acts"].detach())
                sums += torch.stack([out[key].detach() for key in ("loss", "recon", "sparsity", "aux")]) * len(idx)
                bar.update()
            val = evaluate_sae(sae, val_states)
            loss, recon, sparsity, aux = (sums / n).tolist()
            report["epochs"].append({
                "epoch": epoch, "train_loss": loss, "train_recon": recon, "train_sparsity": sparsity,
                "train_aux": aux, "dead_fraction": tracker.dead_fraction(), "val_mse": val["mse"],
                "val_explained_variance": val["explained_variance"], "val_l0": val["l0"],
                "val_dead_fraction": val["dead_fraction"],
            })
            bar.set_postfix(loss=f"{loss:.4g}", val_mse=f"{val['mse']:.4g}", ev=f"{val['explained_variance']:.3f}")
    report["dead_features"] = tracker.dead_mask().nonzero().flatten().tolist()
    report["seconds"] = time.perf_counter() - start
    return sae.freeze(), report


@contextlib.contextmanager
def _torch_threads(n: int | None):
    """torch's CPU thread count set to n inside the block (None: unchanged)."""
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _linear_warmup(warmup_steps: int):
    """LR multiplier: linear ramp over the first warmup_steps optimizer steps, then 1."""
    return lambda step: min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0


def _moments(states: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Per-dimension mean (fp32) and mean squared norm, accumulated in fp64 chunk by chunk."""
    sum_x = torch.zeros(states.shape[1], dtype=torch.float64)
    sum_sq = 0.0
    for chunk in states.split(EVAL_CHUNK):
        chunk = chunk.double().cpu()
        sum_x += chunk.sum(0)
        sum_sq += chunk.pow(2).sum().item()
    n = states.shape[0]
    if sum_sq == 0:
        raise ValueError("train_states are all zero; cannot fit an input scale")
    return (sum_x / n).float(), sum_sq / n


def _check_states(train: torch.Tensor, val: torch.Tensor) -> None:
    if train.ndim != 2 or val.ndim != 2 or train.shape[1] != val.shape[1]:
        raise ValueError(f"expected train [N, d_in] and val [M, d_in], got {tuple(train.shape)} and {tuple(val.shape)}")
    if train.shape[0] == 0 or val.shape[0] == 0:
        raise ValueError("train_states and val_states must be non-empty")
    if not (train.is_floating_point() and val.is_floating_point()):
        raise ValueError("states must be floating point")
